"""``auto``'s measurements through the timing cache (:mod:`converters.cache`).

:class:`Timer` builds the :class:`~converters.cache.TimingKey` of each measurement ``auto`` makes (one layer's
candidate formulations; whole candidate models against the dense one), returns the cached value when there is
one, and otherwise measures, stores and counts. Everything ``auto`` decides from a measurement is a function
of the value returned here, so a run whose measurements all come from the cache makes the same choices, and
writes the same bytes, as the run that measured them.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import onnx

from .cache import TimingCache, TimingKey, digest, mask_digest
from .locate import Site
from .manifest import LayerBlocks

#: integer initializers up to this many values (shape and index constants) enter a graph's digest by value
_SMALL = 4096


def shapes_text(shapes: list[list[int]]) -> str:
    """``[[16, 64], [1, 64]]`` -> ``"16x64;1x64"``."""
    return ";".join("x".join(map(str, s)) for s in shapes)


def graph_digest(model: onnx.ModelProto) -> str:
    """A short sha256 of what decides a model's speed, not its float values: every node (op, attributes,
    tensor names), the inputs' and outputs' types, and the initializers' names, types and shapes, with the
    values of small integer ones (shapes, indices)."""
    h = hashlib.sha256()
    g = model.graph
    for o in model.opset_import:
        h.update(f"{o.domain}:{o.version};".encode())
    for vi in (*g.input, *g.output):
        h.update(vi.SerializeToString())
    for n in g.node:
        h.update(n.SerializeToString())
    for t in g.initializer:
        h.update(f"{t.name}:{t.data_type}:{list(t.dims)};".encode())
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and _size(t) <= _SMALL:
            h.update(onnx.numpy_helper.to_array(t).tobytes())
    return h.hexdigest()[:16]


def _size(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


class Timer:
    """Looks ``auto``'s measurements up in ``cache`` (None: always measure) before measuring them;
    ``measured`` and ``cached`` count the measurements made and those read from the cache.

    ``model``: the graph the layers are timed in (their ops, weights and inputs); ``precision``: the
    quantization setting and the int8 weight bits (e.g. ``"fp32"``, ``"int8/w8"``)."""

    def __init__(self, cache: TimingCache | None, model: onnx.ModelProto, threads: int | None,
                 precision: str) -> None:
        self.cache, self.threads, self.precision = cache, threads or 0, precision
        self.measured = self.cached = 0
        self._model = model
        self._inits = {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer}
        self._graph: str | None = None

    def _lookup(self, key: TimingKey, measure: Callable[[], dict]) -> dict:
        value = self.cache.get(key) if self.cache is not None else None
        if value is not None:
            self.cached += 1
            return value
        value = measure()
        self.measured += 1
        if self.cache is not None:
            self.cache.put(key, value)
        return value

    def layer_op(self, site: Site) -> str:
        """The layer's op type and a digest of its dense form: the node (attributes), the Transpose before it,
        its inputs' initializer types and shapes, the stored layout."""
        node, via = site.node, site.via_transpose
        sig = {"node": [node.op_type, node.domain, [a.SerializeToString().hex() for a in node.attribute]],
               "via": [a.SerializeToString().hex() for a in via.attribute] if via is not None else None,
               "inputs": [self._inits.get(n, "activation")
                          for n in (*node.input, *(via.input if via else ()))],
               "stored": site.stored}
        return f"{node.op_type}:{digest(sig)}"

    def layer(self, site: Site, in_shapes: list[list[int]], candidates: list[str],
              measure: Callable[[], dict]) -> dict:
        """One layer's candidates timed at ``in_shapes`` (``measure()`` when not cached)."""
        key = TimingKey("layer", self.layer_op(site), shapes_text(in_shapes),
                        ",".join(str(s[0]) for s in in_shapes),
                        mask_digest(site.layer), ",".join(sorted(candidates)), self.precision, self.threads)
        return self._lookup(key, measure)

    def models(self, layers: list[LayerBlocks], feed_shapes: list[dict[str, list[int]]],
               candidates: dict[str, dict[str, str]], measure: Callable[[], dict]) -> dict:
        """Whole candidate models (name -> per-layer formats) timed against the dense model at each feed
        (``measure()`` when not cached)."""
        if self._graph is None:
            self._graph = graph_digest(self._model)
        shapes = ";".join(",".join(f"{k}={'x'.join(map(str, v))}" for k, v in f.items()) for f in feed_shapes)
        batch = ",".join(str(next(iter(f.values()))[0]) for f in feed_shapes)
        key = TimingKey("model", f"model:{self._graph}", shapes, batch,
                        digest([mask_digest(lb) for lb in layers]),
                        f"{','.join(candidates)}:{digest(candidates)}", self.precision, self.threads)
        return self._lookup(key, measure)
