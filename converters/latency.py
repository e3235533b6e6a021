"""Latency of single ops at given shapes, measured in ONNX Runtime: the entries of a latency table.

An :class:`OpSpec` is one op whose cost depends on a layer's width: a weight's matmul (``[T, k] @ [k, n]``),
a convolution, or an attention core (``softmax(q k^T) v`` over ``h`` heads). :func:`op_graph` builds it as a
one-node (or three-node) ONNX graph with random constant weights, as ``auto`` times single layers, and
:func:`time_specs` times a set of them interleaved in one process (median of rounds), optionally through a
cache (any object with ``get(spec) -> float | None`` and ``put(spec, ms)``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .cache import TimingCache, TimingKey
from .runtime import interleaved_samples, session, time_interleaved
from .timing import graph_digest


@dataclass(frozen=True)
class OpSpec:
    """One op at one shape.

    ``matmul``: ``dims = (T, k, n)``; ``conv``: ``dims = (N, C, *spatial, O, *kernel)`` with ``attrs`` =
    ``(stride, padding, dilation, groups)`` (tuples); ``attention``: ``dims = (B, h, Tq, Tk, d, dv)``.
    """

    kind: str
    dims: tuple[int, ...]
    attrs: tuple = ()

    def key(self) -> str:
        return f"{self.kind}:{'x'.join(map(str, self.dims))}:{self.attrs}"


def _graph(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "op", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def op_graph(spec: OpSpec, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The op as an ONNX graph, and a feed for it."""
    rng = np.random.default_rng(seed)
    f = TensorProto.FLOAT
    if spec.kind == "matmul":
        t, k, n = spec.dims
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        m = _graph([node], [helper.make_tensor_value_info("x", f, [t, k])],
                   [helper.make_tensor_value_info("y", f, [t, n])], [w])
        return m, {"x": rng.standard_normal((t, k)).astype(np.float32)}
    if spec.kind == "conv":
        stride, pad, dil, groups = spec.attrs
        nsp = len(stride)
        n, c, *rest = spec.dims
        sp, o, ker = rest[:nsp], rest[nsp], rest[nsp + 1:]
        w = numpy_helper.from_array(rng.standard_normal((o, c // groups, *ker)).astype(np.float32), "w")
        node = helper.make_node("Conv", ["x", "w"], ["y"], strides=list(stride), dilations=list(dil),
                                pads=list(pad) * 2, group=groups)
        m = _graph([node], [helper.make_tensor_value_info("x", f, [n, c, *sp])],
                   [helper.make_tensor_value_info("y", f, None)], [w])
        return m, {"x": rng.standard_normal((n, c, *sp)).astype(np.float32)}
    if spec.kind == "attention":
        b, h, tq, tk, d, dv = spec.dims
        nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                 helper.make_node("MatMul", ["q", "kt"], ["s"]),
                 helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "v"], ["y"])]
        ins = [helper.make_tensor_value_info(nm, f, shape) for nm, shape in
               (("q", [b, h, tq, d]), ("k", [b, h, tk, d]), ("v", [b, h, tk, dv]))]
        m = _graph(nodes, ins, [helper.make_tensor_value_info("y", f, [b, h, tq, dv])], [])
        feed = {"q": rng.standard_normal((b, h, tq, d)).astype(np.float32),
                "k": rng.standard_normal((b, h, tk, d)).astype(np.float32),
                "v": rng.standard_normal((b, h, tk, dv)).astype(np.float32)}
        return m, feed
    raise ValueError(f"op kind: expected matmul|conv|attention, got {spec.kind!r}")


def _interleaved(runs: dict, rounds: int, loop_s: float = 2e-3) -> dict:
    """Latency samples (ms) of sessions that each have their own feed: a warm-up, a loop length per session
    (about ``loop_s``), then ``rounds`` rounds that run every session in turn."""
    reps = {}
    for k, (s, feed) in runs.items():
        for _ in range(2):
            s.run(None, feed)
        t0 = time.perf_counter()
        s.run(None, feed)
        reps[k] = max(1, int(loop_s / max(time.perf_counter() - t0, 1e-6)))
    samples = {k: [] for k in runs}
    for _ in range(rounds):
        for k, (s, feed) in runs.items():
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                s.run(None, feed)
            samples[k].append((time.perf_counter() - t0) / reps[k] * 1e3)
    return samples


class SpecCache(Protocol):
    def get(self, spec: OpSpec) -> float | None: ...

    def put(self, spec: OpSpec, ms: float) -> None: ...


