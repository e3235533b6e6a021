"""Physical removal: slice the removed units out of every tensor they touch, so the model is itself smaller.

After slicing, modules whose sizes live in attributes are updated through :data:`SIZE_RULES` (the nearest
class in the module's MRO wins: ``nn.Linear``'s ``in/out_features``, a conv's channels and groups, a
BatchNorm's ``num_features``, transformers' ``Conv1D.nf``), and attention modules' head counts and inner
widths through :data:`HEAD_ATTRIBUTES` (attribute names that hold a number of heads or the width of all
heads together, scaled by the share of units kept). ``nn.MultiheadAttention``, whose functional forward
cannot hold an inner width other than the model's, is replaced by :class:`HeadPrunedMultiheadAttention`, which
computes the same thing with fewer heads.

Removal is checked, not trusted: :func:`parity` compares the smaller model with the same model whose removed
units are zeroed at their consumers (which is what the fine-tune's masks do), and the pipeline runs it before
any fine-tuning on a random removal, so a module whose forward keeps a size it did not expose fails in
seconds.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .groups import GroupFamily, Key, StructurePlan


def dropped_indices(families: list[GroupFamily], keep: dict[str, np.ndarray]) -> dict[Key, np.ndarray]:
    """(tensor, axis) -> indices to remove, from each family's boolean ``keep`` over its units."""
    drop: dict[Key, list[np.ndarray]] = defaultdict(list)
    for fam in families:
        k = np.asarray(keep[fam.name], dtype=bool)
        for u, unit in enumerate(fam.units):
            if not k[u]:
                for key, idx in unit.items():
                    drop[key].append(idx)
    return {key: np.unique(np.concatenate(v)) for key, v in drop.items()}


def _tensor_slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """name -> every (module, attribute, is_parameter) that holds that tensor (shared tensors: several)."""
    first: dict[int, str] = {}
    slots: dict[str, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in list(m._parameters.items()) + list(m._buffers.items()):
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            name = first.setdefault(id(p), full)
            slots[name].append((m, pname, pname in m._parameters))
    return slots


@torch.no_grad()
def slice_tensors(model: nn.Module, drop: dict[Key, np.ndarray]) -> set[nn.Module]:
    """Remove ``drop``'s indices from the named tensors, in place (new tensors, same names). Returns the
    modules whose tensors changed."""
    slots = _tensor_slots(model)
    by_tensor: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for (t, a), idx in drop.items():
        by_tensor[t][a] = idx
    changed: set[nn.Module] = set()
    for name, axes in by_tensor.items():
        holders = slots[name]
        m0, attr0, is_param = holders[0]
        old = getattr(m0, attr0) if not is_param else m0._parameters[attr0]
        new = old.detach()
        for axis, idx in axes.items():
            keep = np.setdiff1d(np.arange(new.shape[axis]), idx)
            new = new.index_select(axis, torch.as_tensor(keep, dtype=torch.long, device=new.device))
        new = new.contiguous()
        if is_param:
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for m, attr, p in holders:
            if p:
                m._parameters[attr] = new
            else:
                m._buffers[attr] = new
            changed.add(m)
    return changed


# --- module sizes ---------------------------------------------------------------------------------------

def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv(m: nn.modules.conv._ConvNd) -> None:
    old_out, old_groups = m.out_channels, m.groups
    m.out_channels = m.weight.shape[0]
    if old_groups > 1:
        m.groups = m.out_channels // (old_out // old_groups)
    m.in_channels = m.weight.shape[1] * m.groups


def _norm(m: nn.Module) -> None:
    t = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    m.num_features = t.shape[0]


def _hf_conv1d(m: nn.Module) -> None:
    m.nf = m.weight.shape[1]
    if hasattr(m, "nx"):
        m.nx = m.weight.shape[0]


#: module type -> how to read its sizes back from its tensors after slicing.
SIZE_RULES: dict[type, Callable[[nn.Module], None]] = {
    nn.Linear: _linear,
    nn.modules.conv._ConvNd: _conv,
    nn.modules.batchnorm._BatchNorm: _norm,
    nn.modules.instancenorm._InstanceNorm: _norm,
}
#: the same, for classes of optional libraries (by qualified name, so they are never imported here).
NAMED_SIZE_RULES: dict[str, Callable[[nn.Module], None]] = {
    "transformers.pytorch_utils.Conv1D": _hf_conv1d,
}

#: attribute names that hold a number of heads, or the width of all heads together (not the model's width),
#: in attention modules of torch, transformers and timm (and in a module's own ``config``, which some
#: attention modules read in their forward). Each is scaled by the share of units kept.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_key_value_heads",
                   "num_kv_heads", "all_head_size", "attn_dim", "split_size", "inner_dim")
#: attributes holding the query heads per key/value head, recomputed from the two counts once they are
#: scaled (multi-query attention keeps its one key/value head while query heads go; grouped-query attention
#: loses whole groups): (attribute, query-head counts, key/value-head counts), each count read from the
#: module or its config
GROUP_ATTRIBUTES = (("num_key_value_groups", ("num_heads", "num_attention_heads"),
                     ("num_key_value_heads", "num_kv_heads")),)


def _size_rule(m: nn.Module):
    for cls in type(m).__mro__:
        if cls in SIZE_RULES:
            return SIZE_RULES[cls]
        named = NAMED_SIZE_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return None


