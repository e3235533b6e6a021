"""Keep activations 2-D between consecutive blocked linears on N-D inputs, so ORT can cancel the Transposes.

A blocked linear on an N-D input (``MatMul`` in a transformer: ``x [B, T, I]``) is emitted as
``Reshape [M, I] -> Transpose -> ... -> Transpose [M, O] -> Reshape [B, T, O]``. Between two such layers
the exporter's graph puts only per-feature ops (bias ``Add``, ``Relu``), e.g.::

    Transpose1 -> Reshape [B, T, O] -> Add(b [O]) -> Relu -> Reshape [M, O] -> Transpose2

ONNX Runtime's transpose optimizer pushes Transposes through elementwise ops but not through this Reshape
pair, so both Transposes stay. Here the Reshape pair is removed when it is an identity on the data
(``[M, O] -> [*lead, O] -> ... -> [M, O]`` through ops that act per feature), leaving
``Transpose1 -> Add -> Relu -> Transpose2``, which ORT cancels as it does in a 2-D MLP.

What stays per encoder layer (the pass cannot help): the Transposes of out_proj (between the attention's
head-merging Reshape and the residual Add + LayerNorm, which normalises over the last axis, so ORT cannot move
a Transpose through it) and the FFN's two ends. A 2-D MLP (Gemm -> bias -> Relu -> Gemm) needs no pass: ORT
leaves 2 Transposes for any number of blocked layers. Transpose counts measured: BENCHMARKS.md section 19.4.

Matched pattern (everything else is left alone):

- ``R1 = Reshape(t, Concat(Slice(Shape(x1)), [O]))`` with ``t`` the output of a 2-D ``Transpose`` (perm
  [1, 0]), optionally followed by a bias ``Add`` on it (both emitted by
  :class:`converters.ops.LinearHandler`);
- a subgraph of unary ops in :data:`UNARY` and binary ops in :data:`BINARY` whose constant inputs have shape
  ``[O]`` or hold a single value (fan-out inside is allowed: the exporter decomposes GELU at opset < 20);
- ``R2 = Reshape(u, [-1, O])`` consumed only by a ``Transpose`` perm [1, 0] (the next layer's entry);
  a ``Shape(u)`` (the next layer's leading-shape computation) is redirected to ``Shape(x1)``, which has the
  same leading dimensions.
"""
from __future__ import annotations

import logging

import onnx

from .graph import GraphIndex, attr

log = logging.getLogger(__name__)

