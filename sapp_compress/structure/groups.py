"""Structural groups: the units a trace found (:mod:`.trace`), gathered into families.

A **unit** is one connected component of the channel graph: the slices of every tensor that one attention
head, FFN neuron or conv channel touches (its rows of q, k and v and their biases and its columns of the
output projection; a neuron's row of the up and gate projections and its column of the down projection; a
channel's filter, its BatchNorm entries and the next convs' input channels). A **family** is the set of units
that touch the same tensors the same way (the 12 heads of one attention layer, the 3072 neurons of one FFN):
the structural analogue of a layer, and what per-layer uniform sparsity applies to.

A unit can be removed when nothing but later layers' weights ever sees it: it has a *producer* (a weight
whose output axis makes it) and a *consumer* (a weight that contracts it away), it is not *blocked* (it never
reached the model's output or an op the trace could not follow), and it is not the residual stream (its
channels were never added to another layer's channels). Every other weight axis is listed in
:attr:`StructurePlan.whole` with the reason.
"""
from __future__ import annotations

import fnmatch
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .trace import ChannelGraph, OpRecord, trace

Key = tuple[str, int]  # (tensor name, axis)

#: a neuron or channel family of at least twice this many units keeps a multiple of it under a uniform
#: ``--sparsity``: ONNX Runtime's conv and GEMM kernels lose much of their speed off multiples of 8 (a
#: resnet18 at s = 0.6 kept 26 / 51 / 102 / 205 channels and ran slower than at s = 0.5; BENCHMARKS.md section
#: 16.4)
UNIT_MULTIPLE = 8


@dataclass(frozen=True)
class GroupFamily:
    """Units that touch the same tensor axes the same way.

    Attributes:
        name: a readable name (the tensors' common module prefix and the kind).
        kind: ``heads`` (several channels per unit of a linear projection), ``neurons``, ``channels`` (conv
            output channels) or ``conv groups``.
        units: per unit, ``{(tensor, axis): indices}``.
        producers / consumers / channelwise: the tensor axes by role; the consumers are where a unit's
            output is used, so multiplying them by the unit's mask removes the unit's effect exactly.
    """

    name: str
    kind: str
    units: tuple[dict[Key, np.ndarray], ...]
    producers: tuple[Key, ...]
    consumers: tuple[Key, ...]
    channelwise: tuple[Key, ...]

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def keys(self) -> tuple[Key, ...]:
        return self.producers + self.consumers + self.channelwise

    @property
    def unit_size(self) -> int:
        """Channels per unit on the first producer axis (the head size for heads, 1 for neurons)."""
        return int(len(self.units[0][self.producers[0]]))

    def kept_units(self, sparsity: float) -> int:
        """Units this family keeps at a uniform ``sparsity``: ``round((1 - sparsity) n)``, and for neuron and
        channel families of at least ``2 * UNIT_MULTIPLE`` units the nearest multiple of :data:`UNIT_MULTIPLE`
        to it (ties up), unless that is the whole family (a prune asked for is never dropped) or the count is
        under the multiple. Heads and conv groups are counted exactly: each is a whole slice of its kernels
        already."""
        k = int(round((1.0 - sparsity) * self.n_units))
        if self.kind not in ("neurons", "channels") or self.n_units < 2 * UNIT_MULTIPLE or k < UNIT_MULTIPLE:
            return k
        snapped = UNIT_MULTIPLE * int(k / UNIT_MULTIPLE + 0.5)
        return snapped if snapped < self.n_units else k

    def index(self, key: Key) -> np.ndarray:
        """``[n_units, per_unit]``: each unit's indices along tensor axis ``key``."""
        return np.stack([u[key] for u in self.units])

    def tensors(self) -> list[str]:
        return sorted({k[0] for k in self.keys})

    @property
    def owner(self) -> str:
        """The deepest module holding every producer and consumer (the attention layer of a head family)."""
        return common_prefix([_module_of(t) for t, _ in self.producers + self.consumers])

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "units": self.n_units, "unit_size": self.unit_size,
                "producers": [f"{t}[{a}]" for t, a in self.producers],
                "consumers": [f"{t}[{a}]" for t, a in self.consumers],
                "channelwise": [f"{t}[{a}]" for t, a in self.channelwise]}


