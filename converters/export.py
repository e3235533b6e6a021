"""torch -> ONNX export.

We use torch's torch.export-based exporter (``dynamo=True``), not the TorchScript one: the TorchScript exporter
warns that it is deprecated and will be removed, it renames parameters it folds (``onnx::Conv_35``), and
the torch.export path is what torch maintains. Its graphs keep parameter names for Gemm/Conv weights and
transpose MatMul weights into fresh constants, so :mod:`converters.locate` matches weights by name first
and by value (up to transpose and a per-output-channel scale from folded BatchNorm) after.

The batch axis of every input (and so of every output) is exported as dynamic.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import onnx

from .errors import ConverterError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


def export_onnx(model, example_inputs: tuple, *, input_names: list[str] | None = None,
                output_names: list[str] | None = None, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (eval mode, on CPU) to an in-memory ONNX model with a dynamic batch axis.

    The model given is not touched: a deep copy is exported.
    """
    import torch  # lazily: converters never needs torch except to export

    if opset < 17:
        raise ConverterError(f"opset: expected >= 17, got {opset}")
    m = copy.deepcopy(model).cpu().eval()
    args = tuple(t.cpu() for t in example_inputs)
    n = len(args)
    input_names = input_names or (["x"] if n == 1 else [f"x{i}" for i in range(n)])
    output_names = output_names or ["y"]
    dyn = tuple({0: torch.export.Dim.DYNAMIC} for _ in args)
    sink = io.StringIO()
    noisy = [logging.getLogger(name) for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(m, args, dynamo=True, opset_version=opset, input_names=input_names,
                                     output_names=output_names, dynamic_shapes=dyn, verbose=False,
                                     optimize=True, external_data=False)
    except Exception as e:  # noqa: BLE001 -- the exporter raises many types; the message matters
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConverterError(f"torch.onnx.export failed: {msg}") from e
    finally:
        for lg, lv in zip(noisy, levels):
            lg.setLevel(lv)
    proto = prog.model_proto
    proto.producer_name = "sapp-compress"
    return proto
