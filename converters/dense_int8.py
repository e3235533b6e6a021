"""int8 of a whole dense graph in the current runtime's own forms (:mod:`converters.runtimes`), the fastest
measured on this machine.

A structurally pruned model is a smaller *dense* model: ONNX Runtime runs it fastest with its own dense int8
kernels, so the question is only which of its int8 forms to use, and that differs between models and CPUs.
The forms (:data:`FORMS`), each a whole-graph pass:

- ``dynamic``: ``quantize_dynamic``: weights int8 per output channel (7-bit on a CPU without VNNI:
  :func:`converters.int8.default_weight_bits`), activations quantized per batch at run time
  (``DynamicQuantizeLinear -> MatMulInteger``, which ORT fuses); MatMul, Gather (embedding tables) and
  attention ops. ``Gemm`` nodes with constant weights are first written as ``MatMul + Add`` so they are
  covered too (ORT's dynamic quantizer skips Gemm). Convs are left fp32: ORT's dynamic ``ConvInteger`` ran at
  0.17-0.73x fp32 on resnet18 (BENCHMARKS.md section 14).
- ``static``: ``quantize_static`` in QDQ form with activation scales calibrated on sample inputs
  (:func:`converters.qdq.quantize_qdq`, the conv-net op set: ``QLinearConv`` and what runs between convs).
  Only offered when the graph has convolutions and calibration inputs are given.
- ``nncf`` (OpenVINO's form): NNCF's post-training int8 (QDQ ONNX, activation scales calibrated on the
  calibration inputs): :func:`converters.runtimes.openvino.nncf_int8`.

Which forms a runtime offers is its ``int8_forms`` (ORT: ``dynamic``, ``static``; OpenVINO: ``nncf``,
``dynamic``). A form the runtime cannot build or run is left out of the timing, its error in the reason.

:func:`quantize_whole` builds every applicable form, times each against the fp32 graph interleaved in one
process (median of rounds) at the timing inputs, and keeps the fastest; an int8 form slower than fp32 is not
kept (the result is then the fp32 graph, with the reason).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .cache import TimingCache, TimingKey
from .errors import ConverterError
from .export import one_line
from .int8 import default_weight_bits
from .qdq import QDQ_OPS, _quiet, calibration_batches, quantize_qdq
from .runtime import session, time_interleaved
from .runtimes import current
from .timing import graph_digest, shapes_text


@dataclass
class WholeInt8:
    """The chosen graph and how it was chosen.

    Attributes:
        form: ``dynamic``, ``static``, ``nncf`` or ``fp32`` (no int8 form was faster).
        latencies_ms: median latency of every form timed, ``fp32`` included (empty without timing).
        reason: why this form.
    """

    model: onnx.ModelProto
    form: str
    weight_bits: int
    latencies_ms: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def to_json(self) -> dict:
        return {"form": self.form, "weight_bits": self.weight_bits, "latencies_ms": self.latencies_ms,
                "reason": self.reason}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Gemm(x, W, b)`` with a constant ``W`` (alpha = beta = 1, no transposed ``x``) as ``MatMul(x, W^T) +
    b``: the same function, in the op ORT's dynamic quantizer covers."""
    m = _copy(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for node in m.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or a.get("transA", 0)
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if a.get("transB", 0):
            w = w.T
        wname = f"{node.input[1]}__kxn"
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
        out = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}__mm"
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [out], name=f"{node.name}_matmul"))
        if out != node.output[0]:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]],
                                          name=f"{node.name}_bias"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _dynamic(model: onnx.ModelProto, calibration, bits: int) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = gemm_as_matmul(model)
    with tempfile.TemporaryDirectory(prefix="sapp_dyn_") as d, _quiet():
        inp, out = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(src, str(inp))
        try:
            quantize_dynamic(str(inp), str(out), per_channel=True, reduce_range=bits == 7,
                             weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gather", "Attention",
                                                   "EmbedLayerNormalization"],
                             extra_options={"WeightSymmetric": True})
        except Exception as e:  # noqa: BLE001 -- the quantizer's own errors, in one line
            raise ConverterError("ONNX Runtime's dynamic quantization failed: "
                                 f"{one_line(e)}") from e
        q = onnx.load(str(out))
    del q.metadata_props[:]
    q.metadata_props.extend(model.metadata_props)
    return q


def _static(model: onnx.ModelProto, calibration, bits: int) -> onnx.ModelProto:
    nodes = [n.name for n in model.graph.node if n.op_type in QDQ_OPS]
    return quantize_qdq(model, calibration, nodes, weight_bits=bits)


def _nncf(model: onnx.ModelProto, calibration, bits: int) -> onnx.ModelProto:
    from .runtimes.openvino import nncf_int8

    return nncf_int8(model, calibration, bits)


