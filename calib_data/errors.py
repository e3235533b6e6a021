"""The data package's own error. It sits below ``sapp_compress`` and never imports from it (layers point
down): ``sapp_compress.errors.DataError`` subclasses this one, so ``except calib_data.errors.DataError``
catches both, and the CLI maps both to exit 2."""
from __future__ import annotations


class DataError(ValueError):
    """A data shard (or the text a shard is made from) is unreadable or does not fit: a one-line message
    naming the file and what was expected vs found. Exit code 2 (bad input)."""

    exit_code = 2


def first_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message (its type's name when it has none): a one-line error for
    the user. (``converters.export.one_line`` is the converters' own, which also reads the exporter's
    summary.)"""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__