@dataclass(frozen=True)
class WholeAxis:
    """A weight axis left whole, and why."""

    tensor: str
    axis: int
    reason: str

    def to_json(self) -> dict:
        return {"name": f"{self.tensor}[{self.axis}]", "reason": self.reason}


@dataclass
class StructurePlan:
    """What :func:`discover` found: the families that can lose units, and every weight axis left whole."""

    families: list[GroupFamily]
    whole: list[WholeAxis] = field(default_factory=list)
    ops: int = 0
    #: the ops whose cost depends on the widths (:class:`~.trace.OpRecord`), each with the family whose heads
    #: it computes (attention cores) or None
    records: list[tuple[OpRecord, str | None]] = field(default_factory=list)

    def family(self, name: str) -> GroupFamily:
        return next(f for f in self.families if f.name == name)


@dataclass
class StructureResult:
    """A structured prune's outcome: each family's kept units, and the tensors' sizes before and after.

    Attributes:
        keep: family name -> boolean over its units.
        sizes_before / sizes_after: tensor name -> number of elements (parameters and buffers).
        parity: the smaller model's largest output difference from the masked model, as a share of its scale.
    """

    families: list[GroupFamily]
    keep: dict[str, np.ndarray]
    sizes_before: dict[str, int]
    sizes_after: dict[str, int]
    parity: float = 0.0
    buffers: frozenset[str] = frozenset()
    #: with ``--target-speedup``: the folded model before the removal (a corrective round removes more from
    #: it)
    folded: nn.Module | None = None
    #: with ``--target-speedup``: the latency table, the allocations made and the last loss table
    speed: dict | None = None

    def tensors(self) -> list[str]:
        return sorted({t for f in self.families for t in f.tensors()})

    @property
    def achieved_sparsity(self) -> float:
        """Share of the families' tensors' elements removed (weights, biases, norm parameters)."""
        names = self.tensors()
        before = sum(self.sizes_before[n] for n in names)
        return 1.0 - sum(self.sizes_after[n] for n in names) / before if before else 0.0

    def parameters(self) -> tuple[int, int]:
        """The model's parameter count before and after (buffers not counted)."""
        return (sum(v for k, v in self.sizes_before.items() if k not in self.buffers),
                sum(v for k, v in self.sizes_after.items() if k not in self.buffers))

    def rows(self) -> list[dict]:
        """One report row per family."""
        out = []
        for f in self.families:
            k = self.keep[f.name]
            names = f.tensors()
            out.append({**f.to_json(), "kept_units": int(k.sum()), "sparsity": 1.0 - float(k.mean()),
                        "kept": [int(i) for i in np.flatnonzero(k)],
                        "elements": {"before": sum(self.sizes_before[n] for n in names),
                                     "after": sum(self.sizes_after[n] for n in names)}})
        return out


