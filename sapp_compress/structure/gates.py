"""Masks on structural units during the fine-tune: SA++ and the baselines see a family of units exactly as
they see a layer's blocks (a ``[1, n]`` grid of units), and the engine does not learn a second vocabulary.

A unit's mask (and SA++'s attention) multiplies its **consumer** slices (the down projection's columns of a
neuron, the output projection's columns of a head, the next convs' input channels of a channel): that is the
unit's whole effect on the model (:mod:`.groups`), so a unit at mask 0 computes exactly what the model with
the unit removed computes. It is a :class:`GroupGate` parametrization on each consumer tensor (one per tensor,
holding every family that gates it), so the optimizer keeps the tensor's identity and the fold is
``remove_parametrizations(leave_parametrized=True)``.

- scores: the unit's group norm over every parameter slice it touches (producers, consumers, per-channel
  parameters such as biases and norm scales), the structural form of a block's Frobenius norm;
- the coupled l2 penalty: on every parameter slice of the live units, each tensor once;
- a dense phase's revival with ``revive=zero`` zeroes the consumer slices only (zeroing both sides of a unit
  would leave it with no gradient, ever);
- Powerpropagation: the consumer slices are scaled by their unit's norm (``W = ||V_u|| V_u`` on the side the
  gate multiplies).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..engine.units import UnitMask
from .groups import GroupFamily


@dataclass(frozen=True)
class FamilyPlan:
    """A family bound to the model whose tensors it names."""

    family: GroupFamily
    model: nn.Module

    @property
    def name(self) -> str:
        return self.family.name


@dataclass
class _Entry:
    axis: int
    index: torch.Tensor  # [n_units, per_unit]
    masker: UnitMask
    powerprop: bool


class GroupGate(nn.Module):
    """``W_eff = W * s``, with ``s`` along each gated axis the scale (``M * A``, times the unit's norm under
    Powerpropagation) of the unit each index belongs to, and 1 at indices no family gates."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.entries: list[_Entry] = []
        self.maskers = nn.ModuleList()  # shared with the other gates of the same family

    def add(self, axis: int, index: np.ndarray, masker: UnitMask, powerprop: bool) -> None:
        self.entries.append(_Entry(axis, torch.as_tensor(index, dtype=torch.long), masker, powerprop))
        if not any(m is masker for m in self.maskers):
            self.maskers.append(masker)

    def scale(self, w: torch.Tensor, e: _Entry) -> torch.Tensor:
        """The per-index scale along ``e.axis`` (a vector)."""
        s = e.masker.block_scale().reshape(-1).to(w.dtype)
        if e.powerprop:
            s = s * unit_norms(w, e.axis, e.index.to(w.device)).clamp_min(1e-12).to(w.dtype)
        per = e.index.shape[1]
        v = torch.ones(w.shape[e.axis], dtype=w.dtype, device=w.device)
        return v.index_put((e.index.reshape(-1).to(w.device),), s.repeat_interleave(per))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        for e in self.entries:
            shape = [1] * w.dim()
            shape[e.axis] = w.shape[e.axis]
            w = w * self.scale(w, e).reshape(shape)
        return w


