"""Find each pruned weight in an exported graph, and the node that consumes it.

Matching, in order, for a weight ``W`` (PyTorch layout ``[O, ...]``) from the manifest:

1. an initializer named as the parameter (``"blocks.0.conv1.weight"``) holding ``W``;
2. otherwise any initializer holding ``W`` or ``W^T`` (2-D, square ones included: the exporter transposes
   MatMul weights into new constants), each also up to a per-output-channel factor with ``W``'s exact zero
   pattern (BatchNorm folded into the preceding Conv, an attention scale folded into a query projection:
   zero blocks stay zero). A factor may be 0 (a BatchNorm whose scale is 0, as timm's ``zero_init_last``
   leaves the last norm of every residual block): that output row is all zeros whatever ``W``'s row holds. An
   initializer that is all zeros then matches every weight of its shape, so it counts only under the
   parameter's own name.

Several initializers holding the same values (the exporter makes one transposed copy per call of a module
called several times: ALBERT's shared layer, a Linear applied twice) are one weight: the copies are merged
into one initializer (a Transpose where their orientations differ), whose consumers all read it; the site
then records how many nodes it feeds, and only the formulations that rebuild the tensor under its name
(``compact``, ``sparse-initializer``) rewrite them all. Zero matches, or several that hold different values
and none of them under the parameter's name, raise :class:`WeightNotFound` (:func:`unplaceable` lists them
instead): a wrong guess would rewrite the wrong tensor. A weight that is found but consumed by an op no
handler knows is left dense with that reason.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

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
        consumers: how many nodes read the initializer: more than 1 for a weight shared by several layers
            (``node`` is then the first of them that is a Gemm, MatMul or Conv weight input).
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
    consumers: int = 1
    weight_bits: int | None = None


def relocate(model: onnx.ModelProto, site: Site) -> Site:
    """The same site with its node objects taken from ``model``'s current node list."""
    node = next(n for n in model.graph.node if n == site.node)
    via = next(n for n in model.graph.node if n == site.via_transpose) if site.via_transpose else None
    return replace(site, node=node, via_transpose=via)


def shared_reason(site: Site) -> str | None:
    """Why a formulation that replaces the consumer node (``blocked``, the int8 ones) does not apply to a
    shared weight; None for a weight with one consumer."""
    if site.consumers > 1:
        return (f"the weight feeds {site.consumers} nodes (shared by several layers); only compact and "
                "sparse-initializer rewrite every consumer")
    return None


def _per_channel_scale(a: np.ndarray, w: np.ndarray) -> bool:
    """``a == s[o] * w`` for some per-output-row factors ``s``, with the same zeros in every row whose factor
    is not 0 (a row of ``a`` that is all zeros has factor 0)."""
    if a.shape != w.shape:
        return False
    a2, w2 = a.reshape(a.shape[0], -1).astype(np.float64), w.reshape(w.shape[0], -1).astype(np.float64)
    for ar, wr in zip(a2, w2):
        if not ar.any():
            continue  # factor 0: a norm with zero scale folded into this output row
        nz = wr != 0
        if not np.array_equal(ar != 0, nz):
            return False
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
        if not a.any() and name != lb.name:
            continue  # all zeros: matches any weight of this shape, so only under the parameter's name
        if dims == w.shape and (np.array_equal(a, w) or _per_channel_scale(a, w)):
            found.append((name, "OI", a))
        elif w.ndim == 2 and dims == w.shape[::-1] and (np.array_equal(a.T, w) or _per_channel_scale(a.T, w)):
            found.append((name, "IO", a.T))
    return found


