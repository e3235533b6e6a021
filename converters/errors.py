"""Typed errors of the converters. ``exit_code`` is what the CLI exits with."""
from __future__ import annotations


class ConverterError(Exception):
    """An export or rewrite failed (a defect or an unsupported graph): exit 1."""

    exit_code = 1


class WeightNotFound(ConverterError):
    """A pruned weight could not be found in the exported graph, or was found more than once."""


class VerificationError(ConverterError):
    """ONNX Runtime's outputs differ from the pruned PyTorch model beyond tolerance, or the model fails the
    checker: exit 3. ``result`` holds the measured differences."""

    exit_code = 3

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result
