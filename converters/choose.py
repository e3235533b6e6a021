"""Choosing a formulation per pruned layer: ``auto``'s timing and ranking, a replayed plan, or a fixed format.

The three entry points below return ``choices``, which :func:`converters.convert.convert` builds:
``{layer name: (format, reason, latencies, latencies per timed size)}`` (the last two None where nothing was
timed).

- :func:`auto_choices`: every applicable formulation of each layer timed on the layer alone, in ONNX Runtime
  on this machine, at each shape of :func:`timing_feeds`, and ranked by its worst ratio to the dense op
  (:func:`rank_candidates`; ties within :data:`TIE` go to the smallest); with timing inputs the whole model is
  then timed too (:func:`_settle`). Measurements go through ``auto``'s timing cache
  (:class:`converters.timing.Timer`).
- :func:`replayed_choices`: a previous conversion's plan (:mod:`converters.plan`), checked, nothing timed.
- :func:`fixed_choices`: one format for every layer (its int8 form where asked for and applicable).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from . import qdq
from .export import one_line
from .formulations import FORMULATIONS
from .graph import GraphIndex

# importing int8 registers its formulations
from .int8 import Int8Rewrite, calibrate_activation, default_weight_bits
from .locate import Site, relocate
from .manifest import LayerBlocks
from .plan import Plan, PlanMismatch
from .rewrite import apply
from .runtime import session, time_interleaved
from .runtimes import Session, reference_session
from .timing import Timer

log = logging.getLogger(__name__)

TIE = 0.05  # within 5 % of the fastest counts as a tie; the smallest wins
WHOLE_MODEL_FLOOR = 0.95  # auto's whole model may not run slower than this ratio of dense
#: given timing inputs of one row, auto also times at this batch (a layer picked at batch 1 alone made
#: DistilBERT 0.92x dense at batch 16)
LARGE_BATCH = 16

#: ``(format, reason, latencies, latencies per timed size)`` of one layer
Choice = tuple[str, str | None, dict | None, dict | None]
#: builds the model of some choices: ``(model, outcomes by layer)`` (:class:`converters.convert._Builds`)
Build = Callable[[dict[str, tuple]], tuple[onnx.ModelProto, dict]]


def timing_feeds(timing_inputs: dict[str, np.ndarray] | None) -> list[dict[str, np.ndarray]]:
    """The inputs ``auto`` times at: ``timing_inputs`` as given (every axis, batch and sequence alike), then
    their first row when the timing batch is larger, or their row repeated to :data:`LARGE_BATCH` rows when
    it is 1; so a choice holds from one row up to the larger batch. Empty without timing inputs."""
    if not timing_inputs:
        return []
    feeds = [dict(timing_inputs)]
    if all(np.ndim(v) and len(v) > 1 for v in timing_inputs.values()):
        feeds.append({k: np.ascontiguousarray(v[:1]) for k, v in timing_inputs.items()})
    elif all(np.ndim(v) and len(v) == 1 for v in timing_inputs.values()):
        feeds.append({k: np.repeat(v, LARGE_BATCH, axis=0) for k, v in timing_inputs.items()})
    return feeds


def _probe(model: onnx.ModelProto, names: set[str]) -> tuple[Session, list[str], set[str]]:
    """A session of ``model`` (unoptimized) that also outputs the inner tensors ``names``, the names it
    outputs (the graph inputs among ``names`` are not: they are the feed), and those graph inputs."""
    m = copy.deepcopy(model)
    inputs = {i.name for i in m.graph.input} & set(names)
    have = {o.name for o in m.graph.output}
    extra = sorted(n for n in names if n not in have and n not in inputs)
    m.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    return reference_session(m), [*extra, *sorted(n for n in names if n in have)], inputs


def _shapes_by_running(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: set[str]
                       ) -> dict[str, list[int]]:
    """Shapes of the tensors ``names`` on ``feed``, by running ``model`` once in ORT with them as extra
    outputs.

    Shape inference cannot always derive them from the inputs' shapes: with a batch of 1, a BERT export's
    ``Expand`` of the token-type ids leaves the batch axis unknown, and so every activation after it."""
    known = {n: list(np.shape(feed[n])) for n in names if n in feed}
    sess, outputs, _ = _probe(model, {n for n in names if n not in feed})
    try:
        outs = sess.run(outputs, feed) if outputs else []
    except Exception as e:  # noqa: BLE001 -- an unrunnable feed means "not timed", with the reason logged
        log.warning("timing inputs do not run through the model (%s): layers not timed",
                    one_line(e))
        return known
    return {**known, **{n: list(np.shape(o)) for n, o in zip(outputs, outs)}}


def calibrate_inputs(model: onnx.ModelProto, sites: list[Site], calibration: list[dict[str, np.ndarray]]
                      ) -> dict[str, tuple[float, int]]:
    """The uint8 (scale, zero point) of every pruned layer's input over the calibration feeds (their min / max
    widened to 0, :func:`converters.int8.calibrate_activation`), by running ``model`` with those inputs as
    extra outputs: what the static int8 linears quantize with, and for convs the sign that int8 can be
    calibrated (ORT's QDQ pass calibrates them itself)."""
    sess, outputs, inputs = _probe(model, {s.node.input[0] for s in sites})
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feed in calibration:
        got = {**dict(zip(outputs, sess.run(outputs, feed) if outputs else [])),
               **{n: feed[n] for n in inputs}}
        for n, v in got.items():
            lo[n] = min(lo.get(n, 0.0), float(np.min(v)))
            hi[n] = max(hi.get(n, 0.0), float(np.max(v)))
    out = {}
    for n in lo:
        scale, zp = calibrate_activation(np.asarray([lo[n], hi[n]], np.float32))
        out[n] = (float(scale), int(zp))
    return out


def _input_shapes(model: onnx.ModelProto, feed_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Static shapes of every tensor when the graph inputs have ``feed_shapes`` (unknown ones left out), by
    shape inference (used without timing inputs; with them, :func:`_shapes_by_running` is exact).

    Every axis given is fixed (a shape shorter than the input's rank fixes its leading axes), and the export's
    symbolic annotations of inner tensors are dropped first, so that inference derives them from the
    inputs."""
    m = copy.deepcopy(model)
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for d, v in zip(dims, feed_shapes.get(vi.name, [])):
            if not d.dim_value:
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 -- shape inference is best effort; an unknown shape means "not timed"
        return {}
    out = {}
    for vi in (*m.graph.input, *m.graph.value_info, *m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    return out


def _single_layer(model: onnx.ModelProto, site: Site, in_shapes: list[list[int]]
                  ) -> tuple[onnx.ModelProto, Site]:
    """A model of just the layer (its node, weight, bias) on its input, the axes that differ between
    ``in_shapes`` symbolic, so one session times it at every size."""
    idx = GraphIndex(model.graph)
    node = copy.deepcopy(site.node)
    nodes = [node]
    via = None
    if site.via_transpose is not None:
        via = copy.deepcopy(site.via_transpose)
        nodes.insert(0, via)
    inits = [copy.deepcopy(idx.inits[n]) for n in {*node.input, *(via.input if via else [])}
             if n in idx.inits]
    dims = [d if all(sh[i] == d for sh in in_shapes) else f"d{i}" for i, d in enumerate(in_shapes[0])]
    x = helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "layer", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m, replace(site, node=node, via_transpose=via, consumers=1)


def _time_layer(model: onnx.ModelProto, site: Site, in_shapes: list[list[int]], applicable: dict,
                threads: int | None) -> dict:
    """Every formulation of ``applicable`` built on the layer alone and timed interleaved at each of
    ``in_shapes``:
    ``{"per_size": {"16x64": {formulation: median ms}}, "stored_bytes": {formulation: bytes}}``."""
    layer_model, lsite = _single_layer(model, site, in_shapes)
    sessions, sizes = {}, {}
    for name, f in applicable.items():
        m = copy.deepcopy(layer_model)
        rw = f.build(relocate(m, lsite), GraphIndex(m.graph))
        apply(m, rw)
        if isinstance(rw, Int8Rewrite) and rw.qdq_nodes:  # timed as ORT runs it: QDQ, calibrated on noise
            noise = np.random.default_rng(0).standard_normal(in_shapes[0]).astype(np.float32)
            calib = [{site.node.input[0]: noise}]
            m, stored = qdq.finish(m, {site.layer.name: (lsite, rw)}, calib)
            rw.stored_bytes = stored[site.layer.name][1]
        # timed as deployed: ORT's default thread spinning on (a layer's many small nodes gain from it at
        # 2+ threads), with a pause before each sample so the last session's spinning threads have parked
        sessions[name] = session(m, threads=threads or None)
        sizes[name] = rw.stored_bytes
    rng = np.random.default_rng(0)
    per_size = {}
    for shape in in_shapes:
        feed = {site.node.input[0]: rng.standard_normal(shape).astype(np.float32)}
        lat = time_interleaved(sessions, feed, pause_s=0.005 if (threads or 0) != 1 else 0.0)
        per_size["x".join(map(str, shape))] = {k: round(v, 5) for k, v in lat.items()}
    return {"per_size": per_size, "stored_bytes": sizes}


def _rank(lat: dict[str, float], applicable: dict) -> dict[str, float]:
    """Each candidate's latency relative to the dense op's: dense, compact and sparse-initializer run the same
    dense op after ORT loads them, so any gap between their timings is noise; they all rank at the group's
    best time (the dense op's speed as far as this machine showed it), which is 1. (The group's median let
    blocked through at 1.16x a dense measurement when the other two drew slow samples: ResCNN B = 16, N = 256,
    2 threads.)"""
    group = [n for n in lat if applicable[n].folds_to_dense]
    g = float(min(lat[n] for n in group)) if group else float(min(lat.values()))
    return {n: 1.0 if n in group else v / g for n, v in lat.items()}


def rank_candidates(per_size: dict[str, dict[str, float]], applicable: dict, sizes: dict[str, int]
                    ) -> tuple[str, dict[str, float], dict[str, str]]:
    """(pick, worst ratio to the dense op per candidate, the size where it was worst) from medians per size.

    A candidate's rank is its worst ratio over the sizes (see :func:`_rank` for the dense group); ties within
    :data:`TIE` of the best rank go to the smallest ``sizes`` (stored bytes)."""
    worst: dict[str, float] = {}
    at: dict[str, str] = {}
    for key, lat in per_size.items():
        for n, r in _rank(lat, applicable).items():
            if r > worst.get(n, -1.0):
                worst[n], at[n] = r, key
    best = min(worst.values())
    ties = [n for n in worst if worst[n] <= best * (1 + TIE)]
    return min(ties, key=lambda n: (sizes[n], worst[n])), worst, at


def _choose(model: onnx.ModelProto, site: Site, shape_sets: list[dict], timer: Timer,
            precisions: frozenset[str]) -> Choice:
    """(format, reason, latencies, latencies per timed size) for ``auto``.

    Every applicable formulation is timed on the layer alone at each size of ``shape_sets`` (see
    :func:`timing_feeds`), interleaved (:func:`_time_layer`; through ``timer``, which reads the timing cache
    first). A candidate ranks by its worst ratio to the dense op over the sizes, so a
    layer that gains at batch 16 but loses at batch 1 (or the reverse) stays dense-runtime. Ties within
    :data:`TIE` of the best go to the smallest file. ``latencies`` (ms) are the timing size's, except that a
    candidate whose worst ratio came at another size is listed at that ratio times the timing size's dense
    time: the latency it was ranked at. The raw medians per size are the second dict."""
    applicable = {name: f for name, f in FORMULATIONS.items()
                  if f.precision in precisions and f.reason_not(site) is None}
    blocked_reason = FORMULATIONS["blocked"].reason_not(site)
    in_shapes = [shapes.get(site.node.input[0]) for shapes in shape_sets]
    if in_shapes[0] is None:
        return "compact", "activation shape unknown, not timed: compact storage, dense runtime", None, None
    in_shapes = [sh for sh in in_shapes if sh is not None]
    timed = timer.layer(site, in_shapes, list(applicable),
                        lambda: _time_layer(model, site, in_shapes, applicable, timer.threads))
    per_size, sizes = timed["per_size"], timed["stored_bytes"]
    pick, worst, at = rank_candidates(per_size, applicable, sizes)
    int8_convs = [n for n in worst if site.node.op_type == "Conv" and FORMULATIONS[n].precision == "int8"]
    if int8_convs:  # timed alone, an int8 conv pays a quantize and a dequantize it does not have in the model
        best = min(worst[n] for n in int8_convs)
        pick = min((n for n in int8_convs if worst[n] <= best * (1 + TIE)),
                   key=lambda n: (sizes[n], worst[n]))
    first = next(iter(per_size))
    dense_ref = min(per_size[first][n] for n in per_size[first] if applicable[n].folds_to_dense) \
        if any(applicable[n].folds_to_dense for n in per_size[first]) else None
    latencies = {n: (per_size[first][n] if at[n] == first or dense_ref is None
                     else round(worst[n] * dense_ref, 5))
                 for n in per_size[first]}
    reason = None
    if pick != "blocked":
        if blocked_reason:
            why = blocked_reason
        else:
            b = "blocked"
            why = (f"blocked at {worst[b]:.2f}x the dense op's time at {at[b]} ("
                   + ", ".join(f"{k}: {v[b]:.3g} ms vs dense {v['dense']:.3g} ms"
                               for k, v in per_size.items())
                   + "): sparse compute does not pay at every size")
        reason = f"{pick} (smallest of the fastest); {why}"
    if int8_convs:
        reason = (f"{pick}: the fastest int8 conv alone (its QDQ boundaries included); int8 against fp32 is "
                  f"decided on the whole model"
                  + (f"; {why}" if pick != "blocked-int8" and blocked_reason else ""))
    return pick, reason, latencies, per_size


def _whole_model_ratios(dense: onnx.ModelProto, models: dict[str, onnx.ModelProto],
                        feeds: list[dict[str, np.ndarray]], threads: int | None
                        ) -> dict[str, dict[str, float]]:
    """Dense time over each model's time, whole models interleaved with dense, per feed (keyed by the first
    input's shape): ``{model: {"8x128": 1.3, "1x128": 1.6}}``."""
    sess = {"dense": session(dense, threads=threads),
            **{k: session(m, threads=threads) for k, m in models.items()}}
    out: dict[str, dict[str, float]] = {k: {} for k in models}
    for feed in feeds:
        lat = time_interleaved(sess, feed, budget_s=1.0, min_rounds=7, max_rounds=31, loop_s=0.01,
                               pause_s=0.005 if (threads or 0) != 1 else 0.0)
        key = "x".join(map(str, np.shape(next(iter(feed.values())))))
        for k in models:
            out[k][key] = lat["dense"] / lat[k]
    return out


def _seen(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items())


def _best_fp32(per_size: dict[str, dict[str, float]]) -> str:
    """The fp32 formulation ``auto`` would have picked from a layer's timings (ties to the smaller
    storage)."""
    names = [k for k in next(iter(per_size.values())) if FORMULATIONS[k].precision == "fp32"]
    order = {k: i for i, k in enumerate(("compact", "blocked", "sparse-initializer", "dense"))}
    fp32 = {size: {k: v for k, v in lat.items() if k in names} for size, lat in per_size.items()}
    return rank_candidates(fp32, {k: FORMULATIONS[k] for k in names}, {k: order.get(k, 9) for k in names})[0]


def _settle(model: onnx.ModelProto, layers: list[LayerBlocks], choices: dict[str, Choice],
            feeds: list[dict[str, np.ndarray]], timer: Timer, build: Build, op_type: dict[str, str]) -> dict:
    """The whole-model stage of ``auto`` (changes ``choices`` in place; returns its decisions).

    A layer timed alone pays for its own layout changes (the Transposes around a blocked N-D linear), which in
    the whole model cancel between consecutive blocked layers. So the per-layer picks compete, as whole models
    timed interleaved with dense at every timing size, with the same model where every timed layer that
    blocked applies to is blocked; the second wins only by more than :data:`TIE` at its worst size. Then
    where the winner runs below :data:`WHOLE_MODEL_FLOOR` of dense at some size, the blocked layers with the
    least measured gain go back to dense runtime (compact storage), then all of them.

    Each comparison goes through ``timer`` (the timing cache), and a candidate model is built only when its
    comparison is measured; the decisions are a function of the ratios, whether measured or read.
    ``{"all_blocked": bool or None (not compared), "int8_convs": "int8" / "fp32" / None, "fallback": [layers
    put back to dense runtime]}``."""
    feed_shapes = [{k: list(np.shape(v)) for k, v in f.items()} for f in feeds]

    def ratios(candidates: dict[str, dict[str, tuple]]) -> dict[str, dict[str, float]]:
        formats = {k: {n: c[0] for n, c in cs.items()} for k, cs in candidates.items()}
        return timer.models(layers, feed_shapes, formats, lambda: {"ratios": _whole_model_ratios(
            model, {k: build(cs)[0] for k, cs in candidates.items()}, feeds,
            timer.threads or None)})["ratios"]

    decisions: dict = {"all_blocked": None, "int8_convs": None, "fallback": []}
    # fp32 picks only: a layer the user asked to quantize keeps its int8 formulation
    switch = [n for n, c in choices.items() if c[0] != "blocked" and FORMULATIONS[c[0]].precision == "fp32"
              and c[3] and all("blocked" in v for v in c[3].values())]
    candidates = {"per-layer": dict(choices)}
    if len(switch) >= 2:  # one layer alone has no neighbour to cancel a Transpose with
        alt = dict(choices)
        for n in switch:
            alt[n] = ("blocked", None, *choices[n][2:])
        candidates["all-blocked"] = alt
    r = ratios(candidates)
    score = {k: min(v.values()) for k, v in r.items()}
    if "all-blocked" in score:
        decisions["all_blocked"] = score["all-blocked"] > score["per-layer"] * (1 + TIE)
    if decisions["all_blocked"]:
        why = (f"blocked: the whole model ran at {_seen(r['all-blocked'])} of dense with every timable layer "
               f"blocked, {_seen(r['per-layer'])} with the per-layer picks")
        for n in switch:
            choices[n] = ("blocked", why, *choices[n][2:])
        current = r["all-blocked"]
    else:
        current = r["per-layer"]
    # int8 convs are timed alone with QDQ boundaries they do not have in the model, and share activation
    # scales with their neighbours: as a whole they must beat the same model with those convs in fp32
    int8_convs = [n for n, c in choices.items() if op_type.get(n) == "Conv" and c[3]
                  and FORMULATIONS[c[0]].precision == "int8"]
    if int8_convs:
        alt = dict(choices)
        for n in int8_convs:
            alt[n] = (_best_fp32(choices[n][3]), None, *choices[n][2:])
        r = ratios({"int8": dict(choices), "fp32": alt})
        if min(r["fp32"].values()) > min(r["int8"].values()) * (1 + TIE):
            why = (f"the whole model ran at {_seen(r['fp32'])} of dense with the convs in fp32, "
                   f"{_seen(r['int8'])} with them in int8")
            for n in int8_convs:
                choices[n] = (alt[n][0], f"{alt[n][0]}: {why}", *choices[n][2:])
            current, decisions["int8_convs"] = r["fp32"], "fp32"
        else:
            current, decisions["int8_convs"] = r["int8"], "int8"
    # every layer off the dense fp32 op (blocked, and the int8 formulations) can fall back
    blocked = [n for n, c in choices.items() if not FORMULATIONS[c[0]].folds_to_dense]
    # least gain first: the worst ratio to dense each such layer was ranked at (untimed ones last)
    gain = sorted(blocked, key=lambda n: -max((_rank(v, FORMULATIONS)[choices[n][0]]
                                               for v in (choices[n][3] or {}).values() if choices[n][0] in v),
                                              default=0.0))
    for step in (gain[: max(1, len(gain) // 2)], gain):
        if not blocked or min(current.values()) >= WHOLE_MODEL_FLOOR:
            break
        log.info("whole model at %s of dense: %d blocked layer(s) back to dense runtime", _seen(current),
                 len(step))
        _fallback(choices, step, f"the whole model with blocked layers ran at {_seen(current)} of dense")
        decisions["fallback"] = list(step)
        if step is not gain:
            current = ratios({"m": dict(choices)})["m"]
    return decisions


def _fallback(choices: dict[str, Choice], names: list[str], why: str) -> None:
    """Switch ``names`` (blocked layers) to compact: the dense op at run time, the kept blocks in the file
    (smaller than sparse-initializer's 12 bytes per kept value)."""
    store = "compact"
    for n in names:
        _, _, lat, per_size = choices[n]
        choices[n] = (store, f"{store} (dense runtime): {why}", lat, per_size)


def replayed_choices(sites: list[Site], plan: Plan, precisions: frozenset[str]) -> dict[str, Choice]:
    """The choices of ``plan`` for ``sites`` (checked: each format exists, is allowed by ``precisions`` and
    applies to its site), as ``(fmt, reason, None, None)``: nothing timed."""
    choices = {}
    for site in sites:
        c = plan[site.layer.name]
        f = FORMULATIONS.get(c.onnx_format)
        if f is None:
            raise PlanMismatch(f"{c.name}: the plan's format {c.onnx_format!r} is not one of "
                               f"{tuple(FORMULATIONS)}")
        if f.precision not in precisions:
            raise PlanMismatch(f"{c.name}: the plan's format {c.onnx_format} is {f.precision}, and this "
                               f"conversion is {'/'.join(sorted(precisions))} only (the plan was written "
                               "with --quantize int8)")
        why = f.reason_not(replace(site, weight_bits=c.weight_bits))
        if why is not None:
            raise PlanMismatch(f"{c.name}: the plan's format {c.onnx_format} does not apply here: {why}")
        choices[site.layer.name] = (c.onnx_format, c.reason, None, None)
    eight = [c.name for c in plan.layers if c.weight_bits == 8]
    if eight and default_weight_bits() != 8:
        log.warning("the plan stores %d layer(s) with 8-bit int8 weights (written on a CPU with VNNI); this "
                    "CPU has no VNNI, where ONNX Runtime's u8 x s8 kernels can saturate 8-bit weights (the "
                    "int8 kernel check measures it)", len(eight))
    return choices


def fixed_choices(sites: list[Site], fmt: str, precisions: frozenset[str]) -> dict[str, Choice]:
    """The choices for a fixed ``fmt`` (its int8 form where ``precisions`` allow and it applies)."""
    choices = {}
    for site in sites:
        want = fmt
        q = f"{fmt}-int8"
        if "int8" in precisions and q in FORMULATIONS and FORMULATIONS[q].reason_not(site) is None:
            want = q
        why = FORMULATIONS[want].reason_not(site)
        chosen, reason = (want, None) if why is None else ("dense", f"{want} not applicable: {why}")
        if chosen == "dense" and reason is None:
            reason = "dense requested"
        choices[site.layer.name] = (chosen, reason, None, None)
    return choices


def auto_choices(model: onnx.ModelProto, probe: onnx.ModelProto, layers: list[LayerBlocks], sites: list[Site],
                 timing_inputs: dict[str, np.ndarray] | None, timer: Timer, build: Build,
                 precisions: frozenset[str]) -> tuple[dict[str, Choice], dict | None]:
    """``auto``'s choices for ``sites`` (located in ``probe``, a copy of ``model``) and its whole-model
    decisions (:func:`_settle`; None when nothing was timed or there are no timing inputs).

    Each layer is timed at the shapes the feeds of :func:`timing_feeds` give its input (found by running
    ``probe``); without timing inputs at batch 1 by shape inference, other symbolic axes unknown, so such
    layers are not timed (:func:`_choose`)."""
    feeds = timing_feeds(timing_inputs)
    wanted = {site.node.input[0] for site in sites}
    shape_sets = ([_shapes_by_running(probe, f, wanted) for f in feeds] if feeds
                  else [_input_shapes(probe, {vi.name: [1] for vi in model.graph.input})])
    choices = {site.layer.name: _choose(probe, site, shape_sets, timer, precisions) for site in sites}
    decisions = None
    if feeds and any(c[2] for c in choices.values()):
        decisions = _settle(model, layers, choices, feeds, timer, build,
                            {s.layer.name: s.node.op_type for s in sites})
    return choices, decisions


__all__ = ["LARGE_BATCH", "TIE", "WHOLE_MODEL_FLOOR", "Build", "Choice", "auto_choices", "calibrate_inputs",
           "fixed_choices", "rank_candidates", "replayed_choices", "timing_feeds"]
