"""converters: PyTorch -> ONNX export and the rewrites that store only the kept blocks.

Depends on onnx, onnxruntime and numpy; torch is imported only inside :func:`export_onnx`.

    proto = export_onnx(model, (x,))                       # dense, dynamic batch
    result = convert(proto, layers, fmt="auto")            # per-layer formulation, timed in ORT
    verify(result.model, {"x": x_np}, [torch_out_np])      # checker + ORT vs PyTorch; raises on mismatch
    measure_sparsity(result.model)                         # from the weights in the final bytes

    # int8: linears dynamic (converters.int8), convs static in ORT's QDQ form (converters.qdq)
    result = convert(proto, layers, fmt="auto", quantize="int8", calibration_inputs={"x": rows})
    verify_kernels(result.model, {"x": x_np})              # ORT's int8 kernels vs the graph's own reference

    # auto's timings cached per machine; a previous conversion's choices replayed (no timing, same bytes)
    result = convert(proto, layers, fmt="auto", timing_inputs={"x": x_np}, cache=TimingCache.open())
    again = convert(proto, layers, plan=result.plan)

    # a smaller dense graph (structured pruning) in ORT's own int8 forms, the fastest measured
    whole = quantize_whole(proto, timing_inputs={"x": x_np}, calibration_inputs={"x": rows})

    # the same, timed and verified in OpenVINO (the openvino extra): NNCF's int8 among the forms
    with runtimes.use("openvino"):
        whole = quantize_whole(proto, timing_inputs={"x": x_np}, calibration_inputs={"x": rows})
        verify(whole.model, {"x": x_np}, [torch_out_np], rtol=0.2)
"""
from . import runtimes
from .cache import TimingCache, TimingKey
from .convert import FORMATS, ConversionResult, LayerOutcome, convert
from .dense_int8 import WholeInt8, quantize_whole
from .errors import ConverterError, VerificationError, WeightNotFound
from .export import export_onnx
from .formulations import FORMULATIONS
from .inspect import SparsityReport, measure_sparsity
from .locate import Site, locate, unplaceable
from .manifest import LayerBlocks
from .ops import OP_HANDLERS
from .plan import LayerChoice, Plan, PlanError, PlanMismatch
from .runtime import run_onnx
from .verify import Verification, check, verify, verify_kernels

__all__ = [
    "FORMATS", "FORMULATIONS", "OP_HANDLERS", "ConversionResult", "ConverterError", "LayerBlocks",
    "LayerChoice", "LayerOutcome", "Plan", "PlanError", "PlanMismatch", "Site", "SparsityReport",
    "TimingCache", "TimingKey", "Verification", "VerificationError", "WeightNotFound", "WholeInt8", "check",
    "convert", "export_onnx", "locate", "measure_sparsity", "quantize_whole", "run_onnx", "runtimes",
    "unplaceable", "verify", "verify_kernels",
]