def _resolve(lb: LayerBlocks, found: list[tuple[str, str, np.ndarray]]):
    """(the match to use, the copies to merge into it), or why there is none."""
    if not found and not lb.weight.any():
        return (f"the weight is all zeros (shape {lb.weight.shape}) and no initializer under its name holds "
                "it: the exporter stores equal tensors once, so another layer's zeros stand for it")
    if not found:
        return (f"no initializer of the exported graph holds this weight (shape {lb.weight.shape}, as is, "
                "transposed or BatchNorm-scaled): the graph only holds a tensor computed from it, e.g. "
                "folded with a constant input")
    named = [f for f in found if f[0] == lb.name]
    first = (named or found)[0]
    if all(np.array_equal(f[2], first[2]) for f in found):
        return first, [f for f in found if f is not first]
    if named:
        return first, []  # the others are other uses of it, scaled differently: left as they are
    return (f"{len(found)} initializers hold this weight in different forms ({[f[0] for f in found]}); "
            "refusing to guess which one the layer computes with")


def _merge(graph: onnx.GraphProto, keep: str, stored: str, copies: list[tuple[str, str, np.ndarray]]) -> None:
    """Make every reader of ``copies`` read ``keep`` (through a Transpose where the copy is stored the other
    way round), and drop the copies (in place)."""
    rename = {}
    transposes = []
    for name, how, _ in copies:
        if how == stored:
            rename[name] = keep
        else:
            transposes.append(onnx.helper.make_node("Transpose", [keep], [name], perm=[1, 0],
                                                    name=f"{name}__shared_transpose"))
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n in rename:
                node.input[i] = rename[n]
    if transposes:
        nodes = transposes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    gone = {c[0] for c in copies}
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in gone]):
        del graph.initializer[i]
    for field_ in (graph.input, graph.value_info):
        for v in [v for v in field_ if v.name in gone]:
            field_.remove(v)


def _consumer(idx: GraphIndex, name: str, stored: str):
    """(node, via_transpose, stored) for a supported consumer (the first of several), or a reason string."""
    users = idx.consumers.get(name, [])
    if not users:
        return "no node reads the weight"
    reasons = []
    for user in users:
        c = _one_consumer(idx, user, stored)
        if not isinstance(c, str):
            return c
        reasons.append(c)
    if len(users) == 1:
        return reasons[0]
    return f"the weight feeds {len(users)} nodes, none rewritable: {reasons[0]}"


def _one_consumer(idx: GraphIndex, user: tuple[onnx.NodeProto, int], stored: str):
    node, pos = user
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


def _locate(model: onnx.ModelProto, layers: list[LayerBlocks], missing: dict[str, str] | None):
    idx = GraphIndex(model.graph)
    sites, reasons = [], {}
    cache: dict[str, np.ndarray] = {}
    for lb in layers:
        pick = ("the manifest carries no weight values to match" if lb.weight is None
                else _resolve(lb, _matches(idx, lb, cache)))
        if isinstance(pick, str):
            if missing is None:
                raise WeightNotFound(f"{lb.name}: {pick}")
            missing[lb.name] = pick
            continue
        (name, stored, weight), copies = pick
        if copies:
            _merge(model.graph, name, stored, copies)
            idx = GraphIndex(model.graph)
        c = _consumer(idx, name, stored)
        if isinstance(c, str):
            users = idx.consumers.get(name, [])
            reasons[lb.name] = (name, users[0][0].op_type if users else "-", c)
            continue
        node, via, stored = c
        sites.append(Site(lb, name, node, stored, weight.astype(np.float32), via,
                          consumers=len(idx.consumers.get(name, []))))
    return sites, reasons


def locate(model: onnx.ModelProto, layers: list[LayerBlocks]
           ) -> tuple[list[Site], dict[str, tuple[str, str, str]]]:
    """Sites for the layers that can be rewritten, and ``{name: (initializer, consumer op, reason)}`` for
    those found but left dense. Copies of a shared weight are merged in ``model`` (in place).

    Raises:
        WeightNotFound: a weight with no match, or with several different ones (none under its name).
    """
    return _locate(model, layers, None)


def unplaceable(model: onnx.ModelProto, layers: list[LayerBlocks]) -> dict[str, str]:
    """``{name: why}`` for every layer :func:`locate` would refuse (``model`` is not modified): what a
    pre-check leaves dense instead of failing the whole model."""
    missing: dict[str, str] = {}
    _locate(copy.deepcopy(model), layers, missing)
    return missing
