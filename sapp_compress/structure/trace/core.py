"""Channel tracing: which slices of which tensors one head, neuron or channel touches, found by running the
model once.

The model runs on a couple of example rows under a :class:`torch.overrides.TorchFunctionMode`. Every tensor
that carries *channels* gets a **label**: an int64 tensor broadcastable to it (same number of axes, size 1
along axes where it is constant) whose entries are **nodes**, or -1 where there is no channel. A node is one
index along one axis of one parameter or buffer, ``(name, axis, index)``: the output of ``F.linear(x, W, b)``
is labelled along its last axis with the nodes of ``W``'s axis 0, and ``x``'s label meets the nodes of ``W``'s
axis 1. Where two labels meet at the same position (an elementwise op, a norm's per-channel parameters, the
contracted axis of a matmul), their nodes are joined. After the run, the connected components of the join
graph are the *units*: every node of a unit has to go when the unit goes, and nothing else does.

The rules are generic, not per model family:

- elementwise ops join the labels of their operands position by position (so SwiGLU's gate and up
  projections become one unit per neuron, and a residual ``x + f(x)`` joins the two sides channel by
  channel); pure shape ops (view, permute, split, cat, getitem, ...) are applied to the label itself, so
  heads split by a reshape and q/k/v sections split from one fused projection come out right;
- reductions and normalisations over a labelled axis (LayerNorm, RMSNorm, softmax, mean) join everything
  they reduce: one output depends on all of it, so all of it is one unit (which is why the residual stream of
  a transformer is one unit, i.e. cannot lose channels);
- a matmul joins the contracted axis of its operands; an operand whose label spans both the contracted and a
  kept axis (``q`` in ``q @ k^T``: heads x head dims) is joined along the contracted axis, so a head is
  removed whole; parameters contracted against activations are *consumers*, parameters whose axis survives
  into the output are *producers*;
- anything not understood (an op with no rule) *blocks* the nodes it touches, with the op's name as the
  reason, and so does the model's output: a unit with a blocked node is never removed.

What comes out is a :class:`ChannelGraph`: nodes, joins, roles, blocks and residual joins; :mod:`.groups`
turns it into units and families.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

NONE = -1  # no channel at this position


# --- nodes ----------------------------------------------------------------------------------------------

class Nodes:
    """Node ids for the axes of the model's parameters and buffers, allocated on first use."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names  # id(tensor) -> qualified name
        self.base: dict[tuple[str, int], int] = {}
        self.size: dict[tuple[str, int], int] = {}
        self.n = 0

    def axis(self, name: str, axis: int, size: int) -> torch.Tensor:
        key = (name, axis)
        if key not in self.base:
            self.base[key], self.size[key] = self.n, size
            self.n += size
        return torch.arange(self.base[key], self.base[key] + size)

    def decode(self, ids: np.ndarray) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray]:
        """(axis keys, the key index of each id, the index along that axis of each id)."""
        keys = sorted(self.base, key=self.base.get)
        starts = np.array([self.base[k] for k in keys], dtype=np.int64)
        which = np.searchsorted(starts, ids, side="right") - 1
        return keys, which, ids - starts[which]


@dataclass(frozen=True)
class OpRecord:
    """One op whose cost depends on the widths: a weight's matmul or conv, or an attention core.

    Attributes:
        kind: ``matmul`` (activations times a weight), ``conv`` or ``attention`` (activations times
            activations: ``softmax(q k^T) v``).
        weight: the weight's name (matmul, conv); ``axes``: its (contracted, output) axes.
        shapes: the operands' shapes as traced (the activation first; attention: q, k, v).
        attrs: a conv's ``stride``, ``padding``, ``dilation``, ``groups``.
        node: attention only: a node of the head axis' label (which family's heads these are), else -1.
    """

    kind: str
    weight: str | None
    axes: tuple[int, int]
    shapes: tuple[tuple[int, ...], ...]
    attrs: tuple = ()
    node: int = -1


