"""int8 block-sparse linears: the kept blocks stored as int8, computed with ONNX Runtime's integer GEMMs.

Notation as in :mod:`converters.ops`: W [O, I], blocks br x bc, kept grid [R, C], N rows of activations.

The layer input is quantized **once** (uint8, before the Gather that replicates it ``R*k/C`` times), the
int8 weight blocks stay constants, one batched integer matmul runs per chunk of block-rows (chunks of the
buckets of :func:`converters.ops.buckets`, cut by :func:`converters.ops.chunk_rows`), and one rescale
follows. Graph forms (``layout``, :data:`LAYOUTS`), same numbers; their measured speeds are in BENCHMARKS.md
section 18:

``"row"`` (default: weights the constant *second* input, which ORT pre-packs once at load)::

    x [N, I] -DynamicQuantizeLinear-> xq u8, s_x, z_x
    xq -Transpose-> [I, N] -Reshape-> [C, bc, N] -Gather(axis 0, cols [Rb, k])-> -Reshape-> [Rb, k*bc, N]
      -Transpose-> [Rb, N, k*bc]
    MatMulInteger(., Wq^T [Rb, k*bc, br] int8, z_x, 0) -> int32
      -Cast-> -Mul(s_x * s_w [Rb, 1, br])-> [Rb, N, br]
    Concat(chunks) -Gather(row order)-> -Transpose-> [N, R, br] -Reshape-> [N, O]

Standard ONNX ops only (opset 18): ONNX Runtime fuses each MatMulInteger -> Cast -> Mul into its
``com.microsoft.MatMulIntegerToFloat`` (u8 x s8, per-column scale [Rb, 1, br]) when it loads the model.
``"row-ms"`` writes that op directly (the model then needs the ``com.microsoft`` opset import:
:func:`ensure_ms_opset`).

``"row-g1"``: the same matmuls, its input gathered from ``xq [N, C, bc]`` on axis 1 (``[N, Rb, k, bc]``, then
a Transpose of whole rows).

``"feature"`` / ``"feature-u8"`` (activations feature-major, weights the constant *first* input)::

    xq -Transpose-> [I, N] -Reshape-> [C, bc, N] -Gather(axis 0)-> -Reshape-> [Rb, k*bc, N]
    MatMulInteger(Wq [Rb, br, k*bc], ., a_zero_point, z_x) -> int32 [Rb, br, N]
    Concat -Cast float-> -Gather(row order)-> -Reshape [O, N]-> -Mul(s_w [O, 1] * s_x)-> -Transpose->

``"feature"`` stores int8 weights (S8 x U8), ``"feature-u8"`` uint8 weights ``q + 128`` (zero point 128,
MLAS's U8U8 kernel); both are slower than ``row`` (no fast S8 x U8 kernel; ORT packs the first input on every
call). ORT's MatMulIntegerToFloat needs a uint8 first input (1.32), so it cannot serve the feature forms;
worse, ORT fuses MatMulInteger -> Cast -> Mul into it regardless of the input types, and the session then
fails to load for int8 weights: the feature forms rescale after a Reshape, which the fusion does not match.

Weights: symmetric, one scale per output row (max |w| over the row's kept blocks / q_max), q in
[-q_max, q_max]. **Saturation**: without VNNI (AVX2 only), MLAS multiplies u8 x s8 pairs with
``vpmaddubsw``, whose int16 sum of two products saturates when ``2 * 255 * |q| > 32767``; q_max = 127
then gives wrong answers (BENCHMARKS.md section 18). With q_max = 63 (7-bit weights, ORT's ``reduce_range``)
``2 * 255 * 63 = 32130`` fits: exact. So
:func:`default_weight_bits` reads the CPU flags: 8 bits with ``avx512_vnni`` / ``avx_vnni`` (the VNNI kernels
accumulate in int32), 7 bits otherwise. The choice is recorded in :class:`Int8Rewrite` and in the node names.

Activations: ``dynamic`` (DynamicQuantizeLinear: per-tensor uint8, scale (max(x,0) - min(x,0)) / 255, as ORT's
quantize_dynamic does) or ``static`` (QuantizeLinear with a scale / zero point calibrated by
:func:`calibrate_activation` from sample inputs; values outside the calibrated range saturate).

Error (dynamic, per output ``y_o = sum_i w_oi x_i``): with ``x = s_x (xq - z_x) + e_x``, ``|e_x| <= s_x / 2``,
and ``w = s_w[o] q + e_w``, ``|e_w| <= s_w[o] / 2``:
``|y_o - y_hat_o| <= sum_i (|w_oi| s_x / 2 + |x_i| s_w[o] / 2 + s_x s_w[o] / 4)`` over the kept inputs of row
o (plus float32 rounding of the rescale). The integer accumulation itself is exact (int32, and no saturation
with the bit width chosen above). :func:`error_bound` computes this bound for given inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from .formulations import FORMULATIONS, Formulation
from .graph import GraphIndex, const_i64
from .locate import Site, shared_reason
from .machine import cpu_flags, has_vnni  # noqa: F401 -- cpu_flags: re-exported for the benchmarks
from .ops import OP_HANDLERS, REFERENCE_BATCH, _Builder, _gather_plan, buckets, chunk_rows
from .rewrite import Rewrite

MS_DOMAIN = "com.microsoft"
LAYOUTS = ("row", "row-ms", "row-g1", "feature", "feature-u8")
#: the default graph form; chosen by bench/int8_speed.py's variant comparison (see the module docstring there;
#: BENCHMARKS.md section 18)
DEFAULT_LAYOUT = "row"
#: the batch the chunks of block-rows are sized for (see :func:`converters.ops.chunk_rows`, which counts 4
#: bytes a value: at uint8 a chunk's gathered activations take a quarter of CHUNK_BYTES at this batch);
#: measured against 8 and 32 (BENCHMARKS.md section 18)
CHUNK_REF = REFERENCE_BATCH // 2


def default_weight_bits(flags: frozenset[str] | None = None) -> int:
    """8 where the CPU has VNNI (int32 accumulation), else 7 (no int16 saturation in the AVX2 u8 x s8 kernel).

    An unknown CPU (no ``/proc/cpuinfo``: another OS or architecture) gets 7: exact on every kernel."""
    return 8 if has_vnni(flags) else 7


def quantize_rows(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization of ``w [rows, cols]``: (q int8 [rows, cols], scale float32 [rows]).

    ``scale = max|w_row| / q_max`` (q_max = 2**(bits-1) - 1), ``q = round(w / scale)`` (ties to even, as
    numpy); an all-zero row gets scale 1 and q = 0."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=1).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def calibrate_activation(samples: np.ndarray) -> tuple[np.float32, np.uint8]:
    """(scale, zero point) for uint8 activations covering ``samples``' range widened to include 0, with the
    formula of ONNX's DynamicQuantizeLinear (so static = dynamic when the range is the same)."""
    lo = min(float(np.min(samples)), 0.0)
    hi = max(float(np.max(samples)), 0.0)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    zp = np.uint8(np.clip(np.rint(-lo / float(scale)), 0, 255))
    return scale, zp


