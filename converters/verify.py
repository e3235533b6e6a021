"""Checks on the final bytes: the ONNX checker, then the current runtime (:mod:`converters.runtimes`; ONNX
Runtime with its graph optimizations off and on, or OpenVINO) against the pruned PyTorch model's outputs on
real inputs.

An output passes when ``max|onnx - torch| <= atol + rtol * max|torch|``: the relative part is scaled to the
output's magnitude, so logits of size 30 and probabilities of size 1 get comparable tolerances. Top-1
agreement is reported for classifiers; it gates only when a floor is given (``min_top1``: a near-tie may flip
legitimately, so a caller sets it where the tolerance is loose, as for int8).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .errors import VerificationError
from .export import one_line
from .runtime import run_onnx, session
from .runtimes import current, reference_session


@dataclass(frozen=True)
class Verification:
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None
    passed: bool
    atol: float
    rtol: float
    per_session: dict
    min_top1_agreement: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _compare(outs, expected, atol: float, rtol: float) -> tuple[list[dict], bool]:
    """Per output: max |out - expected| and that over max |expected|; passed when every output has
    ``max|diff| <= atol + rtol * max|expected|``."""
    rows, ok = [], True
    for o, e in zip(outs, expected):
        o, e = np.asarray(o, np.float64), np.asarray(e, np.float64)
        d = float(np.max(np.abs(o - e))) if o.size else 0.0
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        rows.append({"max_abs_diff": d, "max_rel_diff": d / scale if scale > 0
                     else (0.0 if d == 0 else float("inf"))})
        ok &= d <= atol + rtol * scale
    return rows, ok


def check(model: onnx.ModelProto | bytes) -> onnx.ModelProto:
    """``onnx.checker.check_model(full_check=True)`` on the serialised model; raises VerificationError."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerificationError(f"the ONNX checker rejects the model: {one_line(e)}") from None
    return proto


