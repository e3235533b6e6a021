"""The data package's own error. It sits below ``sapp_compress`` and never imports from it (layers point down):
``sapp_compress.errors.DataError`` subclasses this one, so ``except calib_data.errors.DataError`` catches both, and
the CLI maps both to exit 2."""
from __future__ import annotations


class DataError(ValueError):
    """A data shard (or the text a shard is made from) is unreadable or does not fit: a one-line message naming the
    file and what was expected vs found. Exit code 2 (bad input)."""

    exit_code = 2
