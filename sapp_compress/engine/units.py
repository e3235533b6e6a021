"""What the engine masks, whatever the granularity: a :class:`UnitMask` over a grid of units (a layer's
blocks, or a structural family's heads, neurons or channels as a ``[1, n]`` grid), the :class:`Masked`
interface every method and the training loop use, and :class:`SkippedLayer`, a weight left dense with the
reason.

A granularity (:mod:`sapp_compress.granularity`) plans its units and attaches one :class:`Masked` per unit
group (:class:`sapp_compress.blocks.masks.MaskedLayer`, :class:`sapp_compress.structure.gates.MaskedFamily`);
the engine never asks which one it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class UnitMask(nn.Module):
    """The mask state of one layer's (or one structural family's) units: ``M`` (0/1) and, for SA++, the
    attention ``A = clip(n * softmax(L), d, 1/d)`` over its ``n`` units; ``A = 1`` without attention.

    Attributes:
        mask: ``[R, C]`` float buffer of 0/1 (a family's units: ``[1, n]``).
        logits: ``[R, C]`` parameter (attention only).
    """

    def __init__(self, grid: tuple[int, int], attention: bool = False, density: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(grid))
        self.clip = (density, 1.0 / density)
        if attention:
            self.logits = nn.Parameter(torch.zeros(grid))
        else:
            self.logits = None

    def attention(self) -> torch.Tensor:
        """``clip(n * softmax(L), d, 1/d)`` over all units (mean 1 before clipping)."""
        if self.logits is None:
            return torch.ones_like(self.mask)
        n = self.logits.numel()
        a = n * torch.softmax(self.logits.flatten().float(), dim=0).reshape(self.logits.shape)
        return a.clamp(*self.clip)

    def block_scale(self) -> torch.Tensor:
        return self.mask * self.attention() if self.logits is not None else self.mask


class Masked(Protocol):
    """One masked unit group as the engine sees it (a layer's blocks, or a family's units).

    ``name`` is the weight's (or family's) full name; ``grid`` the ``[R, C]`` shape of its units; ``masker``
    its :class:`UnitMask`. Methods score units by :meth:`norms` (or SA++'s logits), change masks only through
    :meth:`set_mask` and :meth:`revive`, and the training loop adds the coupled l2 penalty by :meth:`decay_`
    to the tensors :meth:`trained` returns."""

    masker: UnitMask

    @property
    def name(self) -> str: ...

    @property
    def grid(self) -> tuple[int, int]: ...

    def uniform_target(self, sparsity: float) -> float: ...

    def norms(self) -> torch.Tensor: ...

    def alive(self) -> torch.Tensor: ...

    def set_mask(self, keep: torch.Tensor) -> None: ...

    def revive(self, zero: bool) -> None: ...

    def trained(self) -> list[torch.Tensor]: ...

    def decay_(self, wd: float) -> None: ...


@dataclass(frozen=True)
class SkippedLayer:
    """A weight (or a weight axis, ``name[axis]``) left dense, and why: the report's ``skipped``."""

    name: str
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "reason": self.reason}


__all__ = ["Masked", "SkippedLayer", "UnitMask"]