def time_specs(specs: list[OpSpec], *, threads: int | None = None, rounds: int = 7, group: int = 8,
               cache: SpecCache | None = None) -> dict[OpSpec, float]:
    """Median latency (ms) of each op. Specs are timed ``group`` at a time, interleaved (so drift hits the
    widths of one op alike); zero-width ops cost 0."""
    out: dict[OpSpec, float] = {}
    todo = []
    for s in dict.fromkeys(specs):
        if any(d == 0 for d in s.dims):
            out[s] = 0.0
            continue
        hit = cache.get(s) if cache is not None else None
        if hit is not None:
            out[s] = hit
        else:
            todo.append(s)
    for i in range(0, len(todo), group):
        chunk = todo[i:i + group]
        built = {sp: op_graph(sp) for sp in chunk}
        runs = {sp: (session(m, threads=threads, spin=False), feed) for sp, (m, feed) in built.items()}
        samples = _interleaved(runs, rounds)
        for sp in chunk:
            out[sp] = statistics.median(samples[sp])
            if cache is not None:
                cache.put(sp, out[sp])
    return out


class OpCache:
    """:class:`SpecCache` over the timing cache: one entry per op and shape (kind ``op``), keyed like every
    measurement (threads, the machine, the converters' code)."""

    def __init__(self, cache: TimingCache, threads: int | None) -> None:
        self.cache, self.threads = cache, int(threads or 0)

    def _key(self, spec: OpSpec) -> TimingKey:
        return TimingKey("op", spec.kind, spec.key(), str(spec.dims[0]), "", "", "fp32", self.threads)

    def get(self, spec: OpSpec) -> float | None:
        v = self.cache.get(self._key(spec))
        return None if v is None else float(v["ms"])

    def put(self, spec: OpSpec, ms: float) -> None:
        self.cache.put(self._key(spec), {"ms": ms})


def _timing_key(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], threads: int | None,
                precision: str, kind: str) -> TimingKey:
    digests = {k: graph_digest(m) for k, m in models.items()}
    shapes = ";".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in feed.items())
    return TimingKey(kind, ",".join(f"{k}:{d}" for k, d in sorted(digests.items())), shapes,
                     str(len(next(iter(feed.values())))), "", ",".join(sorted(models)), precision,
                     int(threads or 0))


def model_ms(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], *, threads: int | None = None,
             cache: TimingCache | None = None, precision: str = "fp32") -> dict[str, float]:
    """Median latency (ms) of whole models on ``feed``, timed interleaved, through ``cache`` (kind
    ``model_latency``, one entry per set of graphs: their digests, the feed's shapes, the threads)."""
    key = _timing_key(models, feed, threads, precision, "model_latency")
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return {k: float(v) for k, v in hit.items()}
    sessions = {k: session(m, threads=threads, spin=False) for k, m in models.items()}
    out = {k: round(v, 4)
           for k, v in time_interleaved(sessions, feed, min_rounds=7, max_rounds=41, budget_s=2.0).items()}
    if cache is not None:
        cache.put(key, out)
    return out


def model_timing(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray],
                 pairs: list[tuple[str, str]], *, threads: int | None = None,
                 cache: TimingCache | None = None, precision: str = "fp32",
                 store: bool = True) -> dict[str, dict[str, float]]:
    """Whole models on ``feed``, timed interleaved: ``{"ms": median latency of each, "ratio": {"a/b": the
    median over rounds of a's latency over b's in the same round} for each (a, b) of ``pairs``}``. The ratio
    is *paired*: a round that the machine slowed slows both sides of its ratio, where a ratio of medians
    mixes rounds (a speed-up then moves with the load). Through ``cache`` (kind ``model_timing``);
    ``store=False`` reads it but leaves a fresh measurement out of it (:func:`store_timing` writes one that
    checked out)."""
    key = _timing_key(models, feed, threads, precision, _pairs_kind(pairs))
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return {part: {k: float(v) for k, v in vals.items()} for part, vals in hit.items()}
    sessions = {k: session(m, threads=threads, spin=False) for k, m in models.items()}
    samples = interleaved_samples(sessions, feed, min_rounds=7, max_rounds=41, budget_s=2.0)
    out = {"ms": {k: round(statistics.median(v), 4) for k, v in samples.items()},
           "ratio": {f"{a}/{b}": round(statistics.median(x / y for x, y in zip(samples[a], samples[b])), 4)
                     for a, b in pairs}}
    if cache is not None and store:
        cache.put(key, out)
    return out


def store_timing(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray],
                 pairs: list[tuple[str, str]], timing: dict, *, threads: int | None = None,
                 cache: TimingCache | None = None, precision: str = "fp32") -> None:
    """Write a :func:`model_timing` measurement made with ``store=False`` into ``cache``."""
    if cache is not None:
        cache.put(_timing_key(models, feed, threads, precision, _pairs_kind(pairs)), timing)


def _pairs_kind(pairs: list[tuple[str, str]]) -> str:
    return "model_timing:" + ",".join(f"{a}/{b}" for a, b in pairs)


__all__ = ["OpCache", "OpSpec", "SpecCache", "model_ms", "model_timing", "op_graph", "store_timing",
           "time_specs"]
