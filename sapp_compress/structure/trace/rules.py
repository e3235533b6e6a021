"""The tracer's elementwise, shape and reduction rules, one per op (or family of ops) behind
:data:`~.core.RULES`: how each op moves, joins, reduces or blocks the channel labels of its operands (the
generic rules are described in :mod:`.core`; the rules of ops with weights are in :mod:`.layers`)."""
from __future__ import annotations

import numpy as np
import torch

from .core import (
    NONE,
    RULES,
    Info,
    Tracer,
    _outputs,
    _tensors,
    align,
    rule,
    squeeze_label,
    varies,
)

# --- the rules ------------------------------------------------------------------------------------------



def meet(tr: Tracer, infos: list[Info | None], ndim: int, residual_op: str | None = None,
         data: list[torch.Size] = ()) -> Info | None:
    """Elementwise: labels of the operands are joined position by position. ``infos`` has one entry per tensor
    operand (None: an unlabelled tensor that is not a parameter, i.e. data, whose shapes ``data`` gives). Data
    dominates: with any operand that is not made of parameters only, the result is an activation with one
    label; otherwise one label per parameter axis."""
    acts = [align(lab, ndim) for i in infos if i is not None and not i.param for lab in i.labels]
    params = [align(lab, ndim) for i in infos if i is not None and i.param for lab in i.labels]
    if any(i is None or not i.param for i in infos) and not acts and params:
        # data times a parameter (an input scaled per channel): an activation. A tensor of several parameter
        # axes (a relative position bias: table rows by position, columns by head) is labelled by the axis
        # that broadcasts against the data (the heads; the data, a shifted-window mask, varies by position)
        pick = 0
        if len(params) > 1 and data:
            over = [{a - len(d) for a in range(len(d)) if d[a] > 1} for d in data]
            fits = [j for j, p in enumerate(params) if not any(varies(p) & o for o in over)]
            pick = fits[0] if fits else 0
        acts = [params.pop(pick)]
    if acts:
        out = acts[0]
        for other in acts[1:]:
            if residual_op is not None:
                _mark_residual(tr, out, other, residual_op)
            tr.g.join_shared(out, other)
            a, b = torch.broadcast_tensors(out, other)
            out = torch.where(a >= 0, a, b)
        for p in params:
            if varies(p) & varies(out):
                tr.g.join_shared(out, p)
                tr.g.role(p, "channel")
                a, b = torch.broadcast_tensors(out, p)
                out = torch.where(a >= 0, a, b)
        return Info([squeeze_label(out)])
    if not params:
        return None
    merged: dict[frozenset, torch.Tensor] = {}
    for p in params:
        key = frozenset(varies(p))
        if key in merged:
            tr.g.join(merged[key], p)
        else:
            merged[key] = p
    return Info(list(merged.values()), param=True)


def _mark_residual(tr: Tracer, a: torch.Tensor, b: torch.Tensor, op: str) -> None:
    """An addition of two activations whose channels come from different parameter axes: a residual join.
    Except a table looked up by position and indexed by head (a relative position bias, one per model or per
    layer) added to attention scores, which vary by head along an axis before the last: the heads stay units
    (sliced with the table's columns)."""
    if not (varies(a) | varies(b)) & {-1} and (_embedded(tr, a) or _embedded(tr, b)):
        return
    a, b = torch.broadcast_tensors(a, b)
    ok = (a >= 0) & (b >= 0)
    if not ok.any():
        return
    ids_a, ids_b = a[ok].numpy(), b[ok].numpy()
    _, wa, _ = tr.g.nodes.decode(ids_a)
    _, wb, _ = tr.g.nodes.decode(ids_b)
    diff = wa != wb
    if diff.any():
        tr.g.residual.append((torch.from_numpy(np.concatenate([ids_a[diff], ids_b[diff]])), op))


