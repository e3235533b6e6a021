"""Block geometry: one documented 2-D view per layer type, behind a registry.

Every block computation (norms, expansion of per-block scalars, padding) goes through a :class:`BlockView`,
and indivisible shapes are handled here and nowhere else.

Views (rows are always the output side; a block is ``br`` rows x ``bc`` cols of the view):

- ``linear`` -- ``nn.Linear`` weight ``[O, I]`` as is.
- ``conv_channel`` -- conv weight ``[O, C, *taps]`` (groups = 1) as ``[O, C]``: a block is ``br`` output
  channels x ``bc`` input channels with all their taps. This is what runs fast in ONNX Runtime
  (Gather of input channels + grouped Conv).
- ``conv_tap`` -- the paper's view: ``[O, taps*C]`` with column ``(tap)*C + c``, i.e. the transpose of
  TF's ``(kh*kw*C) x O`` kernel matrix. A block is ``br`` outputs x ``bc`` input channels at one tap (when
  ``bc`` divides ``C``).

With ``indivisible="pad"`` the view is padded with zeros up to a multiple of the block for the arithmetic;
edge blocks are then partial.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..config import BlockSpec, PruneConfig
from ..engine.units import SkippedLayer
from ..errors import GeometryError


class BlockView:
    """Maps a weight tensor to its 2-D block grid and back.

    Subclasses define :meth:`sq_view` (the squared weight summed onto the 2-D view) and :meth:`from_view`
    (broadcast a 2-D ``[rows, cols]`` tensor back onto the weight's shape).
    """

    layout: ClassVar[str]
    #: the weight is stored as the transpose of its view (rows = outputs); :func:`masks.fold` transposes back
    transposed: ClassVar[bool] = False

    def __init__(self, weight_shape: tuple[int, ...], block: BlockSpec) -> None:
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.block = block
        self.rows, self.cols = self.view_shape(self.weight_shape)
        self.grid = (math.ceil(self.rows / block.rows), math.ceil(self.cols / block.cols))
        self.padded = self.rows % block.rows != 0 or self.cols % block.cols != 0

    @staticmethod
    def view_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
        raise NotImplementedError

    def sq_view(self, w: torch.Tensor) -> torch.Tensor:
        """``[rows, cols]``: squared weights summed over what the view folds together."""
        raise NotImplementedError

    def from_view(self, m: torch.Tensor) -> torch.Tensor:
        """Broadcast ``[rows, cols]`` onto a tensor broadcastable against the weight."""
        raise NotImplementedError

    @property
    def n_blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    def block_norms(self, w: torch.Tensor) -> torch.Tensor:
        """Frobenius norm of every block, ``[R, C]``."""
        sq = self.sq_view(w.detach().float())
        R, C = self.grid
        br, bc = self.block.rows, self.block.cols
        if self.padded:
            sq = nn.functional.pad(sq, (0, C * bc - self.cols, 0, R * br - self.rows))
        return sq.reshape(R, br, C, bc).sum(dim=(1, 3)).sqrt()

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """Per-block values ``[R, C]`` -> a tensor broadcastable against the weight."""
        br, bc = self.block.rows, self.block.cols
        m = v.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
        if self.padded:
            m = m[: self.rows, : self.cols]
        return self.from_view(m)

    def blocked(self, t: torch.Tensor) -> torch.Tensor | None:
        """``t`` (weight-shaped) reshaped to ``[R, br, C, rest]`` so that a block is ``[i, :, j, :]``, or
        None where the view is not a plain reshape (padding, the tap layout)."""
        return None

    def scale(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``w * expand(v)``. Where the view is a reshape, one broadcast multiply without materialising the
        expanded mask, which keeps the masked forward cheap."""
        b = self.blocked(w)
        if b is None:
            return w * self.expand(v)
        return _BlockScale.apply(w, v, b.shape)

    @torch.no_grad()
    def add_scaled_(self, out: torch.Tensor, w: torch.Tensor, v: torch.Tensor, alpha: float) -> None:
        """``out += alpha * w * expand(v)`` in place (one fused pass where the view is a reshape)."""
        bo, bw = self.blocked(out), self.blocked(w)
        if bo is None or bw is None or not out.is_contiguous():
            out.add_(self.scale(w, v), alpha=alpha)
        else:
            bo.addcmul_(bw, v.reshape(self.grid[0], 1, self.grid[1], 1), value=alpha)


class _BlockScale(torch.autograd.Function):
    """``w * v`` broadcast over blocks, with a hand-written backward: autograd's generic broadcast
    reduction for ``dL/dv`` is about 2x slower than ``(g * w).sum`` over the block axes on CPU, and this
    product sits on every training step of every pruned layer."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        ctx.save_for_backward(w, v)
        ctx.shape = shape
        vb = v.reshape(shape[0], 1, shape[2], 1)
        return (w.reshape(shape) * vb).reshape(w.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, v = ctx.saved_tensors
        shape = ctx.shape
        gb = g.reshape(shape)
        gw = gv = None
        if ctx.needs_input_grad[0]:
            gw = (gb * v.reshape(shape[0], 1, shape[2], 1)).reshape(w.shape)
        if ctx.needs_input_grad[1]:
            gv = (gb * w.reshape(shape)).sum(3).sum(1).to(v.dtype)
        return gw, gv, None


class LinearView(BlockView):
    layout = "linear"

    @staticmethod
    def view_shape(weight_shape):
        return weight_shape[0], weight_shape[1]

    def sq_view(self, w):
        return w * w

    def from_view(self, m):
        return m

    def blocked(self, t):
        if self.padded:
            return None
        return t.reshape(self.grid[0], self.block.rows, self.grid[1], self.block.cols)


class LinearTransposedView(BlockView):
    """A weight stored ``[I, O]`` (Hugging Face's ``Conv1D``, GPT-2's layers: ``y = x W + b``), viewed as the
    ``[O, I]`` linear it is. The manifest carries it in ``linear`` layout (``W^T``)."""

    layout = "linear"
    transposed = True

    @staticmethod
    def view_shape(weight_shape):
        return weight_shape[1], weight_shape[0]

    def sq_view(self, w):
        return (w * w).t()

    def from_view(self, m):
        return m.t()


class ConvChannelView(BlockView):
    layout = "conv_channel"

    @staticmethod
    def view_shape(weight_shape):
        return weight_shape[0], weight_shape[1]

    def sq_view(self, w):
        return (w * w).flatten(2).sum(dim=2)

    def from_view(self, m):
        return m.reshape(*m.shape, *([1] * (len(self.weight_shape) - 2)))

    def blocked(self, t):
        if self.padded:
            return None
        return t.reshape(self.grid[0], self.block.rows, self.grid[1], -1)


class ConvTapView(BlockView):
    layout = "conv_tap"

    @staticmethod
    def view_shape(weight_shape):
        return weight_shape[0], int(math.prod(weight_shape[1:]))

    def _perm(self) -> tuple[int, ...]:
        nd = len(self.weight_shape)
        return (0, *range(2, nd), 1)  # [O, C, *taps] -> [O, *taps, C]

    def sq_view(self, w):
        return (w * w).permute(self._perm()).reshape(self.rows, self.cols)

    def from_view(self, m):
        o, c, *taps = self.weight_shape
        nd = len(self.weight_shape)
        inv = (0, nd - 1, *range(1, nd - 1))  # [O, *taps, C] -> [O, C, *taps]
        return m.reshape(o, *taps, c).permute(inv)


#: layout name -> view class.
VIEWS: dict[str, type[BlockView]] = {v.layout: v for v in (LinearView, ConvChannelView, ConvTapView)}

#: a rule's answer for one module: ``(parameter, view class)`` to prune, or ``(parameter, reason)`` to skip.
Rule = Callable[[nn.Module, PruneConfig], tuple[str, "type[BlockView] | str"]]


def _linear_rule(module: nn.Module, cfg: PruneConfig):
    return "weight", LinearView


def _conv1d_transposed_rule(module: nn.Module, cfg: PruneConfig):
    return "weight", LinearTransposedView


def _conv_rule(module: nn.Module, cfg: PruneConfig):
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return "weight", f"{kind} conv (groups={module.groups}) is left dense"
    return "weight", (ConvChannelView if cfg.conv_layout == "channel" else ConvTapView)


def _mha_rule(module: nn.Module, cfg: PruneConfig):
    """``nn.MultiheadAttention``'s fused ``in_proj_weight`` ``[3E, E]``: q, k and v stacked on the rows, so
    block rows must not straddle two of them."""
    if module.in_proj_weight is None:
        return "q_proj_weight", "separate q/k/v projection weights are not pruned"
    e = module.embed_dim
    if e % cfg.block.rows:
        return "in_proj_weight", (f"block rows {cfg.block.rows} do not divide the embedding {e}: blocks "
                                  "would straddle the q/k/v split")
    return "in_proj_weight", LinearView


#: module type -> rule (the nearest class in the module's MRO wins).
LAYER_RULES: dict[type, Rule] = {
    nn.Linear: _linear_rule,
    nn.Conv1d: _conv_rule,
    nn.Conv2d: _conv_rule,
    nn.MultiheadAttention: _mha_rule,
}

#: rules for classes of optional libraries, keyed by ``module.qualname`` so the library is never imported
#: here.
NAMED_RULES: dict[str, Rule] = {
    "transformers.pytorch_utils.Conv1D": _conv1d_transposed_rule,
}

_NORM = "normalisation layers are not pruned (few parameters, no matmul)"
#: weight-bearing module types that are recognised but never pruned, with the reason shown in the report.
UNSUPPORTED: dict[type, str] = {
    nn.Embedding: "embedding tables are not pruned",
    nn.EmbeddingBag: "embedding tables are not pruned",
    nn.ConvTranspose1d: "transposed conv is not supported",
    nn.ConvTranspose2d: "transposed conv is not supported",
    nn.Conv3d: "3-D conv is not supported",
    nn.LayerNorm: _NORM,
    nn.GroupNorm: _NORM,
    nn.modules.batchnorm._BatchNorm: _NORM,
}


#: why the parameters of these module types (other than the ones a rule plans) stay dense; any other module's
#: own parameters get :data:`OTHER_PARAMETER`. Biases are never pruned and not listed.
DENSE_PARAMETERS: dict[type, str] = {
    nn.RNNBase: "recurrent layer weights (LSTM, GRU, RNN) are not pruned",
    nn.MultiheadAttention: "separate q/k/v projection weights are not pruned",
}
OTHER_PARAMETER = "a parameter of {cls}, not a Linear / Conv / attention projection weight: not pruned"


@dataclass(frozen=True)
class LayerPlan:
    """A weight chosen for pruning: its full name, owning module and block view."""

    name: str
    module_name: str
    module: nn.Module
    view: BlockView
    param: str = "weight"


def _rule_for(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        if cls in LAYER_RULES:
            return LAYER_RULES[cls]
        named = NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return None


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has, for parameters held by more than one module (tied weights)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


def _tied_reason(model: nn.Module, wname: str, others: list[str]) -> str:
    mods = dict(model.named_modules())
    other = next(n for n in others if n != wname)
    owner = mods.get(other.rsplit(".", 1)[0] if "." in other else "")
    kind = "an embedding" if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) else "another layer"
    return (f"tied to {other} ({kind}): pruning it would prune that too, and the exported graph holds it "
            "once for both uses")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[0], p)
               for p in patterns)


def plan_layers(model: nn.Module, cfg: PruneConfig) -> tuple[list[LayerPlan], list[SkippedLayer]]:
    """Choose the weights to prune and give a reason for every weight-bearing layer left dense.

    Raises:
        GeometryError: with ``indivisible="error"``, for the first layer the block does not divide.
    """
    plans: list[LayerPlan] = []
    skipped: list[SkippedLayer] = []
    shared = _shared_parameters(model)
    for mname, module in model.named_modules():
        rule = _rule_for(module)
        if rule is None:
            reason = next((r for c, r in UNSUPPORTED.items() if isinstance(module, c)), None)
            if reason and getattr(module, "weight", None) is not None:
                skipped.append(SkippedLayer(f"{mname}.weight" if mname else "weight", reason))
            continue
        param, what = rule(module, cfg)
        wname = f"{mname}.{param}" if mname else param
        if isinstance(what, str):
            skipped.append(SkippedLayer(wname, what))
            continue
        weight = getattr(module, param)
        if id(weight) in shared:
            skipped.append(SkippedLayer(wname, _tied_reason(model, wname, shared[id(weight)])))
            continue
        if cfg.include and not _matches(wname, cfg.include):
            skipped.append(SkippedLayer(wname, "not matched by --include"))
            continue
        if cfg.exclude and _matches(wname, cfg.exclude):
            skipped.append(SkippedLayer(wname, "matched by --exclude"))
            continue
        view = what(tuple(weight.shape), cfg.block)
        layout = what.layout
        if view.rows < cfg.block.rows or view.cols < cfg.block.cols:
            skipped.append(SkippedLayer(
                wname, f"block {cfg.block} larger than the {view.rows}x{view.cols} {layout} view"))
            continue
        if view.padded and cfg.indivisible != "pad":
            msg = f"block {cfg.block} does not divide the {view.rows}x{view.cols} {layout} view"
            if cfg.indivisible == "error":
                raise GeometryError(f"{wname}: {msg} (use --indivisible skip or pad)")
            skipped.append(SkippedLayer(wname, msg))
            continue
        if view.n_blocks < cfg.min_blocks:
            skipped.append(SkippedLayer(
                wname, f"{view.n_blocks} blocks of {cfg.block}, fewer than min_blocks={cfg.min_blocks}"))
            continue
        if cfg.balanced and round(cfg.density * view.grid[1]) < 1:
            skipped.append(SkippedLayer(
                wname,
                f"balanced selection keeps round({cfg.density:g} * {view.grid[1]}) = 0 blocks per row"))
            continue
        plans.append(LayerPlan(wname, mname, module, view, param))
    return plans, skipped + _other_parameters(model, {p.name for p in plans} | {s.name for s in skipped})


def _other_parameters(model: nn.Module, listed: set[str]) -> list[SkippedLayer]:
    """Every parameter not planned nor already listed (biases aside), with the reason it stays dense: the
    report accounts for all of the model's weights (an LSTM's are often most of a classifier's)."""
    out = []
    seen = {id(p) for n, p in model.named_parameters() if n in listed}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if name in listed or id(p) in seen or pname.startswith("bias") or pname.endswith("_bias"):
                continue
            seen.add(id(p))
            reason = next((r for c, r in DENSE_PARAMETERS.items() if isinstance(module, c)),
                          OTHER_PARAMETER.format(cls=type(module).__name__))
            out.append(SkippedLayer(name, reason))
    return out