def _has_conv(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "Conv" for n in model.graph.node)


#: form -> (builder(model, calibration batches, weight bits), why it does not apply or None)
FORMS: dict[str, tuple[Callable, Callable[[onnx.ModelProto, list | None], str | None]]] = {
    "dynamic": (_dynamic, lambda m, c: None
                if any(n.op_type in ("MatMul", "Gemm", "Gather") for n in m.graph.node)
                else "no MatMul, Gemm or Gather to quantize"),
    "static": (_static, lambda m, c: None if _has_conv(m) and c else
               ("no convolution (the static form is the conv-net one)" if not _has_conv(m)
                else "needs calibration inputs")),
    "nncf": (_nncf, lambda m, c: None if c else "needs calibration inputs"),
}


def quantize_whole(model: onnx.ModelProto, *, timing_inputs: dict[str, np.ndarray] | None = None,
                   calibration_inputs: dict[str, np.ndarray] | None = None, threads: int | None = None,
                   forms: tuple[str, ...] | None = None, weight_bits: int | None = None,
                   cache: TimingCache | None = None, form: str | None = None) -> WholeInt8:
    """The fastest of ``model`` (fp32) and its int8 forms (:data:`FORMS`) at ``timing_inputs``. Without timing
    inputs every applicable form is built (a dry run) and the first is returned untimed; with ``form`` that
    form is built untimed (a replay). The timings go through ``cache`` (kind ``whole_int8``: the graph's
    digest, the timing shapes, the forms, the weight bits, the threads, the machine, the runtime), so the same
    graph on the same machine gets the same choice, without timing.

    Raises:
        ConverterError: no int8 form applies, or the quantizer (ORT's, NNCF's) fails.
    """
    bits = weight_bits or default_weight_bits()
    calibration = calibration_batches(calibration_inputs) if calibration_inputs else None
    why_not = {}
    applicable = []
    for name in forms or current().int8_forms:
        why = FORMS[name][1](model, calibration)
        if why is None:
            applicable.append(name)
        else:
            why_not[name] = why
    if not applicable:
        raise ConverterError("no int8 form applies: " + "; ".join(f"{k}: {v}" for k, v in why_not.items()))
    build = lambda name: FORMS[name][0](model, calibration, bits)  # noqa: E731
    if form is not None:
        return WholeInt8(model if form == "fp32" else build(form), form, bits, reason="replayed")
    if not timing_inputs:
        built = {name: build(name) for name in applicable}  # every form must build (the pre-check's dry run)
        return WholeInt8(built[applicable[0]], applicable[0], bits, reason="not timed")
    key = TimingKey("whole_int8", graph_digest(model),
                    shapes_text([list(v.shape) for v in timing_inputs.values()]),
                    str(len(next(iter(timing_inputs.values())))), "", ",".join(applicable), f"int8/w{bits}",
                    int(threads or 0))
    hit = cache.get(key) if cache is not None else None
    built: dict[str, onnx.ModelProto] = {}
    failed: dict[str, str] = {}
    if hit is None:
        sessions = {"fp32": session(model, threads=threads, spin=False)}
        for name in applicable:  # a form the runtime cannot build or run is left out, with the reason
            try:
                built[name] = build(name)
                sessions[name] = session(built[name], threads=threads, spin=False)
                sessions[name].run(None, timing_inputs)
            except Exception as e:  # noqa: BLE001 -- the quantizer's or the runtime's own errors
                failed[name] = one_line(e)[:200]
                sessions.pop(name, None)
        lat = {k: round(v, 4) for k, v in time_interleaved(sessions, timing_inputs).items()}
        if failed:
            lat["failed"] = failed
        if cache is not None:
            cache.put(key, lat)
    else:
        lat = hit
    failed = lat.get("failed") or {}
    lat = {k: v for k, v in lat.items() if k != "failed"}
    timed = [k for k in applicable if k in lat]
    why_failed = "".join(f"; {k} failed: {v}" for k, v in failed.items())
    if not timed:
        return WholeInt8(model, "fp32", bits, lat, f"no int8 form could run here{why_failed}")
    best = min(timed, key=lambda k: (lat[k], k))
    if lat[best] >= lat["fp32"]:
        return WholeInt8(model, "fp32", bits, lat,
                         f"no int8 form was faster than fp32 here ({_seen(lat)}){why_failed}")
    chosen = built.get(best) or build(best)
    return WholeInt8(chosen, best, bits, lat, f"fastest measured ({_seen(lat)}){why_failed}")


def _seen(lat: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(lat.items(), key=lambda kv: kv[1]))


__all__ = ["FORMS", "WholeInt8", "gemm_as_matmul", "quantize_whole"]
