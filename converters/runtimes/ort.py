"""ONNX Runtime's CPU execution provider: the default runtime, a hard dependency."""
from __future__ import annotations

import onnx
import onnxruntime as ort

from .base import Runtime, register


class OnnxRuntime(Runtime):
    name = "ort"
    title = "ONNX Runtime"
    int8_forms = ("dynamic", "static")
    # the graph as written (op by op) and as ORT deploys it (its fusions): a wrong fusion shows
    verify_modes = (("optimizations_off", False), ("optimizations_on", True))

    def version(self) -> str:
        return ort.__version__

    def session(self, model, *, threads=None, optimize=True, spin=True) -> ort.InferenceSession:
        """A CPU session. ``spin=False`` stops idle intra-op threads from busy-waiting after a run: needed
        when several sessions are timed interleaved, or one session's spinning threads steal the cores of the
        next."""
        so = ort.SessionOptions()
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


ORT = register(OnnxRuntime())


def reference_session(model: onnx.ModelProto | bytes, threads: int | None = None) -> ort.InferenceSession:
    """ONNX Runtime with its graph optimizations off: the graph computed op by op as written, the reference
    any runtime's output is checked against (and the tool's own shape probes)."""
    return ORT.session(model, threads=threads, optimize=False)


__all__ = ["ORT", "OnnxRuntime", "reference_session"]