@dataclass
class ChannelGraph:
    """What a trace found. ``joins`` are pairs of node-id arrays to be joined; ``blocks`` and ``residual``
    are node-id arrays with the reason; ``roles`` says how each parameter axis was used.

    ``broadcast`` holds the joins of a tensor *broadcast* against one that varies along an axis it does not
    (a norm's weight over a head's dimension applied to every head, the one key/value head of multi-query
    attention shared by every query head): such a tensor is shared by every position of that axis. Its join
    is applied after the others (:meth:`components`) only where it ties nothing that is otherwise apart;
    elsewhere the shared tensor stays whole (:attr:`shared`), which removing any of the positions leaves
    exact."""

    nodes: Nodes
    joins: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    blocks: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    residual: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    #: node ids an op joined because each of its outputs depends on all of them (a norm, a reduction), and
    #: the op
    ties: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    broadcast: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: node ids of the broadcast tensors left apart by :meth:`components` (filled there)
    shared: set[int] = field(default_factory=set)
    roles: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    ops: int = 0
    records: list[OpRecord] = field(default_factory=list)

    def join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        ok = (a >= 0) & (b >= 0) & (a != b)
        if ok.any():
            self.joins.append((a[ok].reshape(-1), b[ok].reshape(-1)))

    def tie(self, first: torch.Tensor, lab: torch.Tensor, op: str) -> None:
        """:meth:`join` of every position of ``lab`` along an axis with the first (``first``), recorded as
        tied by ``op``."""
        self.join(first, lab)
        ids = lab[lab >= 0].reshape(-1)
        if ids.numel() > 1:
            self.ties.append((torch.unique(ids), op))

    def join_shared(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """:meth:`join`, except where one side is broadcast along an axis the other varies along: that join is
        recorded in :attr:`broadcast` (decided by :meth:`components`)."""
        nd = max(a.dim(), b.dim())
        a, b = align(a, nd), align(b, nd)
        if not (_broadcast_over(a, b) or _broadcast_over(b, a)):
            self.join(a, b)
            return
        a, b = torch.broadcast_tensors(a, b)
        ok = (a >= 0) & (b >= 0) & (a != b)
        if ok.any():
            self.broadcast.append((a[ok].reshape(-1), b[ok].reshape(-1)))

    def block(self, label: torch.Tensor, reason: str) -> None:
        ids = label[label >= 0].reshape(-1)
        if ids.numel():
            self.blocks.append((torch.unique(ids), reason))

    def role(self, label: torch.Tensor, role: str) -> None:
        ids = label[label >= 0].reshape(-1)
        if ids.numel():
            keys, which, _ = self.nodes.decode(torch.unique(ids).numpy())
            for k in set(which.tolist()):
                self.roles.setdefault(keys[k], set()).add(role)

    def components(self) -> np.ndarray:
        """The root of every node's connected component (union-find by min-label propagation). The
        :attr:`broadcast` joins come second: a node of a broadcast pair is joined to its partners unless that
        would put two *units* in one component (components of the other joins that have both a producer and a
        consumer: two heads, say); a pair is joined when neither of its nodes would. The nodes whose joins are
        refused go to :attr:`shared`."""
        parent = _union(np.arange(self.nodes.n, dtype=np.int64), self.joins)
        if not self.broadcast:
            return parent
        a = torch.cat([j[0] for j in self.broadcast]).numpy()
        b = torch.cat([j[1] for j in self.broadcast]).numpy()
        unit = self._unit_roots(parent)
        nodes = np.concatenate([a, b, a, b])
        roots = np.concatenate([parent[b], parent[a], parent[a], parent[b]])
        keep = unit[roots]
        pairs = np.unique(np.stack([nodes[keep], roots[keep]]), axis=1)
        ties = np.bincount(pairs[0], minlength=self.nodes.n) > 1  # nodes that would tie two units
        ok = ~ties[a] & ~ties[b]
        self.shared = {int(i) for i in np.flatnonzero(ties)}
        if not ok.any():
            return parent
        return _union(parent, [(torch.from_numpy(a[ok]), torch.from_numpy(b[ok]))])

    def _unit_roots(self, parent: np.ndarray) -> np.ndarray:
        """``[n]`` bool: whether the component rooted at each id has a producer and a consumer."""
        keys, which, _ = self.nodes.decode(np.arange(self.nodes.n, dtype=np.int64))
        roles = [self.roles.get(k, set()) for k in keys]
        producer = np.array([("producer" in r) for r in roles], dtype=bool)[which]
        consumer = np.array([("consumer" in r) for r in roles], dtype=bool)[which]
        has_p = np.zeros(self.nodes.n, dtype=bool)
        has_c = np.zeros(self.nodes.n, dtype=bool)
        np.logical_or.at(has_p, parent, producer)
        np.logical_or.at(has_c, parent, consumer)
        return has_p & has_c


def _broadcast_over(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is constant (size 1) along an axis along which ``b`` varies."""
    return any(a.shape[d] == 1 and b.shape[d] > 1 and bool((b != b.narrow(d, 0, 1)).any())
               for d in range(a.dim()))


def _union(parent: np.ndarray, joins) -> np.ndarray:
    """``parent`` with the pairs of ``joins`` merged (min-label propagation with pointer jumping)."""
    if not joins:
        return parent
    parent = parent.copy()
    a = torch.cat([j[0] for j in joins]).numpy()
    b = torch.cat([j[1] for j in joins]).numpy()
    while True:
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            return parent
        m = np.minimum(pa, pb)
        np.minimum.at(parent, pa, m)
        np.minimum.at(parent, pb, m)
        while True:  # pointer jumping to the roots
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp


# --- labels ---------------------------------------------------------------------------------------------

def squeeze_label(lab: torch.Tensor) -> torch.Tensor:
    """Size 1 along every axis where the label is constant (labels stay small: ``[1, C, 1, 1]`` for a conv
    activation)."""
    for a in range(lab.dim()):
        if lab.shape[a] > 1 and bool((lab == lab.narrow(a, 0, 1)).all()):
            lab = lab.narrow(a, 0, 1)
    return lab


def varies(lab: torch.Tensor) -> set[int]:
    """Axes (counted from the right, as negative numbers) along which ``lab`` varies."""
    return {a - lab.dim() for a in range(lab.dim()) if lab.shape[a] > 1}


def align(lab: torch.Tensor, ndim: int) -> torch.Tensor:
    """Left-pad ``lab`` with size-1 axes to ``ndim`` axes (broadcasting aligns from the right)."""
    return lab.reshape((1,) * (ndim - lab.dim()) + tuple(lab.shape)) if lab.dim() < ndim else lab


@dataclass
class Info:
    """The labels of one traced tensor: one label for an activation; for a tensor made of parameters only
    (a weight, ``gamma.view(1, -1, 1, 1)``, a weight-normed kernel), one label per parameter axis."""

    labels: list[torch.Tensor]
    param: bool = False


class Tracer(TorchFunctionMode):
    """Runs a model and labels its tensors (see the module docstring)."""

    def __init__(self, graph: ChannelGraph, params: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.g = graph
        # id -> tensor, for parameters. Buffers get labels only where a rule says they hold channels (a
        # BatchNorm's running statistics): others are constants (a rotary embedding's inverse frequencies),
        # and labelling them would tie together every channel they meet.
        self.params = params
        self.info: dict[int, Info] = {}
        self.keep: list[Any] = []  # every traced tensor stays alive, so ids are never reused

    # --- labels of operands -------------------------------------------------------------------------
    def of(self, t, buffer: bool = False) -> Info | None:
        """The labels of ``t``; a parameter's (or with ``buffer``, a buffer's) are made on first use."""
        if not isinstance(t, torch.Tensor):
            return None
        i = self.info.get(id(t))
        if i is None and (id(t) in self.params or (buffer and id(t) in self.g.nodes.names)):
            name = self.g.nodes.names[id(t)]
            labels = []
            for a in range(t.dim()):
                if t.shape[a] > 1:
                    shape = [1] * t.dim()
                    shape[a] = t.shape[a]
                    labels.append(self.g.nodes.axis(name, a, t.shape[a]).reshape(shape))
            i = Info(labels, param=True)
            self.info[id(t)] = i
            self.keep.append(t)
        return i

    def set(self, t, info: Info | None) -> None:
        if isinstance(t, torch.Tensor) and info is not None and info.labels:
            self.info[id(t)] = info
            self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if not _has_tensor(out) and name != "__setitem__":
            return out
        self.g.ops += 1
        rule = RULES.get(name)
        infos = [(a, self.of(a)) for a in _tensors((args, kwargs))]
        if not any(i is not None for _, i in infos) and name != "__setitem__":
            return out
        if rule is None:
            for _, i in infos:
                if i is not None:
                    for lab in i.labels:
                        self.g.block(lab, f"{name} (no channel rule for this op)")
            return out
        rule(self, name, func, args, kwargs, out)
        return out


def _name(func) -> str:
    n = getattr(func, "__name__", None) or str(func)
    if n == "__get__":  # a property: Tensor.T, .mT, .data, .shape
        return getattr(getattr(func, "__self__", None), "__name__", n)
    if n == "__rmatmul__":
        return "rmatmul"
    if n.startswith("__") and n.endswith("__") and n not in ("__getitem__", "__setitem__"):
        n = n[2:-2]
        if n.startswith("i") and n[1:] in _BINARY:  # in-place operators: __iadd__
            n = n[1:]
        elif n.startswith("r") and n[1:] in _BINARY:  # reflected operators: __radd__
            n = n[1:]
    elif n.endswith("_") and not n.startswith("_") and n[:-1]:
        n = n[:-1]  # in-place methods: add_, relu_
    return n


def _has_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return any(_has_tensor(v) for v in x)
    return False


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in _tensors(out)]


# --- the rule registry (the rules themselves: :mod:`.rules`) ----------------------------------------------

Rule = Callable[["Tracer", str, Any, tuple, dict, Any], None]
#: op name -> its rule; filled by :mod:`.rules` (imported by this package), looked up by :class:`Tracer`
RULES: dict[str, Rule] = {}


def rule(*names: str):
    """Register the decorated function as the rule of the ops ``names``."""
    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return deco


#: binary operators, whose in-place (``__iadd__``) and reflected (``__radd__``) forms :func:`_name` reduces to
#: theirs
_BINARY = ("add sub mul div truediv true_divide floordiv floor_divide pow maximum minimum fmod remainder eq "
           "ne lt le gt ge and or xor logical_and logical_or atan2 hypot masked_fill where addcmul "
           "addcdiv lerp rsub mod matmul").split()


# --- running it -----------------------------------------------------------------------------------------

def named_tensors(model: nn.Module) -> dict[int, str]:
    """id -> first qualified name, for every parameter and buffer (shared tensors have one name)."""
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    for n, b in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), n)
    return names


def trace(model: nn.Module, inputs: tuple[torch.Tensor, ...],
          names_from: nn.Module | None = None) -> ChannelGraph:
    """Run ``model(*inputs)`` once and return what it did with channels. Parameters are named as in
    ``names_from`` (default: ``model``); the model runs in eval mode with gradients enabled (which keeps
    PyTorch's fused inference fast paths, invisible to the trace, off), and is left as it was."""
    names = named_tensors(names_from if names_from is not None else model)
    params = {id(t): t for t in (names_from or model).parameters()}
    graph = ChannelGraph(Nodes(names))
    tracer = Tracer(graph, params)
    hooks = [m.register_forward_pre_hook(_opaque_module(tracer, type(m).__name__))
             for m in model.modules() if isinstance(m, nn.RNNBase)]
    modes = {m: m.training for m in model.modules()}
    grads = {id(p): p.requires_grad for p in model.parameters()}
    attrs = {m: _own_attributes(m) for m in model.modules()}
    model.eval()
    try:
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad(), tracer:
            out = model(*inputs)
        for t in _outputs(out):
            i = tracer.of(t)
            if i is not None:
                for lab in i.labels:
                    graph.block(lab, "reaches the model's output")
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(grads[id(p)])
        for m, mode in modes.items():
            m.training = mode
        for m, saved in attrs.items():
            _restore_attributes(m, saved)
    return graph


def _own(name: str) -> bool:
    """An attribute a module's own code sets (not torch's: parameters, buffers, submodules, hooks, the
    mode)."""
    return not name.startswith("_") and name != "training"


def _own_attributes(module: nn.Module) -> dict:
    """A module's own attributes (not its parameters, buffers, submodules or hooks), dicts and lists copied
    one level deep: what a forward may fill in (timm's LeViT caches its attention biases in a dict in eval
    mode)."""
    return {k: (copy.copy(v) if isinstance(v, (dict, list)) else v)
            for k, v in vars(module).items() if _own(k)}


def _restore_attributes(module: nn.Module, saved: dict) -> None:
    """Put back what :func:`_own_attributes` saved, in place for dicts and lists; drop attributes the forward
    added. The trace runs with gradients enabled, so a cache it filled would hold tensors of the traced graph:
    no copy of the model could be made afterwards, and later forwards would read values from before the
    fine-tune."""
    for k in [k for k in vars(module) if _own(k) and k not in saved]:
        delattr(module, k)
    for k, v in saved.items():
        cur = vars(module).get(k)
        if isinstance(v, dict) and isinstance(cur, dict):
            cur.clear()
            cur.update(v)
        elif isinstance(v, list) and isinstance(cur, list):
            cur[:] = v
        elif cur is not v:
            setattr(module, k, v)


def _opaque_module(tracer: Tracer, kind: str):
    def hook(module, args):
        for x in _tensors(args):
            i = tracer.of(x)
            if i is not None:
                for lab in i.labels:
                    tracer.g.block(lab, f"{kind} (its weights are used inside one fused op)")
        names = tracer.g.nodes.names
        for p in module.parameters():
            if id(p) in names and p.dim() >= 1:
                for a in range(p.dim()):
                    tracer.g.block(tracer.g.nodes.axis(names[id(p)], a, p.shape[a]), f"{kind} weights")
    return hook


__all__ = ["ChannelGraph", "Info", "Nodes", "OpRecord", "RULES", "Tracer", "trace", "named_tensors", "NONE",
           "rule"]
