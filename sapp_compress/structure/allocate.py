"""Latency-aware widths: which share of each family to keep so the whole model reaches a target speed-up in ONNX
Runtime on this machine, at the least predicted loss.

**The latency table.** Each family's cost is the ops its width changes (:class:`~.trace.OpRecord`: the matmuls
and convs of the weights it touches, the attention cores of its heads), built as single-op ONNX graphs at the
model's real shapes at the serving batch (:mod:`converters.latency`) and timed on this machine at a grid of
widths (:func:`candidate_widths`; between grid points, linear). Per-op sums do not add up to a whole graph's
time (ORT fuses ops, caches differ), so the sum is *calibrated*: the whole dense model and the whole model with
every family at half width are timed once, and ``model_ms(w) = rest + scale * sum_f table_f(w_f)`` is fitted
through the two. :class:`LatencyTable` holds the result.

**The loss.** :func:`sensitivity` measures, for each family and width, how much the task loss on held-out
training rows grows when only that family is cut to that width, keeping its units of highest score (SA++'s
attention during the fine-tune; the group norm for the baselines).

**The allocation.** :func:`allocate` picks one width per family minimising the summed loss growth subject to
the predicted latency meeting the target (a multiple-choice knapsack, solved exactly by dynamic programming over
the latency budget in :data:`BINS` steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from converters.latency import OpSpec

from .groups import GroupFamily, StructurePlan

#: latency steps of the allocation's dynamic programme
BINS = 400


def candidate_widths(fam: GroupFamily, points: int = 16) -> list[int]:
    """Kept-unit counts to time and to choose from: every count for families of up to ``points`` units (heads),
    else multiples of the largest of 16 / 8 / 4 / 1 that gives at least ``points`` steps (neurons, channels:
    kernels prefer widths that are multiples of 8 or 16)."""
    n = fam.n_units
    if n <= points:
        return list(range(1, n + 1))
    step = next((g for g in (16, 8, 4) if n // g >= points), 1)
    out = sorted({*range(step, n + 1, step), n})
    if len(out) > 4 * points:  # a very wide family: thin the grid evenly
        keep = np.unique(np.linspace(0, len(out) - 1, 4 * points).round().astype(int))
        out = [out[i] for i in keep]
    return out


def _per_unit(fam: GroupFamily, key) -> int:
    return len(fam.units[0][key]) if key in fam.units[0] else 0


def family_specs(plan: StructurePlan, fam: GroupFamily, width: int, batch: int, traced_batch: int) -> list[OpSpec]:
    """The ops whose cost ``fam`` at ``width`` kept units changes, at the serving ``batch`` (the trace ran at
    ``traced_batch`` rows). Ops shared with another family are counted at that family's full width."""
    drop = fam.n_units - width
    keys = set(fam.keys)
    out = []
    for rec, head_family in plan.records:
        if rec.kind == "attention":
            if head_family != fam.name:
                continue
            q, k, v = rec.shapes
            b = max(1, q[0] * batch // traced_batch)
            h = q[-3] * width // fam.n_units
            out.append(OpSpec("attention", (b, h, q[-2], k[-2], q[-1], v[-1])))
            continue
        kin, kout = rec.axes
        wshape = list(rec.shapes[1])
        hit = False
        for ax in (kin, kout):
            if (rec.weight, ax) in keys:
                wshape[ax] -= drop * _per_unit(fam, (rec.weight, ax))
                hit = True
        if not hit:
            continue
        x = rec.shapes[0]
        if rec.kind == "matmul":
            tokens = max(1, int(np.prod(x[:-1])) * batch // traced_batch)
            out.append(OpSpec("matmul", (tokens, wshape[kin], wshape[kout])))
        else:
            attrs = dict(rec.attrs)
            groups = attrs["groups"]
            c = wshape[1] * groups if groups == 1 else x[1] - (rec.shapes[1][0] - wshape[0])
            if groups > 1:  # a depthwise / grouped conv loses whole groups with its channels
                groups = max(1, groups * wshape[0] // rec.shapes[1][0])
                c = wshape[1] * groups
            nsp = len(x) - 2
            tup = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * nsp  # noqa: E731
            pad = attrs["padding"]
            if isinstance(pad, str):
                pad = tuple(k // 2 for k in wshape[2:])
            out.append(OpSpec("conv", (max(1, x[0] * batch // traced_batch), c, *x[2:], wshape[0], *wshape[2:]),
                              (tup(attrs["stride"]), tup(pad), tup(attrs["dilation"]), groups)))
    return out


@dataclass
class LatencyTable:
    """Per family, the latency (ms) of its ops at each candidate width; the calibration to whole-model time.

    Attributes:
        widths / ms: family name -> candidate kept-unit counts (ascending) and their ops' latency.
        dense_ms: the whole dense model, measured; rest_ms and scale: ``model = rest + scale * sum_f ms_f``.
    """

    widths: dict[str, list[int]]
    ms: dict[str, list[float]]
    dense_ms: float
    rest_ms: float = 0.0
    scale: float = 1.0
    n_units: dict[str, int] = field(default_factory=dict)

    def family_ms(self, name: str, width: int) -> float:
        return float(np.interp(width, self.widths[name], self.ms[name]))

    def predict(self, widths: dict[str, int]) -> float:
        """Predicted whole-model latency (ms) with these kept-unit counts (full width for families not named)."""
        total = sum(self.family_ms(f, widths.get(f, self.n_units[f])) for f in self.widths)
        return self.rest_ms + self.scale * total

    def calibrate(self, half_ms: float) -> None:
        """Fit ``rest`` and ``scale`` through the dense model and the all-half-width model, both measured."""
        full = sum(self.ms[f][-1] for f in self.widths)
        half = sum(self.family_ms(f, max(1, self.n_units[f] // 2)) for f in self.widths)
        if full - half <= 1e-9:
            self.scale, self.rest_ms = 0.0, self.dense_ms
            return
        self.scale = max(0.0, (self.dense_ms - half_ms) / (full - half))
        self.rest_ms = max(0.0, self.dense_ms - self.scale * full)

    def best_speedup(self) -> float:
        """The largest predicted speed-up: every family at its smallest width."""
        return self.dense_ms / self.predict({f: w[0] for f, w in self.widths.items()})

    def to_json(self) -> dict:
        return {"dense_ms": self.dense_ms, "rest_ms": self.rest_ms, "scale": self.scale,
                "families": {f: {"widths": self.widths[f], "ms": [round(v, 4) for v in self.ms[f]]}
                             for f in self.widths}}


def allocate(table: LatencyTable, loss: dict[str, list[float]], target_ms: float) -> dict[str, int] | None:
    """The kept-unit count per family (one of its candidate widths) with the least summed ``loss`` (family ->
    loss growth at each candidate width) whose predicted latency is at most ``target_ms``; None when even the
    smallest widths do not reach it."""
    names = list(table.widths)
    budget = (target_ms - table.rest_ms) / table.scale if table.scale > 0 else math.inf
    if budget == math.inf:
        return {f: table.widths[f][-1] for f in names} if table.rest_ms <= target_ms else None
    if budget < sum(table.ms[f][0] for f in names) - 1e-12:
        return None
    step = budget / BINS
    cost = {f: [int(math.ceil(m / step - 1e-9)) for m in table.ms[f]] for f in names}
    inf = math.inf
    best = np.full(BINS + 1, inf)
    best[0] = 0.0
    choice = []
    for f in names:
        nxt = np.full(BINS + 1, inf)
        arg = np.full(BINS + 1, -1, dtype=np.int64)
        for j, (c, lo) in enumerate(zip(cost[f], loss[f])):
            if c > BINS:
                continue
            cand = np.full(BINS + 1, inf)
            cand[c:] = best[: BINS + 1 - c] + lo
            better = cand < nxt
            nxt[better], arg[better] = cand[better], j
        choice.append(arg)
        best = nxt
    if not np.isfinite(best).any():
        return None
    b = int(np.argmin(best))
    out = {}
    for f, arg in zip(reversed(names), reversed(choice)):
        j = int(arg[b])
        out[f] = table.widths[f][j]
        b -= cost[f][j]
    return out


__all__ = ["BINS", "LatencyTable", "allocate", "candidate_widths", "family_specs"]