def _embedded(tr: Tracer, lab: torch.Tensor) -> bool:
    """Whether the channels of ``lab`` are an embedding table's columns (what a lookup in it gives)."""
    ids = lab[lab >= 0].reshape(-1)
    if not ids.numel():
        return False
    keys, which, _ = tr.g.nodes.decode(torch.unique(ids).numpy())
    return any("embedding" in tr.g.roles.get(keys[k], ()) for k in set(which.tolist()))


_UNARY = (
    "relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu celu mish softplus "
    "softsign logsigmoid tanhshrink prelu glu_ dropout dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout neg abs exp expm1 log log1p log2 sqrt rsqrt reciprocal square sin cos erf erfc "
    "sign clamp clip clamp_min clamp_max float half bfloat16 double to type type_as contiguous clone detach "
    "requires_grad nan_to_num isnan isinf isfinite logical_not bitwise_not round floor ceil trunc frac sgn "
    "positive pos triu tril fill zero data"
).split()


@rule(*_UNARY)
def _unary(tr, name, func, args, kwargs, out):
    infos = [tr.of(a) for a in _tensors((args, kwargs))]
    for t in _outputs(out):
        tr.set(t, meet(tr, infos, t.dim()))


@rule("add", "sub", "mul", "div", "truediv", "true_divide", "floordiv", "floor_divide", "pow", "maximum",
      "minimum", "fmod", "remainder", "mod", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor",
      "logical_and", "logical_or", "atan2", "hypot", "masked_fill", "where", "addcmul", "addcdiv", "lerp",
      "rsub", "copy")
def _elementwise(tr, name, func, args, kwargs, out):
    tensors = list(_tensors((args, kwargs)))
    infos = [tr.of(a) for a in tensors]
    data = [t.shape for t, i in zip(tensors, infos) if i is None]
    res = "add" if name in ("add", "sub", "rsub") else None
    for t in _outputs(out):
        tr.set(t, meet(tr, infos, t.dim(), residual_op=res, data=data))


def _expanded(lab: torch.Tensor, shape) -> torch.Tensor:
    return align(lab, len(shape)).expand(shape).contiguous()


_SHAPE = (
    "view reshape flatten unflatten squeeze unsqueeze permute transpose t swapaxes swapdims movedim moveaxis "
    "expand expand_as view_as reshape_as repeat tile repeat_interleave flip roll narrow select split "
    "chunk unbind split_with_sizes tensor_split __getitem__ index_select gather take_along_dim cat concat "
    "concatenate stack hstack vstack T mT H mH unfold diagonal masked_select pad"
).split()


@rule(*_SHAPE)
def _shape(tr, name, func, args, kwargs, out):
    """Apply the op to the labels themselves: whatever the op does to positions, it does to channels."""
    tensors = list(_tensors((args, kwargs)))
    infos = {id(t): tr.of(t) for t in tensors}
    labelled = [t for t in tensors if infos[id(t)] is not None]
    # data tensors that are only indices/masks (e.g. the index of gather) stay as they are
    n = max(len(infos[id(t)].labels) for t in labelled)
    param = all(infos[id(t)].param for t in labelled)
    outs = _outputs(out)
    results: list[list[torch.Tensor]] = [[] for _ in outs]
    for k in range(n):
        def sub(x):
            if isinstance(x, torch.Tensor) and any(x is t for t in labelled):
                labs = infos[id(x)].labels
                lab = labs[k] if k < len(labs) else torch.full((1,) * x.dim(), NONE, dtype=torch.int64)
                return _expanded(lab, x.shape)
            if isinstance(x, torch.Tensor) and name in _CAT:  # an unlabelled part of a concatenation
                return torch.full(x.shape, NONE, dtype=torch.int64)
            if isinstance(x, (list, tuple)):
                return type(x)(sub(v) for v in x)
            return x
        try:
            if name == "view":  # a view of an expanded label is not always possible; reshape is
                lab_out = torch.Tensor.reshape(*[sub(a) for a in args], **kwargs)
            elif name == "pad":  # padding is no channel
                lab_out = torch.nn.functional.pad(sub(args[0]), *args[1:2], value=NONE)
            else:
                lab_out = func(*[sub(a) for a in args], **{k2: sub(v) for k2, v in kwargs.items()})
        except Exception as e:  # noqa: BLE001 -- a shape op we cannot replay on labels blocks its channels
            for t in labelled:
                for lab in infos[id(t)].labels:
                    tr.g.block(lab, f"{name} (cannot follow channels through it: {type(e).__name__})")
            return
        for j, lo in enumerate(_outputs(lab_out)):
            if j < len(results):
                results[j].append(squeeze_label(lo))
    for t, labs in zip(outs, results):
        labs = [lab for lab in labs if bool((lab >= 0).any())]
        if labs:
            tr.set(t, Info(labs if param else labs[:1], param=param))


