"""int8 convolutions in ONNX Runtime's QDQ form, with the pruned convs block-sparse or compactly stored.

ORT runs an int8 convolution fastest as ``DequantizeLinear -> Conv -> QuantizeLinear`` with constant int8
weights, which it fuses into ``QLinearConv`` at load (``ConvInteger``, the dynamic form: ORT's dynamic int8 of
resnet18 ran at 0.17-0.19x dense fp32 with int8 weights, 0.65-0.73x with uint8 weights, on a Xeon with AVX-512
VNNI and AMX, BENCHMARKS.md section 14). QLinearConv needs the scale of its input *and* of its output, so int8
convs need static activation scales, calibrated on sample inputs; consecutive quantized ops (Conv, Relu folded
into the scale, Add, pooling, the channel Gather of a blocked conv) then pass uint8 tensors to each other
without leaving int8. So the int8 conv formulations are not per-layer graphs like the int8 linears
(:mod:`converters.int8`) but one whole-graph pass after the per-layer rewrites:

1. every pruned conv that ``convert`` put in int8 is first rewritten in fp32: ``blocked-int8`` as the fp32
   ``blocked`` graph (Gather of the kept input channels, channels-last so that ORT's NHWC layout needs no
   Transpose around it: :meth:`converters.ops.ConvHandler.blocked`; grouped Conv on the kept blocks),
   ``compact-int8`` as the dense conv;
2. :func:`quantize_qdq` runs ONNX Runtime's ``quantize_static`` (QDQ, per-output-channel symmetric int8
   weights, uint8 activations, MinMax calibration on the inputs given, weights 7-bit on a CPU without VNNI:
   see :func:`converters.int8.default_weight_bits`) over the conv-net ops of the graph (:data:`QDQ_OPS`)
   except the nodes of the pruned linears' own rewrites, whose int8 form is :mod:`converters.int8`'s (ORT's
   quantizer would quantize their block matmuls per tensor, statically, with 10-16 % error);
3. :func:`compact_weights`: the int8 weight of each ``compact-int8`` conv is stored as its kept blocks plus
   block ids (``ConstantOfShape -> ScatterND -> ...`` as :class:`converters.formulations.Compact`), which ORT
   folds back into the constant int8 weight at load; the ``DequantizeLinear`` after it is not folded (ORT
   keeps QDQ pairs for its QDQ fusions), so the conv still runs as ``QLinearConv``.

ORT's grouped QLinearConv gains where the blocked convs have many groups and loses where they have few
(BENCHMARKS.md section 19.3), so ``auto`` times both per layer.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from .errors import ConverterError
from .export import one_line
from .formulations import Compact
from .graph import GraphIndex, prune_unused
from .int8 import Int8Rewrite
from .locate import Site
from .rewrite import Rewrite, apply

#: the op types the QDQ pass quantizes: convolutions and what runs between them in a conv net (ORT has int8
#: kernels for all of them, and Relu / Clip fold into the conv's output scale), and a conv net's unpruned Gemm
#: (its classifier) when its weight is a constant, its output left in float (uint8 logits were further
#: off). Sigmoid and Mul (SiLU, squeeze-excite gates) are in: without them the graph leaves int8 around
#: every gate. HardSwish has no int8 kernel in ORT: ``auto`` keeps mobilenet_v3's convs fp32. MatMul is left
#: out: the pruned linears have their own int8 formulations, and the rest of a transformer is not a conv net.
#: Measured: BENCHMARKS.md section 19.3.
QDQ_OPS = ("Conv", "Gemm", "Relu", "Clip", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat",
           "Gather", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Pad", "Slice",
           "Split", "Sigmoid", "HardSigmoid", "Mul", "LeakyRelu")
#: at most this many rows of calibration input are run (in batches of :data:`CALIBRATION_BATCH`)
CALIBRATION_ROWS = 64
CALIBRATION_BATCH = 16


class _Reader:
    """The CalibrationDataReader protocol (``get_next``) over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def calibration_batches(inputs: dict[str, np.ndarray], rows: int = CALIBRATION_ROWS,
                        batch: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
    """The first ``rows`` rows of ``inputs`` (name -> array, first axis = samples) as feeds of ``batch``
    rows."""
    n = min(rows, min(len(v) for v in inputs.values()))
    return [{k: np.ascontiguousarray(v[i : i + batch]) for k, v in inputs.items()}
            for i in range(0, n, batch)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs advice (pre-processing, opset) on the root logger at WARNING: not for our
    users."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_qdq(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]], nodes: Iterable[str], *,
                 weight_bits: int = 8) -> onnx.ModelProto:
    """``model`` with the nodes named ``nodes`` (those of :data:`QDQ_OPS` types) in ONNX Runtime's QDQ int8
    form: activation scales from running ``calibration`` (MinMax), weights per output channel, ``weight_bits``
    8 or 7 (``reduce_range``). The input is not modified; metadata is kept."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ConverterError("int8 convolutions need calibration inputs (static activation scales)")
    with tempfile.TemporaryDirectory(prefix="sapp_qdq_") as d, _quiet():
        out = Path(d) / "qdq.onnx"
        try:
            src = _copy(model)
            prune_unused(src.graph)  # ORT's calibration session would warn about every unused initializer
            quantize_static(src, out, _Reader(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QDQ_OPS), per_channel=True,
                            reduce_range=weight_bits == 7,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=sorted(set(nodes)), calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           # a Gemm's output stays float (ORT's QGemm has a float output)
                                           "OpTypesToExcludeOutputQuantization": ["Gemm"]})
        except Exception as e:  # noqa: BLE001 -- the quantizer's own errors, reduced to one line
            raise ConverterError("ONNX Runtime's QDQ quantization failed: "
                                 f"{one_line(e)}") from e
        q = onnx.load(str(out))
    del q.metadata_props[:]
    q.metadata_props.extend(model.metadata_props)
    return q


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def _weight_dq(model: onnx.ModelProto, conv_name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear of constant int8 weights feeding the conv named ``conv_name`` (None: not
    quantized)."""
    conv = next((n for n in model.graph.node if n.name == conv_name and n.op_type == "Conv"), None)
    if conv is None:
        return None
    inits = {t.name for t in model.graph.initializer}
    dq = next((n for n in model.graph.node if conv.input[1] in n.output), None)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    return dq


def conv_weight(model: onnx.ModelProto, conv_name: str) -> str | None:
    """The int8 weight initializer of the conv named ``conv_name`` after :func:`quantize_qdq` (None when that
    conv was not quantized)."""
    dq = _weight_dq(model, conv_name)
    return None if dq is None else dq.input[0]


def compact_weights(model: onnx.ModelProto, sites: dict[str, Site]) -> dict[str, Rewrite]:
    """Store the int8 weight of every conv in ``sites`` (conv node name -> its site, weight dense with exact
    zero blocks) as its kept blocks (in place). Returns the compact rewrite per conv name (value tensors,
    bytes)."""
    out = {}
    for conv_name, site in sites.items():
        init_name = conv_weight(model, conv_name)
        if init_name is None:
            continue
        idx = GraphIndex(model.graph)
        q = idx.array(init_name)
        rw = Compact().rewrite(site, idx, values=q, out=init_name, dtype=q.dtype)
        apply(model, rw)
        out[conv_name] = rw
    prune_unused(model.graph)
    return out


def quantized_bytes(model: onnx.ModelProto, conv_name: str) -> tuple[list[str], int]:
    """(value tensors, stored bytes: int8 weight + its scales) of a quantized conv's weight."""
    dq = _weight_dq(model, conv_name)
    if dq is None:
        return [], 0
    inits = {t.name: t for t in model.graph.initializer}
    return [dq.input[0]], sum(onnx.numpy_helper.to_array(inits[i]).nbytes for i in dq.input if i in inits)


#: op types that make a graph more than a conv net: there the QDQ pass quantizes the int8 convs' own nodes
#: only (a transformer's residual Adds and attention Reshapes are not for static per-tensor scales)
NOT_CONV_NET = frozenset({"MatMul", "Softmax", "LayerNormalization", "Einsum", "Attention", "Erf", "Gelu"})


def finish(model: onnx.ModelProto, layers: dict[str, tuple[Site, Int8Rewrite]],
           calibration: list[dict[str, np.ndarray]], *, dense_nodes: Iterable[onnx.NodeProto] = (),
           keep_fp32: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict[str, tuple[list[str], int]]]:
    """Run the QDQ pass over ``model`` after the per-layer rewrites (see the module docstring).

    ``layers``: the int8 convs (layer name -> (site, rewrite)). ``dense_nodes``: the nodes of the dense
    export; when it is a conv net (none of :data:`NOT_CONV_NET`), those of :data:`QDQ_OPS` types are quantized
    too (the rest of the model in int8), except the pruned layers' consumers named in ``keep_fp32`` (convs the
    tool left in an fp32 formulation, and the pruned linears). Returns the model and, per layer, its value
    tensors and stored bytes."""
    dense_nodes = list(dense_nodes)
    nodes = {n for _, rw in layers.values() for n in rw.qdq_nodes}
    if dense_nodes and not any(n.op_type in NOT_CONV_NET for n in dense_nodes):
        keep = set(keep_fp32)
        inits = {t.name for t in model.graph.initializer}
        nodes |= {n.name for n in dense_nodes if n.op_type in QDQ_OPS and n.name and n.name not in keep
                  and (n.op_type != "Gemm" or (len(n.input) > 1 and n.input[1] in inits))}
    q = quantize_qdq(model, calibration, nodes, weight_bits=min(rw.weight_bits for _, rw in layers.values()))
    compact = {rw.qdq_convs[0]: site for site, rw in layers.values() if rw.fmt == "compact-int8"}
    packed = compact_weights(q, compact)
    out = {}
    for name, (site, rw) in layers.items():
        values, size = [], 0
        for conv in rw.qdq_convs:
            if conv in packed:
                values += packed[conv].value_tensors
                size += packed[conv].stored_bytes
            else:
                v, b = quantized_bytes(q, conv)
                if not v:
                    raise ConverterError(f"{name}: ONNX Runtime's QDQ pass left conv {conv} unquantized")
                values += v
                size += b
        out[name] = (values, size)
    return q, out
