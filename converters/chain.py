"""Keep activations 2-D between consecutive blocked linears on N-D inputs, so ORT can cancel the Transposes.

A blocked linear on an N-D input (``MatMul`` in a transformer: ``x [B, T, I]``) is emitted as
``Reshape [M, I] -> Transpose -> ... -> Transpose [M, O] -> Reshape [B, T, O]``. Between two such layers
the exporter's graph puts only per-feature ops (bias ``Add``, ``Relu``), e.g.::

    Transpose1 -> Reshape [B, T, O] -> Add(b [O]) -> Relu -> Reshape [M, O] -> Transpose2

ONNX Runtime's transpose optimizer pushes Transposes through elementwise ops but not through Reshape, so
both Transposes stay (measured: all 12 of a 2-layer TransformerEncoder's FFN/out_proj Transposes remained
after ORT_ENABLE_ALL). Here the Reshape pair is removed when it is an identity on the data
(``[M, O] -> [*lead, O] -> ... -> [M, O]`` through ops that act per feature), leaving
``Transpose1 -> Add -> Relu -> Transpose2``, which ORT cancels as it does in a 2-D MLP.

Matched pattern (everything else is left alone):

- ``R1 = Reshape(t, Concat(Slice(Shape(x1)), [O]))`` with ``t`` the output of a 2-D ``Transpose`` (perm
  [1, 0]), optionally followed by a bias ``Add`` on it (both emitted by :class:`converters.ops.LinearHandler`);
- a straight chain of unary ops in :data:`UNARY` or binary ops in :data:`BINARY` whose other input is an
  initializer of shape ``[O]`` or a single value;
- ``R2 = Reshape(u, [-1, O])`` consumed only by a ``Transpose`` perm [1, 0] (the next layer's entry);
  a ``Shape(u)`` (the next layer's leading-shape computation) is redirected to ``Shape(x1)``, which has the
  same leading dimensions.
"""
from __future__ import annotations

import logging

import numpy as np
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


def _per_feature(idx: GraphIndex, node: onnx.NodeProto, x: str, width: int) -> bool:
    if node.op_type in UNARY:
        return len(node.input) == 1
    if node.op_type not in BINARY or len(node.input) != 2:
        return False
    other = node.input[1] if node.input[0] == x else node.input[0]
    if other not in idx.inits or node.input[0] == node.input[1]:
        return False
    shape = list(idx.inits[other].dims)
    return shape in ([width], [1], [])


def _try(idx: GraphIndex, prod: dict, r2: onnx.NodeProto) -> tuple | None:
    """(R1, chain, R2, shape nodes, x1) when ``r2`` closes a removable Reshape pair, else None."""
    target = _const_shape(idx, r2.input[1])
    if target is None or len(target) != 2 or target[0] != -1:
        return None
    width = target[1]
    users = idx.consumers.get(r2.output[0], [])
    if len(users) != 1 or not _is_2d_transpose(users[0][0]):
        return None
    u = r2.input[0]
    shapes = [n for n, _ in idx.consumers.get(u, []) if n.op_type == "Shape"]
    if len(idx.consumers.get(u, [])) != 1 + len(shapes):
        return None
    chain, cur = [], u
    while True:
        node = prod.get(cur)
        if node is None:
            return None
        if node.op_type == "Reshape":
            break
        if not _per_feature(idx, node, node.input[0] if node.op_type in UNARY else
                            next(i for i in node.input if i not in idx.inits), width):
            return None
        chain.append(node)
        cur = next(i for i in node.input if i not in idx.inits)
        if len(idx.consumers.get(cur, [])) != 1:
            return None
    r1 = node
    if not chain or len(idx.consumers.get(r1.output[0], [])) != 1:
        return None
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
    return r1, chain[::-1], r2, shapes, shp.input[0]


def feature_major(model: onnx.ModelProto) -> int:
    """Remove every identity Reshape pair between two blocked linears (in place); returns how many."""
    g = model.graph
    done = 0
    while True:
        idx, prod = GraphIndex(g), _producers(g)
        hit = next((m for n in g.node if n.op_type == "Reshape" and (m := _try(idx, prod, n))), None)
        if hit is None:
            break
        r1, chain, r2, shapes, x1 = hit
        first = chain[0]
        for i, name in enumerate(first.input):
            if name == r1.output[0]:
                first.input[i] = r1.input[0]
        u, r2_out = r2.input[0], r2.output[0]
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == r2_out:
                    node.input[i] = u
        for s in shapes:
            s.input[0] = x1
        stale = {n.output[0] for n in chain}
        keep = [n for n in g.node if n is not r1 and n is not r2]
        del g.node[:]
        g.node.extend(keep)
        for vi in [v for v in g.value_info if v.name in stale]:
            g.value_info.remove(vi)
        done += 1
    if done:
        log.info("removed %d Reshape pair(s) between blocked linears", done)
    return done