def unit_norms(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``[n_units]``: the Frobenius norm of each unit's slice of ``t`` along ``axis``."""
    sel = t.index_select(axis, index.reshape(-1)).movedim(axis, 0)
    return sel.reshape(index.shape[0], -1).float().pow(2).sum(1).sqrt()


@dataclass
class MaskedFamily:
    """A structural family and its mask state: the engine's view of it is a ``[1, n]`` grid of units."""

    plan: FamilyPlan
    masker: UnitMask
    gates: dict[str, tuple[nn.Module, str]]  # consumer tensor -> (module, parameter name)
    # the parameters it touches or decays but does not gate (originals if gated)
    tensors: dict[str, nn.Parameter]
    decay_terms: list[tuple[str, list[tuple[int, torch.Tensor, UnitMask]]]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.plan.family.name

    @property
    def family(self) -> GroupFamily:
        return self.plan.family

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.masker.mask.shape)

    def _tensor(self, name: str) -> torch.Tensor:
        if name in self.gates:
            m, p = self.gates[name]
            return getattr(m.parametrizations, p).original
        return self.tensors[name]

    def uniform_target(self, sparsity: float) -> float:
        """The sparsity this family ends at under a uniform ``sparsity``: its kept units as
        :meth:`GroupFamily.kept_units` counts them (neurons and channels in multiples of 8)."""
        return 1.0 - self.family.kept_units(sparsity) / self.family.n_units

    def alive(self) -> torch.Tensor:
        return self.masker.mask > 0

    def set_mask(self, keep: torch.Tensor) -> None:
        self.masker.mask.copy_(keep.to(self.masker.mask.dtype))

    @torch.no_grad()
    def norms(self) -> torch.Tensor:
        """``[1, n]``: each unit's norm over every parameter slice it touches (consumers pre-mask)."""
        total = torch.zeros(self.family.n_units)
        for key in self.family.keys:
            t, a = key
            if t not in self.tensors and t not in self.gates:
                continue  # a buffer (running statistics): not a weight
            w = self._tensor(t)
            total += unit_norms(w.detach(), a,
                                torch.as_tensor(self.family.index(key), device=w.device)).cpu() ** 2
        return total.sqrt().reshape(1, -1).to(self.masker.mask.device)

    def trained(self) -> list[torch.Tensor]:
        return [self._tensor(t) for t in sorted(set(self.tensors) | set(self.gates))]

    @torch.no_grad()
    def revive(self, zero: bool) -> None:
        """Start of a dense phase: every unit is live again; with ``zero``, pruned units' consumer slices
        restart at 0 (their producers keep their values, so the unit gets a gradient)."""
        if zero:
            dead = (~self.alive()).reshape(-1).cpu().numpy()
            for t, a in self.family.consumers:
                w = self._tensor(t)
                idx = self.family.index((t, a))[dead].reshape(-1)
                if idx.size:
                    w.index_fill_(a, torch.as_tensor(idx, device=w.device), 0.0)
        self.masker.mask.fill_(1.0)

    @torch.no_grad()
    def decay_(self, wd: float) -> None:
        """The coupled l2 penalty on the live units' slices of the tensors this family owns (each tensor is
        decayed by one family, with the live masks of every family that touches it)."""
        for t, terms in self.decay_terms:
            w = self._tensor(t)
            if w.grad is None:
                continue
            live = torch.ones_like(w)
            for axis, index, masker in terms:
                v = torch.ones(w.shape[axis], dtype=w.dtype, device=w.device)
                dead = (masker.mask.reshape(-1) <= 0).repeat_interleave(index.shape[1])
                v[index.reshape(-1).to(w.device)[dead.to(w.device)]] = 0.0
                shape = [1] * w.dim()
                shape[axis] = -1
                live = live * v.reshape(shape)
            w.grad.add_(w.detach() * live, alpha=wd)


def attach(plans: list[FamilyPlan], *, attention: bool, powerprop: bool,
           density: float) -> list[MaskedFamily]:
    """One :class:`UnitMask` per family; one :class:`GroupGate` per consumer tensor, shared by every family
    that gates it; the coupled decay's tensors assigned to their first family."""
    if not plans:
        return []
    model = plans[0].model
    params = dict(model.named_parameters(remove_duplicate=False))
    mods = dict(model.named_modules())
    gates: dict[str, GroupGate] = {}
    out: list[MaskedFamily] = []
    pending: list[tuple[GroupFamily, UnitMask]] = []
    for plan in plans:
        fam = plan.family
        dev = params[fam.consumers[0][0]].device
        masker = UnitMask((1, fam.n_units), attention=attention, density=density).to(dev)
        for t, a in fam.consumers:
            if t not in gates:
                gates[t] = GroupGate(tuple(params[t].shape))
            gates[t].add(a, fam.index((t, a)), masker, powerprop)
        pending.append((fam, masker))
    for t, gate in gates.items():
        path, _, attr = t.rpartition(".")
        parametrize.register_parametrization(mods[path], attr, gate.to(params[t].device))
    gate_slots = {t: (mods[t.rpartition(".")[0]], t.rpartition(".")[2]) for t in gates}
    terms: dict[str, list[tuple[int, torch.Tensor, UnitMask]]] = defaultdict(list)
    owner: dict[str, int] = {}
    for i, (fam, masker) in enumerate(pending):
        for key in fam.keys:
            t, a = key
            if t in params:
                terms[t].append((a, torch.as_tensor(fam.index(key), dtype=torch.long), masker))
                owner.setdefault(t, i)
    for i, ((fam, masker), plan) in enumerate(zip(pending, plans)):
        mine = [(t, terms[t]) for t in sorted(terms) if owner[t] == i]
        # every parameter the family touches or decays that it does not gate itself, a tensor gated by another
        # family included (its original, the same Parameter): a unit's producer rows in a layer whose input
        # channels another family gates (a chain of Linear layers, a squeeze-excitation's fc2) count in its
        # norm
        own = {t for t, _ in fam.consumers}
        names = {t for t, _ in fam.keys if t in params} | {t for t, _ in mine}
        tensors = {t: params[t] for t in sorted(names) if t not in own}
        out.append(MaskedFamily(plan, masker, {t: gate_slots[t] for t, _ in fam.consumers}, tensors, mine))
    return out


def fold(families: list[MaskedFamily]) -> dict[str, np.ndarray]:
    """Remove the gates, leaving plain tensors whose pruned units' consumer slices are exactly 0 and that
    compute what the gated model did; returns each family's boolean keep over its units: the units its mask
    kept, every one of them, so a family's width is the one rule's (:meth:`GroupFamily.kept_units`: neurons
    and channels in multiples of :data:`~sapp_compress.structure.groups.UNIT_MULTIPLE`, heads exact). A kept
    unit whose consumer slices ended at zero (revived as zeros and never moved) stays: it changes no output,
    and dropping it would take the width off the rule, which ONNX Runtime's kernels run fastest at
    (BENCHMARKS.md section 16.4)."""
    keep = {f.name: f.alive().reshape(-1).cpu().numpy().copy() for f in families}
    slots = {t: s for f in families for t, s in f.gates.items()}
    for t, (m, p) in slots.items():
        parametrize.remove_parametrizations(m, p, leave_parametrized=True)
    return keep


__all__ = ["FamilyPlan", "GroupGate", "MaskedFamily", "attach", "fold", "unit_norms"]