UNARY = frozenset({"Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "LeakyRelu", "Elu", "Softplus", "HardSigmoid",
                   "HardSwish", "Neg", "Abs"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div"})


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _const_shape(idx: GraphIndex, name: str) -> list[int] | None:
    return idx.array(name).tolist() if name in idx.inits else None


def _is_2d_transpose(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Transpose" and list(attr(node, "perm", [])) == [1, 0]


def _const_dims(idx: GraphIndex, prod: dict, name: str) -> list[int] | None:
    """Dims of a constant input (initializer or Constant node), None if ``name`` is computed."""
    if name in idx.inits:
        return list(idx.inits[name].dims)
    node = prod.get(name)
    if node is not None and node.op_type == "Constant":
        value = attr(node, "value")
        return list(value.dims) if value is not None else None
    return None


def _region(idx: GraphIndex, prod: dict, u: str, width: int) -> tuple[onnx.NodeProto, list] | None:
    """(R1, region nodes): the per-feature elementwise subgraph between a Reshape ``R1`` and ``u``.

    Every node must be in :data:`UNARY` / :data:`BINARY`, every constant input of shape ``[width]``, ``[1]``
    or scalar, and every computed input must come from the region or from ``R1`` (fan-out inside is fine:
    the exporter's decomposed GELU ``x * 0.5 * (1 + erf(x / sqrt 2))`` uses ``x`` twice)."""
    region: dict[int, onnx.NodeProto] = {}
    r1, stack = None, [u]
    while stack:
        node = prod.get(stack.pop())
        if node is None:
            return None
        if node.op_type == "Reshape":
            if r1 is not None and r1 is not node:
                return None
            r1 = node
            continue
        if id(node) in region:
            continue
        if node.op_type not in UNARY | BINARY:
            return None
        for name in node.input:
            dims = _const_dims(idx, prod, name)
            if dims is None:
                stack.append(name)
            elif dims not in ([width], [1], []):
                return None
        region[id(node)] = node
    if r1 is None or not region:
        return None
    inside = set(region)
    for out in [r1.output[0], *(o for n in region.values() for o in n.output)]:
        for user, _ in idx.consumers.get(out, []):
            if id(user) in inside:
                continue
            if out == u and user.op_type in ("Reshape", "Shape"):
                continue  # R2 and the next layer's Shape, checked by the caller
            return None
    return r1, [n for n in idx.graph.node if id(n) in inside]


def _leading_only(idx: GraphIndex, shape_node: onnx.NodeProto) -> bool:
    """The Shape's only use is ``Slice(shape, [0], [-1])`` (the leading dims), as LinearHandler emits it."""
    users = idx.consumers.get(shape_node.output[0], [])
    if len(users) != 1 or users[0][0].op_type != "Slice" or len(users[0][0].input) != 3:
        return False
    sl = users[0][0]
    return _const_shape(idx, sl.input[1]) == [0] and _const_shape(idx, sl.input[2]) == [-1]


def _try(idx: GraphIndex, prod: dict, r2: onnx.NodeProto) -> tuple | None:
    """(R1, region, R2, shape nodes, x1) when ``r2`` closes a removable Reshape pair, else None."""
    target = _const_shape(idx, r2.input[1])
    if target is None or len(target) != 2 or target[0] != -1:
        return None
    width = target[1]
    users = idx.consumers.get(r2.output[0], [])
    if len(users) != 1 or not _is_2d_transpose(users[0][0]):
        return None
    u = r2.input[0]
    others = [n for n, _ in idx.consumers.get(u, []) if n is not r2]
    if any(n.op_type != "Shape" for n in others):
        return None
    shapes = [n for n in others if n.op_type == "Shape"]
    if not all(_leading_only(idx, n) for n in shapes):
        return None  # Shape(u) -> Shape(x1) keeps only the leading dims equal
    found = _region(idx, prod, u, width)
    if found is None:
        return None
    r1, region = found
    concat = prod.get(r1.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return None
    if _const_shape(idx, concat.input[1]) != [width]:
        return None
    sl = prod.get(concat.input[0])
    shp = prod.get(sl.input[0]) if sl is not None and sl.op_type == "Slice" else None
    if shp is None or shp.op_type != "Shape":
        return None
    t_node = prod.get(r1.input[0])
    if t_node is not None and t_node.op_type == "Add":
        t_node = prod.get(t_node.input[0])
    if not _is_2d_transpose(t_node):
        return None
    return r1, region, r2, shapes, shp.input[0]


def feature_major(model: onnx.ModelProto) -> int:
    """Remove every identity Reshape pair between two blocked linears (in place); returns how many."""
    g = model.graph
    done = 0
    while True:
        idx, prod = GraphIndex(g), _producers(g)
        hit = next((m for n in g.node if n.op_type == "Reshape" and (m := _try(idx, prod, n))), None)
        if hit is None:
            break
        r1, region, r2, shapes, x1 = hit
        for node in region:
            for i, name in enumerate(node.input):
                if name == r1.output[0]:
                    node.input[i] = r1.input[0]
        u, r2_out = r2.input[0], r2.output[0]
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == r2_out:
                    node.input[i] = u
        for s in shapes:
            s.input[0] = x1
        stale = {o for n in region for o in n.output}
        keep = [n for n in g.node if n is not r1 and n is not r2]
        del g.node[:]
        g.node.extend(keep)
        for vi in [v for v in g.value_info if v.name in stale]:
            g.value_info.remove(vi)
        done += 1
    if done:
        log.info("removed %d Reshape pair(s) between blocked linears", done)
    return done


#: layout ops that are merged when they repeat: pure functions of their inputs and attributes
SHARED_OPS = frozenset({"Shape", "Slice", "Concat", "Reshape", "Transpose"})


def _rename_inputs(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_inputs(sub, rename)


def share_layout(model: onnx.ModelProto) -> int:
    """Merge repeated layout nodes (in place): same op in :data:`SHARED_OPS`, same attributes, same inputs,
    constant inputs compared by value. Returns how many nodes were dropped.

    Blocked linears that read the same tensor (a transformer's query, key and value projections) each start
    with ``Shape -> Slice -> Concat`` (the leading shape), ``Reshape [-1, I]`` and ``Transpose``; after this
    pass they share one transposed input. (ONNX Runtime's common-subexpression pass finds the same at load;
    doing it here keeps the file and every other runtime's graph free of the copies.)"""
    g = model.graph
    const_key = {}
    for t in g.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = ""
        const_key[t.name] = ("const", c.SerializeToString())
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    keep = []
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type in SHARED_OPS and node.domain in ("", "ai.onnx") and len(node.output) == 1 \
                and node.output[0] not in outputs:
            attrs = tuple(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name))
            key = (node.op_type, tuple(const_key.get(i, i) for i in node.input), attrs)
            if key in seen:
                rename[node.output[0]] = seen[key]
                continue
            seen[key] = node.output[0]
        keep.append(node)
    dropped = len(g.node) - len(keep)
    if dropped:
        del g.node[:]
        g.node.extend(keep)
        _rename_inputs(g, rename)  # subgraphs may read the dropped outputs by name
        log.info("shared %d repeated layout node(s)", dropped)
    return dropped
