"""Rewrite the pruned layers of an exported model into the chosen formulations.

``convert(model, layers, fmt=...)``: locate every pruned weight, choose a formulation per layer (the one asked
for, or with ``auto`` the fastest measured in ONNX Runtime on this machine, ties going to the smallest), apply
the rewrites, and record per layer what was chosen and why. The result carries, in its metadata, which tensors
hold each layer's values, so the achieved sparsity can be measured from the final bytes.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper

from .errors import ConverterError
from .chain import feature_major
from .formulations import FORMULATIONS, Rewrite
from .graph import GraphIndex
from .locate import Site, locate
from .manifest import LayerBlocks
from .runtime import session, time_interleaved

log = logging.getLogger(__name__)

#: every choice the CLI offers: the formulations plus ``auto``.
FORMATS: tuple[str, ...] = ("auto", *FORMULATIONS)
METADATA_KEY = "sapp_compress.layers"
TIE = 0.05  # within 5 % of the fastest counts as a tie; the smallest wins


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

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ConversionResult:
    model: onnx.ModelProto
    layers: list[LayerOutcome]

    def to_json(self) -> dict:
        return {"layers": [lo.to_json() for lo in self.layers]}


def apply(model: onnx.ModelProto, rewrite: Rewrite) -> None:
    """Apply one rewrite to ``model`` in place. The replaced initializer is always removed: blocked
    rewrites were its only consumer (``locate`` checks), and compact / sparse-initializer rewrites produce
    a tensor of the same name."""
    g = model.graph
    nodes = list(g.node)
    if rewrite.replace_node is not None:
        pos = next(i for i, n in enumerate(nodes) if n is rewrite.replace_node)
        nodes[pos : pos + 1] = rewrite.nodes
    else:
        nodes = rewrite.nodes + nodes
    dropped = {id(n) for n in rewrite.drop_nodes}
    nodes = [copy.deepcopy(n) for n in nodes if id(n) not in dropped]
    del g.node[:]
    g.node.extend(nodes)
    if rewrite.drop_init:
        keep = [t for t in g.initializer if t.name != rewrite.drop_init]
        del g.initializer[:]
        g.initializer.extend(keep)
        # a stale type annotation of the old dense tensor would contradict its new producer
        for field_ in (g.value_info, g.input):
            stale = [v for v in field_ if v.name == rewrite.drop_init]
            for v in stale:
                field_.remove(v)
    g.initializer.extend(rewrite.inits)


def _single_layer(model: onnx.ModelProto, site: Site, in_shape: list[int]) -> tuple[onnx.ModelProto, Site]:
    """A model of just the layer (its node, weight, bias) on an input of ``in_shape``, for timing."""
    idx = GraphIndex(model.graph)
    node = copy.deepcopy(site.node)
    nodes = [node]
    via = None
    if site.via_transpose is not None:
        via = copy.deepcopy(site.via_transpose)
        nodes.insert(0, via)
    inits = [copy.deepcopy(idx.inits[n]) for n in {*node.input, *(via.input if via else [])} if n in idx.inits]
    x = helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "layer", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m, Site(site.layer, site.init_name, node, site.stored, site.weight, via)


def _input_shapes(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """Static shapes of every tensor with the batch axis fixed to ``batch`` (unknown ones left out)."""
    m = copy.deepcopy(model)
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = batch
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


def _choose(model: onnx.ModelProto, site: Site, shapes: dict, threads: int | None
            ) -> tuple[str, str | None, dict | None]:
    """(format, reason, latencies) for ``auto``."""
    applicable = {name: f for name, f in FORMULATIONS.items() if f.reason_not(site) is None}
    blocked_reason = FORMULATIONS["blocked"].reason_not(site)
    in_shape = shapes.get(site.node.input[0])
    if in_shape is None:
        return "compact", "activation shape unknown, not timed: compact storage, dense runtime", None
    layer_model, lsite = _single_layer(model, site, in_shape)
    sessions, sizes = {}, {}
    for name, f in applicable.items():
        m = copy.deepcopy(layer_model)
        rw = f.build(_relocate(m, lsite), GraphIndex(m.graph))
        apply(m, rw)
        # timed as deployed: ORT's default thread spinning on (a layer's many small nodes gain from it at
        # 2+ threads), with a pause before each sample so the last session's spinning threads have parked
        sessions[name] = session(m, threads=threads)
        sizes[name] = rw.stored_bytes
    rng = np.random.default_rng(0)
    feed = {site.node.input[0]: rng.standard_normal(in_shape).astype(np.float32)}
    lat = time_interleaved(sessions, feed, pause_s=0.005 if (threads or 0) != 1 else 0.0)
    # Dense, compact and sparse-initializer run the same dense op after ORT loads them, so any gap between
    # their timings is noise: rank them all at the group's best time (the dense op's speed as far as this
    # machine showed it), and let size decide among them. (The group's median let blocked through at 1.16x
    # a dense measurement when the other two drew slow samples: ResCNN B = 16, N = 256, 2 threads.)
    group = [n for n in lat if applicable[n].folds_to_dense]
    ranked = dict(lat)
    if group:
        g = float(min(lat[n] for n in group))
        ranked.update({n: g for n in group})
    fastest = min(ranked.values())
    ties = [n for n in ranked if ranked[n] <= fastest * (1 + TIE)]
    pick = min(ties, key=lambda n: (sizes[n], ranked[n]))
    reason = None
    if pick != "blocked":
        why = blocked_reason or (f"blocked {lat['blocked']:.3g} ms vs dense {lat['dense']:.3g} ms at "
                                 f"{in_shape}: sparse compute does not pay here")
        reason = f"{pick} (smallest of the fastest); {why}"
    return pick, reason, {k: round(v, 5) for k, v in lat.items()}


def _relocate(model: onnx.ModelProto, site: Site) -> Site:
    """The same site with its node objects taken from ``model``'s current node list."""
    node = next(n for n in model.graph.node if n == site.node)
    via = next(n for n in model.graph.node if n == site.via_transpose) if site.via_transpose else None
    return Site(site.layer, site.init_name, node, site.stored, site.weight, via)