def error_bound(x: np.ndarray, w: np.ndarray, bits: int, x_scale: float | None = None) -> np.ndarray:
    """Bound on |y_int8 - x @ w.T| per output ([N, O]) for dynamic quantization of ``x [N, I]`` (its scale
    from its own range unless ``x_scale`` is given) and per-row ``bits``-bit weights (see the module
    docstring). Float32 rounding of the fp32 reference and the rescale is not included."""
    if x_scale is None:
        x_scale = float(calibrate_activation(x)[0])
    _, sw = quantize_rows(w, bits)
    nz = (w != 0).astype(np.float64)
    ax, aw = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64)
    return (aw.sum(axis=1)[None, :] * x_scale / 2 + (ax @ nz.T) * sw[None, :].astype(np.float64) / 2
            + nz.sum(axis=1)[None, :] * x_scale * sw[None, :] / 4)


@dataclass
class Int8Rewrite(Rewrite):
    """A :class:`Rewrite` with what the int8 formulation chose: ``weight_bits`` (8, or 7 against the AVX2
    saturation), ``activation`` (``"dynamic"`` or ``"static"``, with ``act_scale`` / ``act_zero_point`` when
    static), ``layout`` (one of :data:`LAYOUTS`), ``kernel`` (the integer op type written:
    MatMulIntegerToFloat for ``row-ms``, MatMulInteger otherwise, which ORT fuses to MatMulIntegerToFloat in
    the row forms) and ``vnni`` (what the CPU flags said when it was built)."""

    weight_bits: int = 8
    activation: str = "dynamic"
    act_scale: float | None = None
    act_zero_point: int | None = None
    layout: str = DEFAULT_LAYOUT
    kernel: str = ""
    vnni: bool = False
    #: convs (:mod:`converters.qdq`): the nodes ORT's QDQ pass is to quantize for this layer, and its conv
    #: nodes
    qdq_nodes: list[str] = field(default_factory=list)
    qdq_convs: list[str] = field(default_factory=list)


