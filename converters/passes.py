"""Whole-graph passes that keep ONNX Runtime's function and change only which kernels it picks, each kept only
where it measures faster on this machine.

- ``unfused_layernorm``: an ``Add`` whose only consumer is a ``LayerNormalization`` becomes a ``Sum`` (the
  same function). ORT fuses ``Add -> LayerNormalization`` into its ``SkipLayerNormalization`` kernel, which
  ran 8x slower than ``Sum`` + ``LayerNormalization`` at ``[1, 128, 768]``, 1 thread, on an AMD EPYC with
  AVX-512 (0.93 ms against 0.11 ms, BENCHMARKS.md section 16): at batch 1 it took 23 % of a BERT-base-shaped
  encoder with a quarter of its heads and neurons left. The fused kernel may be the faster one elsewhere,
  hence the timing.

:func:`choose` times the graph with each pass against without it (interleaved, median, through the timing
cache) at the serving inputs and applies those that are faster by more than :data:`MIN_GAIN`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .cache import TimingCache


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def unfused_layernorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every ``Add`` whose output goes only into a ``LayerNormalization`` (as its input) written as
    ``Sum``."""
    m = _copy(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in m.graph.output}
    count = 0
    for n in m.graph.node:
        if n.op_type != "Add" or n.domain not in ("", "ai.onnx") or n.output[0] in outputs:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) == 1 and users[0].op_type == "LayerNormalization" and users[0].input[0] == n.output[0]:
            n.op_type = "Sum"
            count += 1
    return m, count


#: pass name -> the pass (returns the new model and how many places it changed)
PASSES: dict[str, Callable[[onnx.ModelProto], tuple[onnx.ModelProto, int]]] = {
    "unfused_layernorm": unfused_layernorm,
}

#: a pass is kept when the graph runs at most this share of the time without it
MIN_GAIN = 0.97


@dataclass
class PassChoice:
    model: onnx.ModelProto
    applied: list[str] = field(default_factory=list)
    latencies_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"applied": self.applied, "latencies_ms": self.latencies_ms}


def choose(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None, *, threads: int | None = None,
           cache: TimingCache | None = None, passes: tuple[str, ...] | None = None,
           precision: str = "fp32", replay: tuple[str, ...] | None = None) -> PassChoice:
    """``model`` with the passes that measure faster here (none without ``feed``); with ``replay``, exactly
    those passes, untimed (an earlier run's choice)."""
    from .latency import model_ms

    out = PassChoice(model)
    if replay is not None:
        for name in replay:
            if name not in PASSES:
                raise KeyError(f"unknown graph pass {name!r}: expected some of {sorted(PASSES)}")
            out.model, _ = PASSES[name](out.model)
        out.applied = list(replay)
        return out
    if not feed:
        return out
    for name in passes or tuple(PASSES):
        candidate, changed = PASSES[name](out.model)
        if not changed:
            continue
        ms = model_ms({"without": out.model, name: candidate}, feed, threads=threads, cache=cache,
                      precision=precision)
        out.latencies_ms.update({f"{name}:off": ms["without"], f"{name}:on": ms[name]})
        if ms[name] <= MIN_GAIN * ms["without"]:
            out.model, out.applied = candidate, [*out.applied, name]
    return out


__all__ = ["MIN_GAIN", "PASSES", "PassChoice", "choose", "unfused_layernorm"]
