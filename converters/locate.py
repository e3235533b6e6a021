"""Find each pruned weight in an exported graph, and the node that consumes it.

Matching, in order, for a weight ``W`` (PyTorch layout ``[O, ...]``) from the manifest:

1. an initializer named as the parameter (``"blocks.0.conv1.weight"``) holding ``W``;
2. otherwise any initializer holding ``W`` or ``W^T`` (2-D, square ones included: the exporter transposes
   MatMul weights into new constants), each also up to a per-output-channel factor with ``W``'s exact zero
   pattern (BatchNorm folded into the preceding Conv, an attention scale folded into a query projection:
   zero blocks stay zero).

Zero matches, or several (tied weights), raise :class:`WeightNotFound`: a wrong guess would rewrite the wrong
tensor. A weight that is found but consumed by an op no handler knows is left dense with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import WeightNotFound
from .graph import GraphIndex, attr
from .manifest import LayerBlocks


@dataclass(frozen=True)
class Site:
    """Where a pruned weight lives in the graph.

    Attributes:
        layer: the manifest entry.
        init_name: the initializer holding the weight.
        node: the consumer (Gemm, MatMul or Conv).
        stored: the initializer's layout relative to PyTorch's: ``"OI"`` (as PyTorch, Gemm transB=1 or
            Conv) or ``"IO"`` (transposed, MatMul).
        weight: the weight as the graph holds it, brought back to PyTorch layout (BatchNorm scaling and
            all); its pruned blocks are exact zeros.
        via_transpose: a Transpose node between initializer and MatMul, removed by the blocked rewrite.
        act: the calibrated uint8 (scale, zero point) of the consumer's input, for static int8 activations
            (``convert`` sets it from its calibration inputs; None: not calibrated).
        weight_bits: the int8 formulations' weight bit width (``convert`` sets it when it replays a plan;
            None: this CPU's :func:`converters.int8.default_weight_bits`).
    """

    layer: LayerBlocks
    init_name: str
    node: onnx.NodeProto
    stored: str
    weight: np.ndarray
    via_transpose: onnx.NodeProto | None = None
    act: tuple[float, int] | None = None
    weight_bits: int | None = None


def _per_channel_scale(a: np.ndarray, w: np.ndarray) -> bool:
    """``a == s[o] * w`` for some per-output-row factors ``s``, with the same zeros."""
    if a.shape != w.shape or not np.array_equal(a == 0, w == 0):
        return False
    a2, w2 = a.reshape(a.shape[0], -1).astype(np.float64), w.reshape(w.shape[0], -1).astype(np.float64)
    for ar, wr in zip(a2, w2):
        nz = wr != 0
        if not nz.any():
            continue
        s = ar[nz] / wr[nz]
        if not np.allclose(s, s[0], rtol=1e-4, atol=0):
            return False
    return True


def _matches(idx: GraphIndex, lb: LayerBlocks, cache: dict[str, np.ndarray]
             ) -> list[tuple[str, str, np.ndarray]]:
    """Initializers holding ``lb.weight`` as is (``"OI"``) or transposed (``"IO"``, 2-D only; a square weight
    is tried both ways, since the exporter stores every MatMul weight transposed), each up to a
    per-output-channel factor with the same zeros (folded BatchNorm, a folded attention scale)."""
    w = lb.weight
    found = []
    for name, t in idx.inits.items():
        dims = tuple(t.dims)
        if int(np.prod(dims)) != w.size:
            continue
        if name not in cache:
            cache[name] = idx.array(name)
        a = cache[name]
        if dims == w.shape and (np.array_equal(a, w) or _per_channel_scale(a, w)):
            found.append((name, "OI", a))
        elif w.ndim == 2 and dims == w.shape[::-1] and (np.array_equal(a.T, w) or _per_channel_scale(a.T, w)):
            found.append((name, "IO", a.T))
    named = [f for f in found if f[0] == lb.name]
    return named or found


def _consumer(idx: GraphIndex, name: str, stored: str):
    """(node, via_transpose, stored) for a supported single consumer, or a reason string."""
    users = idx.consumers.get(name, [])
    if len(users) != 1:
        return f"weight feeds {len(users)} nodes; only a single consumer is rewritten"
    node, pos = users[0]
    via = None
    if node.op_type == "Transpose" and stored == "OI" and list(attr(node, "perm", [1, 0])) == [1, 0]:
        nxt = idx.consumers.get(node.output[0], [])
        if len(nxt) == 1 and nxt[0][0].op_type == "MatMul" and nxt[0][1] == 1:
            return nxt[0][0], node, "OI"
    if pos != 1:
        return f"weight is input {pos} of {node.op_type}, not its weight input"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return "Gemm with transA/alpha/beta is not rewritten"
        if (attr(node, "transB", 0) == 1) != (stored == "OI"):
            return "Gemm weight orientation does not match its transB"
        return node, via, stored
    if node.op_type == "MatMul" and stored == "IO":
        return node, via, stored
    if node.op_type == "Conv" and stored == "OI":
        if attr(node, "group", 1) != 1:
            return "grouped conv"
        return node, via, stored
    return f"weight consumed by {node.op_type}, which has no block-sparse handler"


def locate(model: onnx.ModelProto, layers: list[LayerBlocks]
           ) -> tuple[list[Site], dict[str, tuple[str, str, str]]]:
    """Sites for the layers that can be rewritten, and ``{name: (initializer, consumer op, reason)}`` for
    those found but left dense.

    Raises:
        WeightNotFound: a weight with no match, or with several.
    """
    idx = GraphIndex(model.graph)
    sites, reasons = [], {}
    cache: dict[str, np.ndarray] = {}
    for lb in layers:
        if lb.weight is None:
            raise WeightNotFound(f"{lb.name}: the manifest carries no weight values to match")
        found = _matches(idx, lb, cache)
        if not found:
            raise WeightNotFound(f"{lb.name}: no initializer of the exported graph holds this weight "
                                 f"(shape {lb.weight.shape}, as is, transposed or BatchNorm-scaled)")
        if len(found) > 1:
            raise WeightNotFound(f"{lb.name}: {len(found)} initializers hold this weight "
                                 f"({[f[0] for f in found]}); refusing to guess")
        name, stored, weight = found[0]
        c = _consumer(idx, name, stored)
        if isinstance(c, str):
            users = idx.consumers.get(name, [])
            reasons[lb.name] = (name, users[0][0].op_type if users else "-", c)
            continue
        node, via, stored = c
        sites.append(Site(lb, name, node, stored, weight.astype(np.float32), via))
    return sites, reasons
