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