def _scale_head_attributes(model: nn.Module, fam: GroupFamily, kept: int) -> None:
    """Attention modules under the family's owner: head counts and all-heads widths times ``kept / units``, in
    the module and in its own copy of its ``config`` (a config object is shared by every layer), then the
    heads-per-group counts recomputed (:data:`GROUP_ATTRIBUTES`)."""
    owner = model.get_submodule(fam.owner)
    u = fam.n_units
    for m in owner.modules():
        if isinstance(m, nn.MultiheadAttention):
            continue
        _scale(m, u, kept)
        cfg = getattr(m, "config", None)
        if cfg is not None and not isinstance(cfg, nn.Module) and any(
                isinstance(getattr(cfg, a, None), int) for a in HEAD_ATTRIBUTES):
            m.config = copy.copy(cfg)
            _scale(m.config, u, kept)
        for attr, heads, kv in GROUP_ATTRIBUTES:
            h, k = _count(m, heads), _count(m, kv)
            if isinstance(getattr(m, attr, None), int) and h and k and h % k == 0:
                setattr(m, attr, h // k)


def _scale(obj, units: int, kept: int) -> None:
    for a in HEAD_ATTRIBUTES:
        v = getattr(obj, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v % units == 0:
            setattr(obj, a, v // units * kept)


def _count(m: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that ``m`` (or else its config) holds as an int."""
    for holder in (m, getattr(m, "config", None)):
        for n in names:
            v = getattr(holder, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def remove(model: nn.Module, plan: StructurePlan | list[GroupFamily],
           keep: dict[str, np.ndarray]) -> nn.Module:
    """Remove every unit whose ``keep`` entry is False, in place; returns ``model``.

    ``keep``: family name -> boolean array over its units. A family missing from ``keep`` keeps every unit.
    """
    families = plan.families if isinstance(plan, StructurePlan) else list(plan)
    keep = {f.name: np.asarray(keep.get(f.name, np.ones(f.n_units, bool)), dtype=bool) for f in families}
    for f in families:
        if not keep[f.name].any():
            raise ValueError(f"{f.name}: every unit removed")
    heads = {f.name: f for f in families if f.kind == "heads" and not keep[f.name].all()}
    mha = _multihead_modules(model, heads.values())
    changed = slice_tensors(model, dropped_indices(families, keep))
    for m in changed:
        rule = _size_rule(m)
        if rule is not None:
            rule(m)
    for name, f in heads.items():
        _scale_head_attributes(model, f, int(keep[name].sum()))
    for path, (m, kept_heads) in mha.items():
        _replace(model, path, HeadPrunedMultiheadAttention.from_module(m, kept_heads))
    return model


def _multihead_modules(model: nn.Module, families) -> dict[str, tuple[nn.MultiheadAttention, None]]:
    out = {}
    for f in families:
        for t, _ in f.producers:
            path, _, attr = t.rpartition(".")
            m = model.get_submodule(path) if path else model
            if isinstance(m, nn.MultiheadAttention) and attr == "in_proj_weight":
                out[path] = (m, None)
    return out


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with fewer heads than its embedding needs: the projections map the model's
    width ``E`` to ``heads * head_dim`` and back. Same parameters and buffers as the module it replaces
    (sliced), the same call signature and masks; attention weights are not returned (None).
    ``_qkv_same_embed_dim`` is False, which keeps ``nn.TransformerEncoderLayer``'s fused inference path (which
    assumes ``E`` heads wide) off."""

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention, _=None) -> "HeadPrunedMultiheadAttention":
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)
        new._parameters = dict(m._parameters)
        new._buffers = dict(m._buffers)
        new._modules = dict(m._modules)
        inner = m.in_proj_weight.shape[0] // 3
        new.num_heads = inner // m.head_dim
        new.inner_dim = inner
        new._qkv_same_embed_dim = False
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, tq, _ = query.shape
        tk = key.shape[1]
        w, bias = self.in_proj_weight, self.in_proj_bias
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, wq, bq).reshape(b, tq, h, d).transpose(1, 2)
        k = F.linear(key, wk, bk).reshape(b, tk, h, d).transpose(1, 2)
        v = F.linear(value, wv, bv).reshape(b, tk, h, d).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, b, h, tq, tk, q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=bool(is_causal and mask is None))
        out = out.transpose(1, 2).reshape(b, tq, h * d)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _merge_masks(attn_mask, key_padding_mask, b, h, tq, tk, dtype):
    """``nn.MultiheadAttention``'s masks (bool: True = not allowed; float: added) as one additive mask."""
    def additive(m):
        if m is None:
            return None
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = additive(attn_mask)
    if mask is not None:
        mask = mask.reshape(b, h, tq, tk) if mask.dim() == 3 else mask.reshape(1, 1, tq, tk)
    kp = additive(key_padding_mask)
    if kp is not None:
        kp = kp.reshape(b, 1, 1, tk)
        mask = kp if mask is None else mask + kp
    return mask


# --- checking it ----------------------------------------------------------------------------------------

@torch.no_grad()
def zero_removed(model: nn.Module, families: list[GroupFamily], keep: dict[str, np.ndarray]) -> nn.Module:
    """Zero the removed units' consumer slices in place (what the fine-tune's masks do at 0): the reference
    the smaller model must match."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for f in families:
        k = np.asarray(keep.get(f.name, np.ones(f.n_units, bool)), dtype=bool)
        for u, unit in enumerate(f.units):
            if k[u]:
                continue
            for t, a in f.consumers:
                p = params[t]
                idx = torch.as_tensor(unit[(t, a)], dtype=torch.long, device=p.device)
                p.index_fill_(a, idx, 0.0)
    return model


def random_keep(families: list[GroupFamily], kept: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A random choice of ``kept[name]`` units per family (for the pre-flight parity check)."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in families:
        k = np.zeros(f.n_units, bool)
        k[rng.choice(f.n_units, kept[f.name], replace=False)] = True
        out[f.name] = k
    return out


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / max(float(a.abs().max()), 1e-12))


