"""The latency table of ``--target-speedup``: what each family's width costs in ONNX Runtime on this machine.

Each family's cost is the ops its width changes (:class:`~sapp_compress.structure.trace.OpRecord`: the matmuls
and convs of the weights it touches, the attention cores of its heads), built as single-op ONNX graphs at the
model's real shapes at the serving batch (:mod:`converters.latency`) and timed on this machine at a grid of
widths (:func:`candidate_widths`; between grid points, linear). Per-op sums do not add up to a whole graph's
time (ORT fuses ops, caches differ), so the sum is *calibrated*: the whole dense model and the whole model
with every family at half width are timed once (:class:`WholeTimer`), and
``model_ms(w) = rest + scale * sum_f table_f(w_f)`` is fitted through the two. :class:`LatencyTable` holds the
result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from converters.latency import OpSpec

from ..io.export import export_feed
from ..structure.groups import GroupFamily, StructurePlan
from ..structure.remove import remove


def candidate_widths(fam: GroupFamily, points: int = 16) -> list[int]:
    """Kept-unit counts to time and to choose from: every count for families of up to ``points`` units
    (heads), else multiples of the largest of 16 / 8 / 4 / 1 that gives at least ``points`` steps (neurons,
    channels: kernels prefer widths that are multiples of 8 or 16)."""
    n = fam.n_units
    if n <= points:
        return list(range(1, n + 1))
    step = next((g for g in (16, 8, 4) if n // g >= points), 1)
    # about ``points`` widths, multiples of the kernel-friendly step
    step *= max(1, -(-(n // step) // points))
    return sorted({*range(step, n + 1, step), n})


def _per_unit(fam: GroupFamily, key) -> int:
    return len(fam.units[0][key]) if key in fam.units[0] else 0


def family_specs(plan: StructurePlan, fam: GroupFamily, width: int, batch: int,
                 traced_batch: int) -> list[OpSpec]:
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
            out.append(OpSpec("conv",
                              (max(1, x[0] * batch // traced_batch), c, *x[2:], wshape[0], *wshape[2:]),
                              (tup(attrs["stride"]), tup(pad), tup(attrs["dilation"]), groups)))
    return out


@dataclass
class LatencyTable:
    """Per family, the latency (ms) of its ops at each candidate width; the calibration to whole-model time.

    Attributes:
        widths / ms: family name -> candidate kept-unit counts (ascending) and their ops' latency.
        dense_ms: the whole dense model, measured (in the target's precision); rest_ms and scale:
            ``model = rest + scale * sum_f ms_f``.
        reference_ms: the whole dense model in fp32, which X is against (``--quantize int8``: the table is for
            the int8 graph, the speed-up against dense fp32); None: ``dense_ms``.
        calibration: the whole smaller models the fit went through (``half``: every family at half width; then
            each allocation measured during the fine-tune, :class:`Allocator`).
    """

    widths: dict[str, list[int]]
    ms: dict[str, list[float]]
    dense_ms: float
    rest_ms: float = 0.0
    scale: float = 1.0
    n_units: dict[str, int] = field(default_factory=dict)
    half_ms: float | None = None
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)
    reference_ms: float | None = None

    @property
    def ref_ms(self) -> float:
        """What a speed-up is against: the fp32 dense model."""
        return self.dense_ms if self.reference_ms is None else self.reference_ms

    def speedup(self, widths: dict[str, int]) -> float:
        """The predicted speed-up over the fp32 dense model at these widths."""
        return self.ref_ms / self.predict(widths)

    def family_ms(self, name: str, width: int) -> float:
        return float(np.interp(width, self.widths[name], self.ms[name]))

    def predict(self, widths: dict[str, int]) -> float:
        """Predicted whole-model latency (ms) with these kept-unit counts (full width for families not
        named)."""
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
        return self.speedup({f: w[0] for f, w in self.widths.items()})

    def to_json(self) -> dict:
        return {"dense_ms": self.dense_ms, "reference_ms": self.ref_ms, "half_ms": self.half_ms,
                "rest_ms": self.rest_ms, "scale": self.scale, "seconds": self.seconds,
                "calibration": self.calibration,
                "families": {f: {"widths": self.widths[f], "ms": [round(v, 4) for v in self.ms[f]]}
                             for f in self.widths}}


@dataclass(frozen=True)
class SpeedTarget:
    """Where the speed-up is measured: ONNX Runtime on this machine at the serving ``batch`` with ``threads``,
    in ``precision`` (``fp32``, or ``int8``: the graphs in ORT's fastest int8 form), through ``cache``."""

    speedup: float
    batch: int = 1
    threads: int | None = None
    precision: str = "fp32"
    cache: str = "use"


def _as_precision(proto, precision: str, feed, calibration, threads, cache):
    if precision != "int8":
        return proto
    from converters import quantize_whole

    return quantize_whole(proto, timing_inputs=feed, calibration_inputs=calibration, threads=threads,
                          cache=cache).model


class WholeTimer:
    """The whole model with given family widths, timed against the dense one in ONNX Runtime: exported (from a
    copy of ``model`` taken now: latency does not depend on the weights' values) with the graph passes the
    written model gets (:mod:`converters.passes`; the dense model as exported), in the target's precision,
    interleaved on ``feed`` (the serving batch), through the timing cache. ``timer(widths)`` returns
    ``(reference_ms, ms, ratio)``: the fp32 dense model, which X is against, the model at ``widths`` in the
    target's precision (with int8 the dense int8 model is timed too, :meth:`times`), and the paired speed-up.
    """

    def __init__(self, model, plan: StructurePlan, export_rows: dict[str, np.ndarray],
                 feed: dict[str, np.ndarray], target: SpeedTarget, calibration: dict | None = None,
                 inner_of=lambda m: m) -> None:
        import copy

        from converters.cache import TimingCache

        self.model, self.plan, self.export_rows, self.feed = copy.deepcopy(model), plan, export_rows, feed
        self.target, self.calibration, self.inner_of = target, calibration, inner_of
        self.cache = TimingCache.open(target.cache)
        self._dense = self._reference = None
        self.last = None

    def graph(self, widths: dict[str, int] | None):
        import copy

        from converters import passes

        if widths is None:
            proto = self.reference()
        else:  # as the written model will be: with the graph passes that measure faster here
            m = copy.deepcopy(self.model)
            remove(self.inner_of(m), self.plan.families,
                   {f.name: np.arange(f.n_units) < widths.get(f.name, f.n_units) for f in self.plan.families})
            proto = passes.choose(export_feed(m, self.export_rows), self.feed, threads=self.target.threads,
                                  cache=self.cache).model
        return _as_precision(proto, self.target.precision, self.feed, self.calibration, self.target.threads,
                             self.cache)

    def reference(self):
        """The dense model exported in fp32 (once): what X is against."""
        if self._reference is None:
            self._reference = export_feed(self.model, self.export_rows)
        return self._reference

    def times(self, widths: dict[str, int] | None, store: bool = True,
              fresh: bool = False) -> dict[str, float]:
        """``dense`` (in the target's precision), ``reference`` (the dense model in fp32: the same as
        ``dense`` in fp32) and ``pruned`` (at ``widths``), in ms, timed interleaved, and ``ratio``: the paired
        speed-up of ``pruned`` over ``reference`` (:func:`converters.latency.model_timing`). ``store=False``
        keeps a fresh measurement out of the cache (:meth:`store`); ``fresh`` measures again."""
        from converters.latency import model_timing

        graphs, pairs = self._graphs(widths)
        t = model_timing(graphs, self.feed, pairs, threads=self.target.threads,
                         cache=None if fresh else self.cache, precision=self.target.precision, store=store)
        self.last = (graphs, pairs, t)
        ms = t["ms"]
        return {"dense": ms["dense"], "reference": ms.get("reference", ms["dense"]), "pruned": ms["pruned"],
                "ratio": t["ratio"][f"{pairs[0][0]}/pruned"]}

    def store(self) -> None:
        """Write the last measurement (made with ``store=False``) into the timing cache."""
        from converters.latency import store_timing

        graphs, pairs, t = self.last
        store_timing(graphs, self.feed, pairs, t, threads=self.target.threads, cache=self.cache,
                     precision=self.target.precision)

    def _graphs(self, widths):
        if self._dense is None:
            self._dense = self.graph(None)
        graphs = {"dense": self._dense, "pruned": self.graph(widths)}
        if self.target.precision != "fp32":
            graphs["reference"] = self.reference()
            return graphs, [("reference", "pruned")]
        return graphs, [("dense", "pruned")]

    def __call__(self, widths: dict[str, int] | None) -> tuple[float, float, float]:
        """(the reference's ms, the model's at ``widths``, the paired speed-up of the one over the other)."""
        ms = self.times(widths)
        return ms["reference"], ms["pruned"], ms["ratio"]


#: re-measurements of a calibration whose half-width model did not run faster than the dense one
RECALIBRATE = 2


def build_table(model, plan: StructurePlan, export_rows: dict[str, np.ndarray], feed: dict[str, np.ndarray],
                target: SpeedTarget, calibration: dict | None = None, inner_of=lambda m: m,
                timer: WholeTimer | None = None) -> LatencyTable:
    """Time every family's ops at its candidate widths (cached), then the whole dense model and the whole
    model with every family at half width (exported from ``model`` at ``export_rows``; ``inner_of(model)`` is
    the module the families name; timed on ``feed``: the serving batch), and calibrate. ``plan``'s trace ran
    on ``len(export_rows)`` rows."""
    from converters.latency import OpCache, time_specs

    timer = timer or WholeTimer(model, plan, export_rows, feed, target, calibration, inner_of)
    traced = len(next(iter(export_rows.values())))
    widths = {f.name: candidate_widths(f) for f in plan.families}
    specs = {(f.name, w): family_specs(plan, f, w, target.batch, traced)
             for f in plan.families for w in widths[f.name]}
    timed = time_specs([s for v in specs.values() for s in v], threads=target.threads,
                       cache=OpCache(timer.cache, target.threads) if timer.cache is not None else None)
    ms = {f.name: [sum(timed[s] for s in specs[(f.name, w)]) for w in widths[f.name]] for f in plan.families}
    half = {f.name: max(1, f.n_units // 2) for f in plan.families}
    whole = timer.times(half, store=False)
    for _ in range(RECALIBRATE):  # a half-width model not faster than the dense one: the timing was disturbed
        if whole["pruned"] < whole["dense"]:
            break
        whole = timer.times(half, store=False, fresh=True)
    if whole["pruned"] < whole["dense"]:
        timer.store()  # never a calibration that says smaller is not faster
    half_ms = whole["pruned"]
    table = LatencyTable(widths, ms, whole["dense"], n_units={f.name: f.n_units for f in plan.families},
                         reference_ms=None if target.precision == "fp32" else whole["reference"])
    table.calibrate(half_ms)
    table.half_ms = half_ms
    table.calibration = {"half": {"widths": half, "ms": half_ms}}
    return table


def recalibrated(table: LatencyTable, widths: dict[str, int], dense_ms: float,
                 pruned_ms: float) -> LatencyTable:
    """``table`` with ``rest`` and ``scale`` fitted through two measured whole models: the dense one and the
    one at ``widths``."""
    full = sum(table.ms[f][-1] for f in table.widths)
    part = sum(table.family_ms(f, widths.get(f, table.n_units[f])) for f in table.widths)
    out = LatencyTable(table.widths, table.ms, dense_ms, table.rest_ms, table.scale, table.n_units,
                       table.half_ms, table.seconds, dict(table.calibration), table.reference_ms)
    if full - part > 1e-9:
        out.scale = max(0.0, (dense_ms - pruned_ms) / (full - part))
        out.rest_ms = dense_ms - out.scale * full
        if out.rest_ms < 0 and part > 1e-9:  # the units saved more than their ops: exact at the smaller model
            out.rest_ms, out.scale = 0.0, pruned_ms / part
    return out


__all__ = ["LatencyTable", "SpeedTarget", "WholeTimer", "build_table", "candidate_widths", "family_specs",
           "recalibrated"]
