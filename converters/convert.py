"""Rewrite the pruned layers of an exported model into the chosen formulations.

``convert(model, layers, fmt=...)``: locate every pruned weight, choose a formulation per layer (the one asked
for, or with ``auto`` the fastest measured in ONNX Runtime on this machine, ties going to the smallest), apply
the rewrites, and record per layer what was chosen and why. The result carries, in its metadata, which tensors
hold each layer's values, so the achieved sparsity can be measured from the final bytes. The choosing is
:mod:`converters.choose`'s; this module builds the choices and writes the result.

``auto``'s measurements go through a per-machine timing cache (:mod:`converters.cache`,
:mod:`converters.timing`), so the same model and masks on the same machine give the same choices and bytes;
the result's plan (:mod:`converters.plan`) replays them with no timing at all.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from . import qdq
from .cache import TimingCache
from .chain import feature_major, share_layout
from .choose import auto_choices, calibrate_inputs, fixed_choices, replayed_choices
from .errors import ConverterError
from .formulations import FORMULATIONS
from .graph import GraphIndex, prune_unused
from .int8 import Int8Rewrite, default_weight_bits  # importing int8 registers its formulations
from .locate import Site, locate, relocate
from .manifest import LayerBlocks
from .plan import LayerChoice, Plan
from .rewrite import apply
from .timing import Timer

log = logging.getLogger(__name__)

#: every choice the CLI offers: the formulations plus ``auto``.
FORMATS: tuple[str, ...] = ("auto", *(n for n, f in FORMULATIONS.items() if f.precision == "fp32"))
#: ``quantize`` choices, and the weight precisions each lets ``convert`` use
QUANTIZE: dict[str, frozenset[str]] = {"none": frozenset({"fp32"}), "int8": frozenset({"fp32", "int8"})}
METADATA_KEY = "sapp_compress.layers"


@dataclass
class LayerOutcome:
    name: str
    op_type: str
    fmt: str
    reason: str | None
    stored_bytes: int
    dense_bytes: int
    latencies_ms: dict[str, float] | None = None
    balanced: bool | None = None
    value_tensors: list[str] = field(default_factory=list)
    #: ``auto``: the medians (ms) per timed input shape, e.g. ``{"8x128x768": {...}, "1x128x768": {...}}``
    latencies_by_shape: dict[str, dict[str, float]] | None = None
    #: int8 formulations: weight bits, activation scales' kind, graph layout, kernel, the CPU's VNNI flag
    int8: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ConversionResult:
    """The converted model, what happened to each layer, the plan that replays it, and how the choices were
    made: ``timing`` = ``{"choices": "timed" | "replayed" | "fixed", "measured": n, "from_cache": n,
    "whole_model": auto's whole-model decisions or None}`` (``measured`` / ``from_cache``: the measurements
    ``auto`` made and those it read from the timing cache)."""

    model: onnx.ModelProto
    layers: list[LayerOutcome]
    plan: Plan | None = None
    timing: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layers": [lo.to_json() for lo in self.layers], "timing": self.timing}


def _build(model: onnx.ModelProto, layers: list[LayerBlocks], choices: dict[str, tuple],
           calibration: list[dict[str, np.ndarray]] | None = None,
           acts: dict[str, tuple[float, int]] | None = None,
           bits: dict[str, int | None] | None = None) -> tuple[onnx.ModelProto, dict[str, LayerOutcome]]:
    """``model`` (not modified) with every located layer rewritten as ``choices[name] = (fmt, reason,
    latencies, per_size)`` says; the layers found but left dense are recorded with their reason. int8 convs
    are then quantized by the QDQ pass (:func:`converters.qdq.finish`) with ``calibration``. ``bits``: the
    int8 weight bits per layer (a replayed plan's; default: this CPU's)."""
    out = copy.deepcopy(model)
    sites, unplaced = locate(out, layers)
    outcomes: dict[str, LayerOutcome] = {}
    int8_convs: dict[str, tuple[Site, Int8Rewrite]] = {}
    keep_fp32: list[str] = []
    for name, (init_name, op, reason) in unplaced.items():
        lb = next(lb for lb in layers if lb.name == name)
        outcomes[name] = LayerOutcome(name, op, "dense", reason, lb.weight.nbytes, lb.weight.nbytes,
                                      balanced=lb.balanced, value_tensors=[init_name])
    for site in sites:
        lb = site.layer
        chosen, reason, latencies, per_size = choices[lb.name]
        # relocated: the rewrites before this one rebuilt the nodes
        site = replace(relocate(out, site), act=(acts or {}).get(site.node.input[0]),
                       weight_bits=(bits or {}).get(lb.name))
        rw = FORMULATIONS[chosen].build(site, GraphIndex(out.graph))
        apply(out, rw)
        if isinstance(rw, Int8Rewrite) and rw.qdq_nodes:
            int8_convs[lb.name] = (site, rw)
        else:
            keep_fp32.append(site.node.name)
        q = getattr(rw, "weight_bits", None) and {k: getattr(rw, k) for k in
                                                  ("weight_bits", "activation", "layout", "kernel", "vnni")}
        outcomes[lb.name] = LayerOutcome(lb.name, site.node.op_type, chosen, reason, rw.stored_bytes,
                                         lb.weight.nbytes, latencies, lb.balanced, rw.value_tensors, per_size,
                                         q or None)
        log.info("%s: %s%s", lb.name, chosen, f" ({reason})" if reason else "")
    feature_major(out)  # lets ORT cancel the Transposes between consecutive blocked N-D linears
    share_layout(out)  # one transposed input for all blocked layers that read the same tensor
    prune_unused(out.graph)
    if int8_convs:
        out, stored = qdq.finish(out, int8_convs, calibration, dense_nodes=model.graph.node,
                                 keep_fp32=keep_fp32)
        for name, (values, size) in stored.items():
            outcomes[name].value_tensors, outcomes[name].stored_bytes = values, size
    return onnx.load_from_string(out.SerializeToString()), outcomes  # a compact copy, without dead messages


class _Builds:
    """:func:`_build` of one model, layers and calibration, keeping the last :data:`KEEP` models built by
    their formats (the reasons, which change while ``auto``'s whole-model stage decides, are taken from each
    call's choices): the stage builds a candidate only to time it, and its winner is not built twice."""

    KEEP = 3

    def __init__(self, model, layers, calibration, acts, bits=None) -> None:
        self.args = (model, layers)
        self.kw = dict(calibration=calibration, acts=acts, bits=bits)
        self.memo: dict[tuple, tuple[onnx.ModelProto, dict[str, LayerOutcome]]] = {}

    def __call__(self, choices: dict[str, tuple]) -> tuple[onnx.ModelProto, dict[str, LayerOutcome]]:
        key = tuple(sorted((n, c[0]) for n, c in choices.items()))
        if key not in self.memo:
            if len(self.memo) >= self.KEEP:
                del self.memo[next(iter(self.memo))]
            self.memo[key] = _build(*self.args, choices, **self.kw)
        out, outcomes = self.memo[key]
        return out, {n: replace(o, reason=choices[n][1]) if n in choices else replace(o)
                     for n, o in outcomes.items()}


def convert(model: onnx.ModelProto, layers: list[LayerBlocks], *, fmt: str = "auto",
            timing_inputs: dict[str, np.ndarray] | None = None, threads: int | None = None,
            quantize: str = "none", calibration_inputs: dict[str, np.ndarray] | None = None,
            cache: TimingCache | None = None, plan: Plan | None = None) -> ConversionResult:
    """Rewrite every pruned layer of ``model`` (a dense export) into formulation ``fmt`` (see
    :data:`FORMATS`).

    ``auto`` times every applicable formulation per layer at the shapes ``timing_inputs`` give each layer (all
    their axes; without them: batch 1, other symbolic axes unknown, so such layers are not timed) and at batch
    1 (at :data:`converters.choose.LARGE_BATCH` when the timing inputs have one row), and keeps the one whose
    worst ratio to dense is best (ties to the smallest); with timing inputs the whole model is then timed too
    (see :func:`converters.choose.auto_choices`). The input model is not modified.

    ``cache`` (:class:`converters.cache.TimingCache`; None: measure every time): ``auto`` reads each
    measurement there before making it, and stores what it measures, so the same model and masks on the same
    machine give the same choices and bytes. ``plan`` (:class:`converters.plan.Plan`, with ``fmt="auto"``):
    replay a previous conversion's choices instead of timing (:class:`converters.plan.PlanMismatch` if it was
    made for other layers or masks). The result's ``plan`` is what replays this conversion.

    ``quantize="int8"`` adds the int8 formulations (:mod:`converters.int8`) to what ``auto`` ranks (the
    fastest wins, ties to the smallest, so int8 wins its ties), and turns a fixed ``blocked`` / ``compact``
    into ``blocked-int8`` / ``compact-int8`` where they apply (the others keep the fp32 format). int8 convs
    (:mod:`converters.qdq`) need static activation scales: they are calibrated on ``calibration_inputs``
    (graph input name -> rows; default: the timing inputs), and without either convs stay fp32. In a conv net
    the QDQ pass also puts the unpruned convs and the ops between them in int8; ``auto`` keeps the int8 convs
    only where the whole model is not slower than with them in fp32 (:mod:`converters.choose`).
    """
    if fmt not in FORMATS:
        raise ConverterError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if quantize not in QUANTIZE:
        raise ConverterError(f"quantize: expected one of {tuple(QUANTIZE)}, got {quantize!r}")
    if plan is not None and fmt != "auto":
        raise ConverterError(f"format: a plan replays auto's choices, expected fmt 'auto' with it, "
                             f"got {fmt!r}")
    if plan is not None:
        plan.check(layers)
    precisions = QUANTIZE[quantize]
    calib_src = calibration_inputs or timing_inputs
    calibration = qdq.calibration_batches(calib_src) if calib_src and "int8" in precisions else None
    probe = copy.deepcopy(model)
    sites, _ = locate(probe, layers)
    acts = calibrate_inputs(probe, sites, calibration) if calibration else {}
    sites = [replace(site, act=acts.get(site.node.input[0])) for site in sites]
    bits = {c.name: c.weight_bits for c in plan.layers} if plan is not None else None
    build = _Builds(model, layers, calibration, acts, bits)
    timer = Timer(cache, probe, threads, "fp32" if "int8" not in precisions
                  else f"int8/w{default_weight_bits()}")
    decisions = None
    if plan is not None:
        choices = replayed_choices(sites, plan, precisions)
    elif fmt == "auto":
        choices, decisions = auto_choices(model, probe, layers, sites, timing_inputs, timer, build,
                                          precisions)
    else:
        choices = fixed_choices(sites, fmt, precisions)
    out, outcomes = build(choices)
    build.memo.clear()
    ordered = [outcomes[lb.name] for lb in layers]
    meta = [{"name": o.name, "format": o.fmt, "weight_shape": list(lb.weight_shape), "block": list(lb.block),
             "values": o.value_tensors or [], "reason": o.reason} for o, lb in zip(ordered, layers)]
    del out.metadata_props[:]
    out.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    done = Plan(tuple(LayerChoice.of(lb, o.fmt, o.reason, o.int8) for o, lb in zip(ordered, layers)))
    how = "replayed" if plan is not None else "timed" if fmt == "auto" else "fixed"
    return ConversionResult(out, ordered, done, {"choices": how, "measured": timer.measured,
                                                  "from_cache": timer.cached, "whole_model": decisions})