def blocked_int8(site: Site, idx: GraphIndex, *, weight_bits: int | None = None, layout: str = DEFAULT_LAYOUT,
                 act: tuple[float, int] | None = None, chunk_ref: int | None = None) -> Int8Rewrite:
    """The int8 block-sparse rewrite of one linear ``site`` (Gemm x W^T + b, or MatMul on a 2-D or N-D input).

    ``weight_bits``: 8 or 7 (default: :func:`default_weight_bits`). ``layout``: one of :data:`LAYOUTS` (module
    docstring). ``act``: ``(scale, zero_point)`` for static activation quantization (QuantizeLinear),
    None for dynamic (DynamicQuantizeLinear). ``chunk_ref``: the batch the chunks are sized for (default
    :data:`CHUNK_REF`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    bits = default_weight_bits() if weight_bits is None else int(weight_bits)
    if bits not in (7, 8):
        raise ValueError(f"weight_bits: expected 7 or 8, got {bits}")
    lb, node = site.layer, site.node
    w = site.weight
    O, I = w.shape
    br, bc = lb.block
    R, C = lb.kept.shape
    b = _Builder(idx, f"{site.init_name}_i8w{bits}")
    x = node.input[0]
    nd_input = node.op_type == "MatMul"
    if nd_input:  # [*, I] -> [M, I]; the leading shape comes back at the end
        x, out_shape = b.flatten_leading(x, I, O)
    # quantize the input once
    if act is None:
        xq, xs, xz = (b.name(s) for s in ("xq", "xscale", "xzp"))
        b.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz],
                                        name=b.name("DynamicQuantizeLinear")))
    else:
        xs = b.const("xscale", np.asarray(act[0], dtype=np.float32))
        xz = b.const("xzp", np.asarray(act[1], dtype=np.uint8))
        xq = b.node("QuantizeLinear", [x, xs, xz])
    # weights: symmetric per output row, rows of the kept blocks only (pruned blocks are exact zeros)
    q, sw = quantize_rows(w, bits)
    qv = q.reshape(R, br, C, bc)
    groups = chunk_rows(buckets(lb.kept.sum(axis=1)), lb.kept, bc, chunk_ref or CHUNK_REF)
    order = np.concatenate(groups)
    outs = []
    if layout in ("feature", "feature-u8"):
        xt = b.node("Transpose", [xq], perm=[1, 0])
        src = b.node("Reshape", [xt, b.const("cbn", const_i64([C, bc, -1]))])
        u8 = layout == "feature-u8"  # weights stored q + 128 (uint8, zero point 128): MLAS's U8U8 kernel
        zero = b.const("wzp", np.asarray(128 if u8 else 0, dtype=np.uint8 if u8 else np.int8))
        for gi, rows in enumerate(groups):
            cols, valid = _gather_plan(lb.kept, rows)
            k = cols.shape[1]
            wg = qv[rows[:, None], :, cols, :]  # [Rb, k, br, bc]
            wg = np.where(valid[:, :, None, None], wg, 0).transpose(0, 2, 1, 3).reshape(len(rows), br, k * bc)
            g = b.node("Gather", [src, b.const(f"cols{gi}", cols)], axis=0)
            g = b.node("Reshape", [g, b.const(f"rkn{gi}", const_i64([len(rows), k * bc, -1]))])
            wg = (wg.astype(np.int16) + 128).astype(np.uint8) if u8 else wg.astype(np.int8)
            wname = b.const(f"w{gi}", wg, weights=True)
            outs.append(b.node("MatMulInteger", [wname, g, zero, xz]))
        o = outs[0] if len(outs) == 1 else b.node("Concat", outs, axis=0)  # int32 [R', br, N]
        o = b.node("Cast", [o], to=onnx.TensorProto.FLOAT)
        if not np.array_equal(order, np.arange(R)):
            o = b.node("Gather", [o, b.const("row_order", np.argsort(order).astype(np.int64))], axis=0)
        o = b.node("Reshape", [o, b.const("on", const_i64([O, -1]))])
        # the rescale comes after the Reshape: ORT 1.32 fuses MatMulInteger -> Cast -> Mul into
        # MatMulIntegerToFloat, which has no kernel for an int8 first input (session creation fails)
        o = b.node("Mul", [o, b.node("Mul", [b.const("wscale", sw.reshape(O, 1)), xs])])
        y = b.node("Transpose", [o], perm=[1, 0])
        kernel = "MatMulInteger"
    else:
        if layout == "row-g1":
            src = b.node("Reshape", [xq, b.const("ncb", const_i64([-1, C, bc]))])
        else:
            src = b.node("Reshape",
                         [b.node("Transpose", [xq], perm=[1, 0]), b.const("cbn", const_i64([C, bc, -1]))])
        swv = sw.reshape(R, br)
        for gi, rows in enumerate(groups):
            cols, valid = _gather_plan(lb.kept, rows)
            k = cols.shape[1]
            wg = qv[rows[:, None], :, cols, :]  # [Rb, k, br, bc]
            wg = np.where(valid[:, :, None, None], wg, 0).transpose(0, 1, 3, 2).reshape(len(rows), k * bc, br)
            if layout == "row-g1":
                g = b.node("Gather", [src, b.const(f"cols{gi}", cols)], axis=1)  # [N, Rb, k, bc]
                g = b.node("Reshape", [g, b.const(f"nrk{gi}", const_i64([0, len(rows), k * bc]))])
                g = b.node("Transpose", [g], perm=[1, 0, 2])  # [Rb, N, k*bc]
            else:
                g = b.node("Gather", [src, b.const(f"cols{gi}", cols)], axis=0)  # [Rb, k, bc, N]
                g = b.node("Reshape", [g, b.const(f"rkn{gi}", const_i64([len(rows), k * bc, -1]))])
                g = b.node("Transpose", [g], perm=[0, 2, 1])  # [Rb, N, k*bc]
            wname = b.const(f"w{gi}", np.ascontiguousarray(wg.astype(np.int8)), weights=True)
            ws = b.const(f"wscale{gi}", swv[rows].reshape(len(rows), 1, br))
            if layout != "row-ms":
                acc = b.node("MatMulInteger", [g, wname, xz, b.const(f"wzp{gi}", np.asarray(0, np.int8))])
                out = b.node("Mul",
                             [b.node("Cast", [acc], to=onnx.TensorProto.FLOAT), b.node("Mul", [xs, ws])])
            else:
                out = b.name("mitf")
                b.nodes.append(helper.make_node("MatMulIntegerToFloat", [g, wname, xs, ws, xz], [out],
                                                name=b.name("MatMulIntegerToFloat"), domain=MS_DOMAIN))
            outs.append(out)  # [Rb, N, br] float
        o = outs[0] if len(outs) == 1 else b.node("Concat", outs, axis=0)
        if not np.array_equal(order, np.arange(R)):
            o = b.node("Gather", [o, b.const("row_order", np.argsort(order).astype(np.int64))], axis=0)
        o = b.node("Transpose", [o], perm=[1, 0, 2])  # [N, R, br]
        y = b.node("Reshape", [o, b.const("no", const_i64([-1, O]))])
        kernel = "MatMulIntegerToFloat" if layout == "row-ms" else "MatMulInteger"
    final = node.output[0]
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    if has_bias:
        y = b.node("Add", [y, node.input[2]])
    if nd_input:
        y = b.node("Reshape", [y, out_shape])
    # the last node writes the layer's output name
    b.nodes[-1].output[0] = final
    drop = [site.via_transpose] if site.via_transpose is not None else []
    return Int8Rewrite("blocked-int8", nodes=b.nodes, inits=b.inits, replace_node=node, drop_nodes=drop,
                       drop_init=site.init_name, value_tensors=b.value_tensors, stored_bytes=b.stored,
                       weight_bits=bits, activation="dynamic" if act is None else "static",
                       act_scale=None if act is None else float(act[0]),
                       act_zero_point=None if act is None else int(act[1]), layout=layout, kernel=kernel,
                       vnni=has_vnni())


def compact_int8(site: Site, idx: GraphIndex, *, weight_bits: int | None = None,
                 act: tuple[float, int] | None = None) -> Int8Rewrite:
    """Kept blocks stored as int8, computed dense: the int8 counterpart of the ``compact`` formulation.

    ``ConstantOfShape(int8 0) -> ScatterND(kept blocks, unique block ids) -> Reshape -> Transpose -> Reshape``
    rebuilds the dense int8 ``W^T [I, O]`` (ONNX Runtime constant-folds it at load and pre-packs it), then
    ``DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(s_x * s_w [O])`` (+ bias), which ORT fuses into
    its DynamicQuantizeMatMul: the dense int8 speed of ``quantize_dynamic`` (per channel) with the
    block-sparse file. Works on 2-D and N-D inputs (MatMulInteger broadcasts)."""
    bits = default_weight_bits() if weight_bits is None else int(weight_bits)
    lb, node = site.layer, site.node
    w = site.weight
    O, I = w.shape
    br, bc = lb.block
    R, C = lb.kept.shape
    b = _Builder(idx, f"{site.init_name}_i8cw{bits}")
    q, sw = quantize_rows(w, bits)
    rc = np.argwhere(lb.kept)  # row-major: unique, sorted
    blocks = np.ascontiguousarray(q.reshape(R, br, C, bc).transpose(0, 2, 1, 3)[rc[:, 0], rc[:, 1]])
    bname = b.const("blocks", blocks.astype(np.int8), weights=True)
    ids = b.const("block_idx", (rc[:, 0] * C + rc[:, 1]).astype(np.int64)[:, None])
    zeros = b.name("zeros")
    b.nodes.append(helper.make_node("ConstantOfShape", [b.const("grid", const_i64([R * C, br, bc]))], [zeros],
                                    name=b.name("ConstantOfShape"),
                                    value=helper.make_tensor("v", onnx.TensorProto.INT8, [1], [0])))
    wt = b.node("ScatterND", [zeros, ids, bname])  # unique indices: no reduction
    wt = b.node("Reshape", [wt, b.const("rcbb", const_i64([R, C, br, bc]))])
    wt = b.node("Transpose", [wt], perm=[1, 3, 0, 2])  # [C, bc, R, br]
    wt = b.node("Reshape", [wt, b.const("io", const_i64([I, O]))])
    if act is None:
        xq, xs, xz = (b.name(s) for s in ("xq", "xscale", "xzp"))
        b.nodes.append(helper.make_node("DynamicQuantizeLinear", [node.input[0]], [xq, xs, xz],
                                        name=b.name("DynamicQuantizeLinear")))
    else:
        xs = b.const("xscale", np.asarray(act[0], dtype=np.float32))
        xz = b.const("xzp", np.asarray(act[1], dtype=np.uint8))
        xq = b.node("QuantizeLinear", [node.input[0], xs, xz])
    acc = b.node("MatMulInteger", [xq, wt, xz, b.const("wzp", np.asarray(0, np.int8))])
    y = b.node("Mul",
               [b.node("Cast", [acc], to=onnx.TensorProto.FLOAT), b.node("Mul", [xs, b.const("wscale", sw)])])
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        y = b.node("Add", [y, node.input[2]])
    b.nodes[-1].output[0] = node.output[0]
    drop = [site.via_transpose] if site.via_transpose is not None else []
    return Int8Rewrite("compact-int8", nodes=b.nodes, inits=b.inits, replace_node=node, drop_nodes=drop,
                       drop_init=site.init_name, value_tensors=b.value_tensors, stored_bytes=b.stored,
                       weight_bits=bits, activation="dynamic" if act is None else "static",
                       act_scale=None if act is None else float(act[0]),
                       act_zero_point=None if act is None else int(act[1]), layout="dense",
                       kernel="MatMulInteger", vnni=has_vnni())


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    """Add the ``com.microsoft`` opset import that the ``row-ms`` layout's MatMulIntegerToFloat needs (in
    place; :func:`converters.rewrite.apply` does not touch opset imports)."""
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(
            o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _linear_reason(name: str, site: Site) -> str | None:
    """Why an int8 formulation does not apply: linears and convs only, whole blocks (as the fp32 ``blocked``
    needs) except for a compact conv; never on a weight shared by several nodes (each would be rewritten on
    its own)."""
    if shared_reason(site):
        return shared_reason(site)
    if site.node.op_type not in ("Gemm", "MatMul", "Conv"):
        return f"{name} covers linears and convs only, not {site.node.op_type}"
    if site.node.op_type == "Conv" and name == "compact-int8":
        return None
    return OP_HANDLERS[site.node.op_type].reason_not_blocked(site)


def qdq_conv(fmt: str, site: Site, idx: GraphIndex) -> Int8Rewrite:
    """The first step of an int8 conv (:mod:`converters.qdq`): the fp32 graph that ORT's QDQ pass then
    quantizes (``blocked-int8``: the fp32 ``blocked`` graph; ``compact-int8``: the dense conv, its int8 weight
    stored compactly after the pass), with the nodes to quantize named."""
    bits = site.weight_bits or default_weight_bits()
    common = dict(weight_bits=bits, activation="static", layout="qdq", kernel="QLinearConv", vnni=has_vnni())
    if fmt == "blocked-int8":
        # channels-last: no Transpose pair around the Gather in ORT's NHWC int8 graph (ConvHandler.blocked)
        rw = OP_HANDLERS["Conv"].blocked(site, idx, channels_last_gather=True)
        return Int8Rewrite(fmt, nodes=rw.nodes, inits=rw.inits, replace_node=rw.replace_node,
                           drop_init=rw.drop_init, value_tensors=rw.value_tensors,
                           stored_bytes=rw.stored_bytes,
                           qdq_nodes=[n.name for n in rw.nodes],
                           qdq_convs=[n.name for n in rw.nodes if n.op_type == "Conv"], **common)
    node = site.node
    if node.name:
        return Int8Rewrite(fmt, value_tensors=[site.init_name], stored_bytes=site.weight.nbytes,
                           qdq_nodes=[node.name], qdq_convs=[node.name], **common)
    named = onnx.NodeProto()
    named.CopyFrom(node)
    named.name = idx.fresh("conv")
    return Int8Rewrite(fmt, nodes=[named], replace_node=node, value_tensors=[site.init_name],
                       stored_bytes=site.weight.nbytes, qdq_nodes=[named.name], qdq_convs=[named.name],
                       **common)


class _Int8(Formulation):
    """The int8 forms of ``blocked`` / ``compact``: linears with dynamic activation scales (``_linear``:
    :func:`blocked_int8` or :func:`compact_int8`, weight bits from the CPU; standard ONNX ops, nothing to add
    to the model's opset imports), convs in ORT's QDQ form (:func:`qdq_conv`, static scales: they need
    calibration inputs, which ``convert`` signals through :attr:`Site.act`). ``folds_to_dense`` is False for
    both: even ``compact-int8`` runs the dense *int8* op, not the dense fp32 one, so ``auto`` times it."""

    folds_to_dense = False
    precision = "int8"
    _linear: Callable[..., Int8Rewrite]

    def reason_not(self, site):
        if site.node.op_type == "Conv" and site.act is None:
            return "int8 convs need calibration inputs (static activation scales)"
        return _linear_reason(self.name, site)

    def build(self, site, idx):
        if site.node.op_type == "Conv":
            return qdq_conv(self.name, site, idx)
        return type(self)._linear(site, idx, weight_bits=site.weight_bits)


class BlockedInt8(_Int8):
    """Kept blocks as int8, integer block-sparse compute (:func:`blocked_int8`, :data:`DEFAULT_LAYOUT`)."""

    name, _linear = "blocked-int8", blocked_int8


class CompactInt8(_Int8):
    """Kept blocks as int8, dense int8 compute after ORT folds the weight at load (:func:`compact_int8`)."""

    name, _linear = "compact-int8", compact_int8


class _Static(Formulation):
    """The linear int8 formulations with static activation scales: the input quantized with the (scale, zero
    point) calibrated on ``convert``'s calibration inputs (:attr:`Site.act`) by QuantizeLinear instead of
    DynamicQuantizeLinear, which saves a pass over the input for its range; values outside the calibrated
    range saturate. The two constants make it 5 bytes larger than the dynamic form, so a tie goes to
    dynamic."""

    folds_to_dense = False
    precision = "int8"
    dynamic: str

    def reason_not(self, site):
        if site.node.op_type == "Conv":
            return f"{self.name} covers linears (int8 convs are static already: {self.dynamic})"
        if site.act is None:
            return "no calibrated activation range (convert without calibration inputs)"
        return _linear_reason(self.dynamic, site)

    def build(self, site, idx):
        rw = (blocked_int8 if self.dynamic == "blocked-int8" else compact_int8)(site, idx, act=site.act,
                                                                              weight_bits=site.weight_bits)
        rw.fmt = self.name
        return rw


class BlockedInt8Static(_Static):
    name, dynamic = "blocked-int8-static", "blocked-int8"


class CompactInt8Static(_Static):
    name, dynamic = "compact-int8-static", "compact-int8"


#: the int8 formulations join the registry (``convert`` offers them with ``quantize="int8"``; the static ones
#: where it has calibration inputs)
FORMULATIONS.update({f.name: f
                     for f in (BlockedInt8(), CompactInt8(), BlockedInt8Static(), CompactInt8Static())})
