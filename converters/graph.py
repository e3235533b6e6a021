"""Small helpers over an ``onnx.GraphProto``: lookups, consumers, fresh names, tensor building."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphIndex:
    """Initializers by name and consumers of every tensor, for one graph (rebuilt after each rewrite)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, i))
        self.names = {n for node in graph.node for n in (*node.input, *node.output)} | set(self.inits)
        self.names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
        self._counter = itertools.count()

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def fresh(self, base: str) -> str:
        """A tensor/node name not yet used in the graph."""
        base = base.replace("/", "_")
        while True:
            name = f"{base}__sc{next(self._counter)}"
            if name not in self.names:
                self.names.add(name)
                return name


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def const_i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def tensor(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def _names_used(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` reads, subgraphs (If / Loop / Scan bodies) included: a body may
    read an outer tensor by name without listing it."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used |= _names_used(sub)
    return used


def prune_unused(graph: onnx.GraphProto) -> tuple[int, int]:
    """Remove (in place) nodes none of whose outputs is read or a graph output, repeatedly, then the
    initializers no node reads. Returns (nodes removed, initializers removed).

    Rewrites leave such pieces behind (a flattening Reshape's shape constant once the Reshape pair between two
    blocked linears is gone); ONNX Runtime would drop them at load and warn once per tensor."""
    outputs = {o.name for o in graph.output}
    removed_nodes = 0
    while True:
        used = _names_used(graph) | outputs
        keep = [n for n in graph.node if any(o and o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        removed_nodes += len(graph.node) - len(keep)
        del graph.node[:]
        graph.node.extend(keep)
    used = _names_used(graph) | outputs | {i.name for i in graph.input}  # a listed input stays fed
    unused = [i for i, t in enumerate(graph.initializer) if t.name not in used]
    for i in reversed(unused):  # in place: re-adding the kept ones would copy every weight
        del graph.initializer[i]
    removed_inits = len(unused)
    known = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    known |= {i.name for i in graph.input}
    for v in [v for v in graph.value_info if v.name not in known]:
        graph.value_info.remove(v)
    return removed_nodes, removed_inits
