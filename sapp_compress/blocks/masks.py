"""Block masks and method reparametrizations, as stacked ``torch.nn.utils.parametrize`` parametrizations.

For each pruned weight the chain is ``original -> [BlockPowerProp] -> BlockMask -> weight``:

- :class:`BlockPowerProp` (Powerpropagation's group form): ``W_b = ||V_b||_F * V_b``; its ``right_inverse``
  sets ``V_b = W_b / sqrt(||W_b||_F)``, so registering it leaves the weight unchanged.
- :class:`BlockMask`: ``W_eff = W * expand(M * A)`` with ``M`` the 0/1 block mask (a buffer) and, for SA++,
  ``A = clip(n * softmax(L), d, 1/d)`` from trainable per-block logits ``L`` (zero at start, so ``A = 1``).

:class:`MaskedLayer` is the one owner of a layer's mask state: methods change masks only through it, and
:func:`fold` removes every parametrization, leaving plain weights whose pruned blocks are exactly 0.0 and
that compute exactly what the masked model did.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from converters.manifest import LayerBlocks

from ..engine.units import UnitMask
from .geometry import BlockView, LayerPlan


class BlockPowerProp(nn.Module):
    """``W = V * expand(||V_b||_F)`` (group Powerpropagation, which equals group LASSO, Lemma 2.3)."""

    def __init__(self, view: BlockView) -> None:
        super().__init__()
        self.view = view

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        norms = self.view.sq_view(v)
        R, C = self.view.grid
        br, bc = self.view.block.rows, self.view.block.cols
        if self.view.padded:
            norms = nn.functional.pad(norms, (0, C * bc - self.view.cols, 0, R * br - self.view.rows))
        n = norms.reshape(R, br, C, bc).sum(dim=(1, 3)).clamp_min(1e-24).sqrt()
        return self.view.scale(v, n.to(v.dtype))

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        n = self.view.block_norms(w).clamp_min(1e-12).rsqrt()
        return self.view.scale(w, n.to(w.dtype))


class BlockMask(UnitMask):
    """``W_eff = W * expand(M * A)`` over a layer's blocks."""

    def __init__(self, view: BlockView, attention: bool = False, density: float = 1.0) -> None:
        super().__init__(view.grid, attention, density)
        self.view = view

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.view.scale(w, self.block_scale().to(w.dtype))


@dataclass
class MaskedLayer:
    """A pruned weight and its parametrizations; the owner of its mask state."""

    plan: LayerPlan
    masker: BlockMask
    powerprop: BlockPowerProp | None = None

    def uniform_target(self, sparsity: float) -> float:
        """The sparsity this layer ends at under a uniform ``sparsity``: that sparsity (blocks count
        exactly)."""
        return sparsity

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def view(self) -> BlockView:
        return self.plan.view

    @property
    def grid(self) -> tuple[int, int]:
        return self.view.grid

    @property
    def original(self) -> nn.Parameter:
        """The trained tensor at the root of the chain (``W``, or ``V`` under Powerpropagation)."""
        return getattr(self.plan.module.parametrizations, self.plan.param).original

    def norms(self) -> torch.Tensor:
        """Frobenius norm of every block of the pre-mask weight, ``[R, C]``: the magnitude score."""
        return self.view.block_norms(self.pre_mask_weight())

    def trained(self) -> list[nn.Parameter]:
        """The tensors the mask multiplies (they get the coupled l2 penalty)."""
        return [self.original]

    @torch.no_grad()
    def decay_(self, wd: float) -> None:
        """grad += wd * (W masked): the coupled l2 penalty on the weights the mask multiplies (pruned blocks
        get none, so they can come back with their values in the next dense phase)."""
        w = self.original
        if w.grad is not None:
            self.view.add_scaled_(w.grad, w.detach(), self.masker.mask.to(w.dtype), wd)

    def pre_mask_weight(self) -> torch.Tensor:
        """The weight before masking (``W``, or ``||V_b|| V_b``), detached."""
        with torch.no_grad():
            w = self.original
            return self.powerprop(w) if self.powerprop is not None else w

    def alive(self) -> torch.Tensor:
        return self.masker.mask > 0

    def set_mask(self, keep: torch.Tensor) -> None:
        self.masker.mask.copy_(keep.to(self.masker.mask.dtype))

    def revive(self, zero: bool) -> None:
        """Start of a dense phase: every block is active again; with ``zero``, pruned blocks restart at 0."""
        if zero:
            with torch.no_grad():
                self.original.copy_(self.view.scale(self.original, self.masker.mask.to(self.original.dtype)))
        self.masker.mask.fill_(1.0)


def attach(plans: list[LayerPlan], *, attention: bool, powerprop: bool, density: float) -> list[MaskedLayer]:
    """Register the parametrizations on every planned layer (powerprop first, then the mask)."""
    layers = []
    for p in plans:
        pp = None
        if powerprop:
            pp = BlockPowerProp(p.view)
            parametrize.register_parametrization(p.module, p.param, pp)
        m = BlockMask(p.view, attention=attention, density=density).to(getattr(p.module, p.param).device)
        parametrize.register_parametrization(p.module, p.param, m)
        layers.append(MaskedLayer(p, m, pp))
    return layers


def fold(layers: list[MaskedLayer]) -> list[LayerBlocks]:
    """Remove the parametrizations, leaving plain weights (pruned blocks exactly +0.0), and return the
    block manifest. The folded weight is the parametrized forward's value, so outputs do not change.

    A kept block whose values all ended at zero (a block revived as zeros that never moved) is recorded as
    dropped: storing it would cost bytes and compute for nothing. A weight stored transposed
    (``view.transposed``) enters the manifest in its view's layout (``W^T``)."""
    manifest = []
    for layer in layers:
        module, param = layer.plan.module, layer.plan.param
        keep = layer.alive().detach().clone()
        parametrize.remove_parametrizations(module, param, leave_parametrized=True)
        with torch.no_grad():
            w = getattr(module, param)
            zero = layer.view.expand((~keep).to(w.dtype)).expand_as(w) > 0
            w.masked_fill_(zero, 0.0)  # turns -0.0 (from W * 0 with W < 0) into +0.0
            keep &= layer.view.block_norms(w) > 0
        manifest.append(manifest_entry(layer.plan, w, keep.cpu().numpy()))
    return manifest


def manifest_entry(plan: LayerPlan, w: torch.Tensor, kept: np.ndarray) -> LayerBlocks:
    """The manifest entry of planned weight ``w`` with block grid ``kept``: in its view's layout (a weight
    stored transposed, ``view.transposed``, enters as ``W^T``), float32, on the CPU."""
    wv = w.detach().float().cpu()
    if plan.view.transposed:
        wv = wv.t()
    return LayerBlocks(
        name=plan.name,
        layout=plan.view.layout,
        weight_shape=tuple(wv.shape),
        block=(plan.view.block.rows, plan.view.block.cols),
        kept=np.asarray(kept, dtype=bool),
        padded=plan.view.padded,
        weight=np.ascontiguousarray(wv.numpy().astype(np.float32)),
    )
