"""Runtimes the written ONNX is timed, verified and put in int8 in: ONNX Runtime (``ort``, the default) and
OpenVINO (``openvino``, the optional extra), one interface (:class:`Runtime`), two entries (:data:`RUNTIMES`).
The OpenVINO entry imports OpenVINO only when used."""
from . import ort  # noqa: F401, I001 -- register the entries, the default first
from . import openvino  # noqa: F401, I001
from .base import RUNTIMES, Runtime, RuntimeMissing, Session, current, get, register, use
from .ort import reference_session

__all__ = ["RUNTIMES", "Runtime", "RuntimeMissing", "Session", "current", "get", "reference_session",
           "register", "use"]
