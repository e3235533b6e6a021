"""Typed errors. Each carries the exit code the CLI maps it to (see README, "Exit codes").

Messages are one line and show what was expected and what was found.
"""
from __future__ import annotations

from calib_data.errors import DataError as ShardError


class SappError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(SappError, ValueError):
    """Bad options or bad input (a model file, a shard, a block size): exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid configuration value."""


class ModelLoadError(UsageError):
    """The model file could not be loaded safely."""


class DataError(UsageError, ShardError):
    """A data shard is unreadable or does not fit the model (the shard readers of :mod:`calib_data` raise its
    base, :class:`calib_data.errors.DataError`)."""


class GeometryError(UsageError):
    """A block shape does not fit a layer and the policy is ``error``."""


class UnsupportedModel(UsageError):
    """The model cannot be exported to ONNX or its pruned weights cannot be found in the exported graph;
    found before fine-tuning: exit 2."""


class RuntimeUnavailable(UsageError):
    """``--runtime`` names a runtime whose package is not installed (exit 2, before anything runs), or an
    output only that runtime writes (``-o model.xml``) without it."""


class VerificationFailed(SappError):
    """ONNX Runtime's outputs differ from the pruned PyTorch model beyond tolerance: exit 3. ``result`` holds
    the measured differences for the report. (The converters raise their own
    :class:`converters.VerificationError`, which :mod:`sapp_compress.verify.stages` translates into this.)"""

    exit_code = 3

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result


class AccuracyGateFailed(SappError):
    """The accuracy drop exceeds ``--max-accuracy-drop``: exit 4."""

    exit_code = 4


class TargetMissed(SappError):
    """``--target-speedup``: the written model's measured speed-up misses the target by more than 10 %, after
    one corrective round: exit 5 (``--accept-missed-target`` writes it anyway, with a warning)."""

    exit_code = 5


def exit_code_of(e: BaseException) -> int:
    """The documented exit code of a failure: 130 for an interrupt, a typed error's own (this module's, and
    the data package's ``DataError``: 2), 3 for a converter's verification error, else 1."""
    if isinstance(e, KeyboardInterrupt):
        return 130
    code = getattr(e, "exit_code", None) if isinstance(e, (SappError, ShardError)) else None
    if code is not None:
        return code
    from converters import VerificationError

    return 3 if isinstance(e, VerificationError) else 1