def convert(model: onnx.ModelProto, layers: list[LayerBlocks], *, fmt: str = "auto",
            timing_inputs: dict[str, np.ndarray] | None = None, threads: int | None = None) -> ConversionResult:
    """Rewrite every pruned layer of ``model`` (a dense export) into formulation ``fmt`` (see :data:`FORMATS`).

    ``timing_inputs`` fix the batch size at which ``auto`` times candidates (default: batch 1).
    The input model is not modified.
    """
    if fmt not in FORMATS:
        raise ConverterError(f"format: expected one of {FORMATS}, got {fmt!r}")
    out = copy.deepcopy(model)
    sites, unplaced = locate(out, layers)
    outcomes: dict[str, LayerOutcome] = {}
    for name, (init_name, op, reason) in unplaced.items():
        lb = next(lb for lb in layers if lb.name == name)
        outcomes[name] = LayerOutcome(name, op, "dense", reason, lb.weight.nbytes, lb.weight.nbytes,
                                      balanced=lb.balanced, value_tensors=[init_name])
    batch = len(next(iter(timing_inputs.values()))) if timing_inputs else 1
    shapes = _input_shapes(out, batch) if fmt == "auto" else {}
    for site in sites:
        lb = site.layer
        latencies = None
        if fmt == "auto":
            chosen, reason, latencies = _choose(out, site, shapes, threads)
        else:
            why = FORMULATIONS[fmt].reason_not(site)
            chosen, reason = (fmt, None) if why is None else ("dense", f"{fmt} not applicable: {why}")
            if chosen == "dense" and reason is None:
                reason = "dense requested"
        site = _relocate(out, site)  # earlier rewrites rebuilt the node list
        rw = FORMULATIONS[chosen].build(site, GraphIndex(out.graph))
        apply(out, rw)
        outcomes[lb.name] = LayerOutcome(lb.name, site.node.op_type, chosen, reason, rw.stored_bytes,
                                         lb.weight.nbytes, latencies, lb.balanced, rw.value_tensors)
        log.info("%s: %s%s", lb.name, chosen, f" ({reason})" if reason else "")
    feature_major(out)  # lets ORT cancel the Transposes between consecutive blocked N-D linears
    ordered = [outcomes[lb.name] for lb in layers]
    meta = [{"name": o.name, "format": o.fmt, "weight_shape": list(lb.weight_shape), "block": list(lb.block),
             "values": o.value_tensors or [], "reason": o.reason} for o, lb in zip(ordered, layers)]
    del out.metadata_props[:]
    out.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    return ConversionResult(out, ordered)