def verify(model: onnx.ModelProto | bytes, inputs: dict[str, np.ndarray], expected: list[np.ndarray], *,
           atol: float = 1e-4, rtol: float = 1e-3, classifier: bool = False, threads: int | None = None,
           min_top1: float | None = None, batch_size: int = 256) -> Verification:
    """Compare the current runtime's sessions (ORT: optimizations disabled, then enabled; its
    ``verify_modes``) with ``expected``. Raises VerificationError
    (carrying the :class:`Verification`) when any output of either session is out of tolerance, or, for a
    classifier with ``min_top1``, when the top-1 agreement with ``expected`` (the worse session's, over the
    rows and positions of the first output) is below it. The runtime runs ``batch_size`` rows at a time."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    check(data)
    per = {}
    worst_abs, worst_rel, agree = 0.0, 0.0, None
    ok = True
    rt = current()
    for label, opt in rt.verify_modes:
        sess = session(data, threads=threads, optimize=opt)
        outs = run_onnx(data, inputs, sess=sess, batch_size=batch_size)
        if len(outs) != len(expected):
            raise VerificationError(f"ONNX model has {len(outs)} outputs, PyTorch {len(expected)}")
        for o, e in zip(outs, expected):
            if np.shape(o) != np.shape(e):
                raise VerificationError(f"output shape {np.shape(o)} differs from PyTorch's {np.shape(e)}")
        rows, passed = _compare(outs, expected, atol, rtol)
        ok &= passed
        worst_abs = max([worst_abs, *(r["max_abs_diff"] for r in rows)])
        worst_rel = max([worst_rel, *(r["max_rel_diff"] for r in rows)])
        if classifier and expected[0].ndim >= 2 and expected[0].shape[-1] > 1:
            a = float(np.mean(outs[0].argmax(-1) == expected[0].argmax(-1)))
            agree = a if agree is None else min(agree, a)
        per[label] = rows
    floor = min_top1 if agree is not None else None
    top1_ok = floor is None or agree >= floor
    result = Verification(worst_abs, worst_rel, agree, bool(ok and top1_ok), atol, rtol, per, floor)
    if not ok:
        raise VerificationError(
            f"{rt.title} differs from the pruned PyTorch model: max abs diff {worst_abs:.3g}, max rel diff "
            f"{worst_rel:.3g} (tolerance atol {atol:g} + rtol {rtol:g} x max|output|)", result)
    if not top1_ok:
        raise VerificationError(
            f"{rt.title}'s top-1 agrees with the pruned PyTorch model on {agree:.3f} of the rows, below "
            f"the floor {floor:g} (max abs diff {worst_abs:.3g} is within tolerance)", result)
    return result


def float_reference(model: onnx.ModelProto | bytes) -> onnx.ModelProto:
    """``model`` with every ``MatMulInteger`` computed in float: ``(float(A) - float(a_zero)) @ (float(B) -
    float(b_zero))``, cast to int32. Exact (an int32 sum of u8 x s8 products stays within float32's 24-bit
    mantissa up to a few thousand terms, and rounds by ~1e-7 relative beyond), so it is the integer matmul's
    definition, free of the kernels' int16 pair sums that saturate on a CPU without VNNI."""
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(onnx.load_from_string(model) if isinstance(model, bytes) else model)
    nodes = []
    for i, n in enumerate(m.graph.node):
        if n.op_type != "MatMulInteger" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        ins = list(n.input) + [""] * (4 - len(n.input))
        f = []
        for j, (x, z) in enumerate(((ins[0], ins[2]), (ins[1], ins[3]))):
            xf = f"{n.output[0]}__ref{i}_{j}"
            nodes.append(helper.make_node("Cast", [x], [xf], to=TensorProto.FLOAT))
            if z:
                zf, xs = xf + "_z", xf + "_s"
                nodes.append(helper.make_node("Cast", [z], [zf], to=TensorProto.FLOAT))
                nodes.append(helper.make_node("Sub", [xf, zf], [xs]))
                xf = xs
            f.append(xf)
        mm = f"{n.output[0]}__ref{i}_mm"
        nodes.append(helper.make_node("MatMul", f, [mm]))
        nodes.append(helper.make_node("Cast", [mm], [n.output[0]], to=TensorProto.INT32))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def verify_kernels(model: onnx.ModelProto | bytes, inputs: dict[str, np.ndarray], *, atol: float = 1e-4,
                   rtol: float = 0.02, threads: int | None = None, batch_size: int = 256) -> Verification:
    """An int8 model's integer kernels against its own quantization reference.

    The reference is the model run by ONNX Runtime with graph optimizations off, op by op as written, with its
    integer matmuls in float (:func:`float_reference`): QuantizeLinear / DequantizeLinear and the float op
    between them, DynamicQuantizeLinear: the fake-quantized computation the stored scales define. The model
    itself runs in the current runtime, optimizations on: the fused integer kernels it deploys (ORT's
    QLinearConv, QGemm, MatMulIntegerToFloat, ...; OpenVINO's int8 kernels). The two differ only by
    requantization rounding (a quantization step here and there), so a larger difference is a wrong kernel
    or fusion: e.g. the int16 saturation of u8 x s8 products on a CPU without VNNI. Passes when
    ``max|model - reference| <= atol + rtol * max|reference|`` on every output. Raises VerificationError."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    ref_data = float_reference(data).SerializeToString()
    ref = run_onnx(ref_data, inputs, sess=reference_session(ref_data, threads=threads),
                   batch_size=batch_size)
    got = run_onnx(data, inputs, sess=session(data, threads=threads, optimize=True), batch_size=batch_size)
    rows, ok = _compare(got, ref, atol, rtol)
    worst_abs = max([0.0, *(r["max_abs_diff"] for r in rows)])
    worst_rel = max([0.0, *(r["max_rel_diff"] for r in rows)])
    agree = None
    if ref and ref[0].ndim >= 2 and ref[0].shape[-1] > 1:
        agree = float(np.mean(np.asarray(got[0]).argmax(-1) == np.asarray(ref[0]).argmax(-1)))
    result = Verification(worst_abs, worst_rel, agree, bool(ok), atol, rtol,
                          {"optimizations_on_vs_off": rows})
    if not result.passed:
        raise VerificationError(
            f"{current().title}'s int8 kernels differ from the model's own quantization reference: max abs "
            f"diff {worst_abs:.3g}, max rel diff {worst_rel:.3g} (tolerance atol {atol:g} + rtol {rtol:g} x "
            "max|reference|)",
            result)
    return result