_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}


def _reduce_dims(lab: torch.Tensor, dims, keepdim: bool, tr: Tracer,
                 op: str = "a reduction") -> torch.Tensor:
    """Join ``lab`` along ``dims`` (tied by ``op``) and keep one representative (the first index)."""
    nd = lab.dim()
    dims = sorted({d % nd for d in dims}) if dims is not None else list(range(nd))
    for d in dims:
        if lab.shape[d] > 1:
            first = lab.narrow(d, 0, 1)
            tr.g.tie(first, lab, op)
            lab = first
    if not keepdim:
        for d in reversed(dims):
            lab = lab.squeeze(d) if lab.dim() > d else lab
    return lab


def _dims_arg(args, kwargs, pos: int = 1):
    d = kwargs.get("dim", kwargs.get("axis", args[pos] if len(args) > pos else None))
    if isinstance(d, int):
        return [d]
    if isinstance(d, (list, tuple)) and all(isinstance(v, int) for v in d):
        return list(d) or None
    return None


#: reductions whose ``dim`` comes after an order argument (``torch.norm(x, p, dim, keepdim)``)
_NORMS = ("norm", "linalg_vector_norm", "vector_norm")


@rule("sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "logsumexp", "argmax", "argmin",
      "all", "any", "nansum", "nanmean", "count_nonzero", "var_mean", "std_mean", "median", *_NORMS)
def _reduction(tr, name, func, args, kwargs, out):
    x = args[0]
    info = tr.of(x)
    if info is None:
        return
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return _elementwise(tr, name, func, args, kwargs, out)
    at = 2 if name in _NORMS else 1
    dims = _dims_arg(args, kwargs, at)
    keep = bool(kwargs.get("keepdim", False)) or (len(args) > at + 1 and args[at + 1] is True)
    labs = [_reduce_dims(align(lab, x.dim()), dims, keep, tr, name) for lab in info.labels]
    for t in _outputs(out):
        if t.dim() == labs[0].dim():
            tr.set(t, Info([squeeze_label(lab) for lab in labs] if info.param else [squeeze_label(labs[0])],
                           param=info.param))


@rule("softmax", "log_softmax", "softmin", "normalize", "cumsum", "cumprod", "logcumsumexp", "sort",
      "argsort", "topk", "cummax", "cummin")
def _along(tr, name, func, args, kwargs, out):
    """Ops whose every output along ``dim`` depends on all of that axis: join it, keep the label."""
    x = args[0]
    info = tr.of(x)
    if info is None:
        return
    d = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else -1)
    if name == "normalize":
        d = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    for lab in info.labels:
        lab = align(lab, x.dim())
        if lab.shape[d] > 1:
            tr.g.tie(lab.narrow(d, 0, 1), lab, name)
    outs = _outputs(out)
    if outs:
        tr.set(outs[0], Info(list(info.labels), param=info.param))


@rule("__setitem__")
def _setitem(tr, name, func, args, kwargs, out):
    for x in _tensors((args, kwargs)):
        i = tr.of(x)
        if i is not None:
            for lab in i.labels:
                tr.g.block(lab, "in-place assignment into a tensor")


for _n in ("size", "dim", "numel", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
           "randn_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "arange",
           "is_floating_point", "item", "tolist", "bool", "long", "int", "short", "char", "byte"):
    RULES.setdefault(_n, lambda *a: None)