def _module_of(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else ""


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix shared by every name (``""`` when none)."""
    parts = [n.split(".") for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _kind(model: nn.Module, producers: tuple[Key, ...], first: np.ndarray) -> str:
    """``heads`` (a unit is a run of adjacent channels of a linear producer: a head's rows), ``neurons``
    (one channel, or several apart: a fused gate-and-up projection's two rows of one neuron), ``channels``
    or ``conv groups``; ``first``: the first unit's indices on the first producer."""
    weights = [model.get_parameter(t) for t, _ in producers if model.get_parameter(t).dim() >= 2]
    conv = bool(weights) and weights[0].dim() > 2
    if conv:
        return "conv groups" if len(first) > 1 else "channels"
    return "heads" if bool((np.diff(np.sort(first)) == 1).any()) else "neurons"


#: why a tensor broadcast over several units (:attr:`~.trace.ChannelGraph.shared`) stays whole
SHARED = ("shared by every unit it is broadcast to (the key / value head of multi-query attention, a norm "
          "over a head's dimension): kept whole while the units go")


def _reason_of(blocked: str | None, residual: str | None, roles: set[str], n_units: int,
               shared: bool = False, tied: str | None = None) -> str:
    if "rows" in roles:
        return "the rows of an embedding table (one per token, position or type)"
    if residual:
        return "the residual stream: its channels are added to other layers' channels; its width stays"
    if blocked:
        return blocked
    if shared:
        return SHARED
    if "producer" not in roles:
        return "input features of the model (no layer makes these channels)"
    if "consumer" not in roles:
        return "the selected output does not depend on these channels (no later layer uses them)"
    if n_units < 2:
        by = f" by {tied}" if tied else ""
        return f"all its channels are tied together{by} (a normalisation, softmax or reduction over them)"
    return "left whole"


def build(model: nn.Module, graph: ChannelGraph) -> StructurePlan:
    """Units and families from a traced graph (``model``: the module whose parameter names the trace used)."""
    n = graph.nodes.n
    if n == 0:
        return StructurePlan([], _untouched(model, set()), graph.ops)
    roots = graph.components()
    keys, which, index = graph.nodes.decode(np.arange(n, dtype=np.int64))
    blocked: dict[int, str] = {}
    for ids, reason in graph.blocks:
        for r in np.unique(roots[ids.numpy()]):
            blocked.setdefault(int(r), reason)
    residual: dict[int, str] = {}
    for ids, op in graph.residual:
        for r in np.unique(roots[ids.numpy()]):
            residual.setdefault(int(r), op)
    shared_roots = {int(roots[i]) for i in graph.shared}
    tied: dict[int, str] = {}
    for ids, op in graph.ties:
        for r in np.unique(roots[ids.numpy()]):
            tied.setdefault(int(r), op)
    order = np.argsort(roots, kind="stable")
    bounds = np.flatnonzero(np.diff(roots[order])) + 1
    comps: dict[tuple, list[tuple[int, dict[Key, np.ndarray]]]] = defaultdict(list)
    for members in np.split(order, bounds):
        root = int(roots[members[0]])
        per_key: dict[Key, list[int]] = defaultdict(list)
        for w, i in zip(which[members], index[members]):
            per_key[keys[w]].append(int(i))
        sig = tuple(sorted((k, len(v)) for k, v in per_key.items()))
        comps[sig].append((root, {k: np.array(sorted(v), dtype=np.int64) for k, v in per_key.items()}))

    families: list[GroupFamily] = []
    whole_reasons: dict[Key, Counter] = defaultdict(Counter)
    covered: set[Key] = set()
    root_family: dict[int, GroupFamily] = {}
    for sig, units in comps.items():
        sig_keys = [k for k, _ in sig]
        roles = set().union(*(graph.roles.get(k, set()) for k in sig_keys))
        rs = {blocked.get(r) for r, _ in units} - {None}
        res = {residual.get(r) for r, _ in units} - {None}
        producers = tuple(k for k in sig_keys if "producer" in graph.roles.get(k, ()))
        consumers = tuple(k for k in sig_keys if "consumer" in graph.roles.get(k, ()) and k not in producers)
        shared = any(int(r) in shared_roots for r, _ in units)
        reason = _reason_of(next(iter(sorted(rs)), None), next(iter(res), None), roles, len(units), shared,
                            next(iter(sorted({tied[r] for r, _ in units if r in tied})), None))
        ok = reason == "left whole" and producers and consumers
        if ok:
            channelwise = tuple(k for k in sig_keys if k not in producers and k not in consumers)
            kind = _kind(model, producers, units[0][1][producers[0]])
            mods = sorted({_module_of(t) for t, _ in producers + consumers})
            makers = sorted({_module_of(t) for t, _ in producers})
            name = f"{common_prefix(mods) or common_prefix(makers) or makers[0]} ({kind})"
            fam = GroupFamily(name, kind, tuple(u for _, u in sorted(units, key=lambda x: x[0])),
                              producers, consumers, channelwise)
            families.append(fam)
            root_family.update({r: fam for r, _ in units})
            covered.update(sig_keys)
        else:
            for k in sig_keys:
                whole_reasons[k][reason] += 1
    _unique_names(families)
    whole = [WholeAxis(t, a, _TAPS if a >= 2 and _is_weight(model, t) else c.most_common(1)[0][0])
             for (t, a), c in sorted(whole_reasons.items()) if _is_weight(model, t) and (t, a) not in covered]
    whole += _untouched(model, set(keys))
    families.sort(key=lambda f: _first_index(model, f))
    records = []
    for r in graph.records:
        fam = root_family.get(int(roots[r.node])) if r.node >= 0 else None
        records.append((r, fam))
    out = StructurePlan(families, whole, graph.ops)
    out.records = [(r, f.name if f is not None else None) for r, f in records]  # names final after sorting
    return out


_TAPS = "the kernel's spatial taps (not channels)"


def _unique_names(families: list[GroupFamily]) -> None:
    """Families that share a name take their first producer's module; those that still share one (a conv whose
    output channels a shuffle or a split sends to different consumers: ShuffleNet) are numbered by their
    lowest channel, ``stage2.0.branch2.5 #1 (channels)``, ``#2``, ... (the report, ``--include`` /
    ``--exclude`` and the engine's per-family state are keyed by name)."""
    seen = Counter(f.name for f in families)
    for f in families:
        if seen[f.name] > 1:
            object.__setattr__(f, "name", f"{_module_of(f.producers[0][0])} ({f.kind})")
    groups: dict[str, list[GroupFamily]] = defaultdict(list)
    for f in families:
        groups[f.name].append(f)
    for name, same in groups.items():
        if len(same) < 2:
            continue
        same.sort(key=lambda f: min(int(u[f.producers[0]].min()) for u in f.units))
        for i, f in enumerate(same, 1):
            object.__setattr__(f, "name", f"{name[: -len(f' ({f.kind})')]} #{i} ({f.kind})")


def _is_weight(model: nn.Module, tensor: str) -> bool:
    """A 2-D+ parameter: the weights whose axes the report accounts for."""
    try:
        return model.get_parameter(tensor).dim() >= 2
    except AttributeError:
        return False


def _untouched(model: nn.Module, traced: set[Key]) -> list[WholeAxis]:
    names = {t for t, _ in traced}
    return [WholeAxis(n, 0, "not used by the traced forward pass (the selected output does not depend on it)")
            for n, p in model.named_parameters() if p.dim() >= 2 and n not in names]


def _first_index(model: nn.Module, fam: GroupFamily) -> int:
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return min(order.get(t, 1 << 30) for t, _ in fam.producers)


def discover(model: nn.Module, inputs: tuple[torch.Tensor, ...], names_from: nn.Module | None = None
             ) -> StructurePlan:
    """Trace ``model(*inputs)`` and return its removable families (see the module docstring)."""
    graph = trace(model, inputs, names_from)
    return build(names_from if names_from is not None else model, graph)


def select(plan: StructurePlan, include: tuple[str, ...] = (),
           exclude: tuple[str, ...] = ()) -> StructurePlan:
    """Families matched by ``include`` (all when empty) and not by ``exclude``; ``fnmatch`` patterns over the
    family's name and its tensors' names. The others join ``whole`` with the reason."""
    kept, whole = [], list(plan.whole)

    def hit(f: GroupFamily, pats) -> bool:
        names = [f.name, *f.tensors(), *{_module_of(t) for t in f.tensors()}]
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in pats)

    for f in plan.families:
        if include and not hit(f, include):
            why = "not matched by --include"
        elif exclude and hit(f, exclude):
            why = "matched by --exclude"
        else:
            kept.append(f)
            continue
        whole += [WholeAxis(t, a, why) for t, a in f.producers]
    return StructurePlan(kept, whole, plan.ops, plan.records)


__all__ = ["GroupFamily", "StructurePlan", "StructureResult", "WholeAxis", "build", "discover", "select"]
