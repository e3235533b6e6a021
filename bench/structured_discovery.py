"""Structural group discovery on the library-model matrix: this tool's own discovery next to Torch-Pruning's.

For every model of ``tests/structure/library.py`` (small configurations of the library architectures, random
weights from their own constructors, the inputs and ``Out`` wrapper the tests use), two discoveries run on the
same model and the same inputs.

**Prunable parameters** (one definition, used for both columns): every element of the weight of an
``nn.Linear`` (incl. ``nn.MultiheadAttention.out_proj``), an ``nn.Conv1d/2d/3d`` (incl. depthwise and the
patch embeddings of ViTs), a transformers ``Conv1D``, and ``nn.MultiheadAttention``'s ``in_proj_weight``
(or its separate ``q/k/v_proj_weight``); a weight that is an ``nn.Embedding`` table (or tied to one, as
GPT-2's ``lm_head``) is not counted. Biases, norms, embeddings, position embeddings and class tokens are not
counted. An element is **covered** when its index along one of its tensor's axes (a row or a column, or a
kernel tap for convs) belongs to a unit of some family along that axis: it goes when that unit goes. The
share covered is the most of the prunable parameters that structured pruning can reach with the residual
width kept.

**ours**: ``sapp_compress.structure.discover(model, inputs, names_from=inner)``: families by kind, the share
of prunable parameters covered, the discovery time, the removal parity (half of each family's units, chosen
at random with seed 1, removed physically by ``remove`` vs zeroed at their consumers by ``zero_removed``:
``max_rel_diff`` of the outputs; and the same for dense vs zeroed, which shows the removal changes the
output), the parameters before / after that removal, and the weight axes left whole, counted by reason (conv
kernel axes, axis 2 and up of a conv weight, are counted apart: they are kernel taps, not channels).

**Torch-Pruning** (``--torch-pruning PATH``: a folder that holds the ``torch_pruning`` package, e.g. from
``pip install --target PATH torch-pruning==1.6.1 --no-deps``; or importable already; otherwise the column is
skipped with a note): ``tp.pruner.MetaPruner`` with ``tp.importance.GroupMagnitudeImportance(p=2)``,
``pruning_ratio=0.5``, and where the model has attention ``num_heads`` for its q/k/v projections,
``prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5``. The residual width is kept, as ours
keeps it, the way a user of Torch-Pruning keeps it: the layers that write the residual stream (embeddings,
attention output projections, the MLPs' second layers, stems, the last conv of residual blocks) and the
model's output layer go in ``ignored_layers``. The per-model glue (what is ignored, the head counts given,
modules converted before pruning, attributes updated after) is listed in the JSON. Reported: groups found by
its ``DependencyGraph`` (all, and those prunable with the ignored layers), groups it pruned, the share of the
prunable parameters in its prunable groups (same definition as above, along the axes its groups prune),
parameters before / after, whether the pruned model runs (before and after the attribute glue), and its
parity: the pruned model's output vs the unpruned model whose pruned channels are zeroed at their consumers
(the input channels that the pruned groups remove from a Linear / Conv), ``max_rel_diff``. Attention groups
are counted as MetaPruner uses them (re-rooted at their output projection); a group item whose indices exceed
its tensor's axis (an index mapping gone wrong) is listed, and only its in-range indices count as covered.
Decoders are traced with ``config.use_cache = False``. Where a piece of glue is needed, the same prune is also
run without it (``without_glue``), each attempt stopped after 60 s. For both columns the prunable weights
whose shape changed are listed, and the weight axes in some group of one discovery and not of the other.

    PYTHONPATH=. python bench/structured_discovery.py [--torch-pruning PATH] [--models bert,resnet18,...]
        [--out bench/results/structured_discovery.json]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "structure"))
from library import MODELS, Built, Out  # noqa: E402

from sapp_compress.errors import ModelLoadError  # noqa: E402
from sapp_compress.io.extras import require  # noqa: E402
from sapp_compress.structure import discover  # noqa: E402
from sapp_compress.structure.remove import max_rel_diff, random_keep, remove, zero_removed  # noqa: E402

RATIO = 0.5
PRUNABLE = ("every element of the weight of nn.Linear (incl. MultiheadAttention.out_proj), nn.Conv1d/2d/3d, "
            "transformers Conv1D, and MultiheadAttention's in_proj_weight (or q/k/v_proj_weight); "
            "nn.Embedding tables and weights tied to them excluded; biases, norms, position embeddings, "
            "class tokens not counted")
COVERED = ("an element is covered when its index along one of its tensor's axes belongs to a unit of some "
           "family (ours) or to a prunable group (Torch-Pruning) along that axis")


def cpu_line() -> str:
    name = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True,
                          text=True).stdout.strip()
    return f"{name or platform.processor()}, {os.cpu_count()} cores"


# --- the prunable parameters and their coverage ---------------------------------------------------------

def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> weight, for the definition in the module docstring (names as ``model.named_parameters``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, torch.Tensor] = {}
    for m in model.modules():
        ws = []
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or \
                _qualname(m) == "transformers.pytorch_utils.Conv1D":
            ws = [m.weight]
        elif isinstance(m, nn.MultiheadAttention):
            ws = [m.in_proj_weight] if m.in_proj_weight is not None else [m.q_proj_weight, m.k_proj_weight,
                                                                         m.v_proj_weight]
        for w in ws:
            if w is not None and id(w) not in emb and id(w) in names:
                out[names[id(w)]] = w
    return out


def coverage(weights: dict[str, torch.Tensor], covered: dict[tuple[str, int], set[int]]) -> dict:
    """Elements of ``weights`` with an index in ``covered`` along some axis (closed form: the uncovered ones
    are the product over axes of the uncovered indices)."""
    total = cov = 0
    per_tensor = {}
    for name, w in weights.items():
        n = w.numel()
        unc = 1
        for a, size in enumerate(w.shape):
            unc *= size - len(covered.get((name, a), ()))
        total += n
        cov += n - unc
        per_tensor[name] = (n - unc) / n
    axes = sorted(f"{t}[{a}]" for (t, a), idx in covered.items() if t in weights and idx)
    return {"prunable_params": total, "covered_params": cov, "share": cov / total if total else 0.0,
            "tensors_untouched": sorted(k for k, v in per_tensor.items() if v == 0.0), "axes": axes}


def _shapes(m: nn.Module) -> dict[str, list[int]]:
    return {n: list(w.shape) for n, w in prunable_weights(m).items()}


def _changed(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, str]:
    """Prunable weights whose shape changed: name -> 'before -> after'."""
    return {n: f"{'x'.join(map(str, s))} -> {'x'.join(map(str, after[n]))}" for n, s in before.items()
            if n in after and after[n] != s}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _inner(m: nn.Module) -> nn.Module:
    return m.inner if isinstance(m, Out) else m


# --- ours -----------------------------------------------------------------------------------------------

def measure_ours(name: str, b: Built) -> dict:
    t0 = time.perf_counter()
    plan = discover(b.model, b.inputs, names_from=b.inner)
    dt = time.perf_counter() - t0
    covered: dict[tuple[str, int], set[int]] = defaultdict(set)
    for f in plan.families:
        for u in f.units:
            for key, idx in u.items():
                covered[key].update(int(i) for i in idx)
    cov = coverage(prunable_weights(b.inner), covered)
    convs = {n for n, m in b.inner.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    whole = Counter()
    for w in plan.whole:
        mod = w.tensor.rsplit(".", 1)[0] if "." in w.tensor else ""
        if w.axis >= 2 and mod in convs and w.tensor.endswith("weight"):
            whole["conv kernel taps (axes 2+ of a conv weight; not channels)"] += 1
        else:
            whole[w.reason] += 1
    keep = random_keep(plan.families, {f.name: max(1, f.n_units // 2) for f in plan.families}, seed=1)
    ref = copy.deepcopy(b.model)
    zero_removed(_inner(ref), plan.families, keep)
    small = copy.deepcopy(b.model)
    remove(_inner(small), plan, keep)
    with torch.no_grad():
        dense, a, c = b.model(*b.inputs), ref(*b.inputs), small(*b.inputs)
    return {"families": len(plan.families), "expected_families": MODELS[name][2],
            "by_kind": dict(Counter(f.kind for f in plan.families)),
            "coverage": cov, "discovery_s": round(dt, 3),
            "parity_removed_vs_zeroed": max_rel_diff(a, c), "change_dense_vs_zeroed": max_rel_diff(dense, a),
            "params_before": _params(b.inner), "params_after_half_removed": _params(_inner(small)),
            "shapes_changed": _changed(_shapes(b.inner), _shapes(_inner(small))),
            "whole_axes_by_reason": dict(whole.most_common()),
            "family_list": [{"name": f.name, "kind": f.kind, "units": f.n_units, "unit_size": f.unit_size}
                            for f in plan.families]}


# --- Torch-Pruning glue ---------------------------------------------------------------------------------

class Glue:
    """What a Torch-Pruning user sets up for one model: layers to ignore (to keep the residual width and the
    output), head counts of the q/k/v projections, a conversion before pruning, attribute updates after."""

    def __init__(self, ignored=(), num_heads=None, fix: Callable | None = None, notes=()):
        self.ignored = list(ignored)
        self.num_heads = dict(num_heads or {})
        self.fix = fix  # fix(inner, pruner) after pruning
        self.notes = list(notes)


def _hf_conv1d_to_linear(inner: nn.Module) -> int:
    """transformers' Conv1D ([in, out] weight, addmm) -> an nn.Linear computing the same; Torch-Pruning has no
    pruner for Conv1D."""
    n = 0
    for pname, parent in list(inner.named_modules()):
        for cname, child in list(parent.named_children()):
            if _qualname(child) == "transformers.pytorch_utils.Conv1D":
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, cname, lin)
                n += 1
    return n


def _out_features(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.weight.shape[1]  # transformers Conv1D: [in, out]


#: conversions before pruning, by model
PREPARE = {"gpt2": _hf_conv1d_to_linear}


def glue_for(name: str, m: nn.Module) -> Glue:
    """``m``: the inner library model (what Torch-Pruning prunes; the ``Out`` wrapper is traced around it)."""
    if name in ("bert", "bert_features", "roberta"):
        base = getattr(m, "bert", None) or getattr(m, "roberta", None) or m
        ign = [base.embeddings]
        heads = {}
        for layer in base.encoder.layer:
            s = layer.attention.self
            ign += [layer.attention.output.dense, layer.output.dense]
            heads.update({s.query: s.num_attention_heads, s.key: s.num_attention_heads,
                          s.value: s.num_attention_heads})
        if name == "bert":
            ign.append(m.classifier)
        if name == "roberta":
            ign.append(m.classifier.out_proj)

        def fix(inner, pruner):
            for layer in (getattr(inner, "bert", None) or getattr(inner, "roberta",
                                                                  None) or inner).encoder.layer:
                s = layer.attention.self
                s.num_attention_heads = pruner.num_heads[s.query]
                s.all_head_size = s.query.out_features
        return Glue(ign, heads, fix,
                    notes=["ignored: embeddings, each block's attention.output.dense and output.dense, the "
                           "classifier's last layer",
                           "after: num_attention_heads, all_head_size of each self-attention"])
    if name == "distilbert":
        ign = [m.distilbert.embeddings, m.classifier]
        heads = {}
        for layer in m.distilbert.transformer.layer:
            a = layer.attention
            ign += [a.out_lin, layer.ffn.lin2]
            heads.update({a.q_lin: a.n_heads, a.k_lin: a.n_heads, a.v_lin: a.n_heads})

        def fix(inner, pruner):
            for layer in inner.distilbert.transformer.layer:
                layer.attention.n_heads = pruner.num_heads[layer.attention.q_lin]
        return Glue(ign, heads, fix, notes=["ignored: embeddings, attention.out_lin, ffn.lin2, classifier",
                                            "after: n_heads of each attention"])
    if name == "gpt2":  # after PREPARE: c_attn, c_proj, c_fc are nn.Linear
        def fix(inner, pruner):
            for blk in inner.transformer.h:
                blk.attn.num_heads = pruner.num_heads[blk.attn.c_attn]
                blk.attn.split_size = _out_features(blk.attn.c_attn) // 3
        t = m.transformer
        return Glue([t.wte, t.wpe, m.lm_head] + [x for blk in t.h for x in (blk.attn.c_proj, blk.mlp.c_proj)],
                    {blk.attn.c_attn: blk.attn.num_heads for blk in t.h}, fix,
                    notes=["before: every transformers Conv1D replaced by an equivalent nn.Linear "
                           "(Torch-Pruning has no Conv1D pruner)",
                           "ignored: wte, wpe, lm_head (tied to wte), attn.c_proj, "
                           "mlp.c_proj", "num_heads given for the fused c_attn",
                           "after: num_heads, split_size of each attention"])
    if name == "llama_gqa":
        ign = [m.model.embed_tokens, m.lm_head]
        heads = {}
        cfg = m.config
        for layer in m.model.layers:
            a = layer.self_attn
            ign += [a.o_proj, layer.mlp.down_proj]
            heads.update({a.q_proj: cfg.num_attention_heads, a.k_proj: cfg.num_key_value_heads,
                          a.v_proj: cfg.num_key_value_heads})

        def fix(inner, pruner):
            for layer in inner.model.layers:
                a = layer.self_attn
                a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
        return Glue(ign, heads, fix, notes=["ignored: embed_tokens, lm_head, o_proj, mlp.down_proj",
                                            "num_heads: q_proj 8, k_proj / v_proj 2 (GQA)",
                                            "after: num_key_value_groups of each attention"])
    if name == "vit":
        ign = [m.vit.embeddings, m.classifier]
        heads = {}
        for layer in m.vit.layers:
            a = layer.attention
            ign += [a.o_proj, layer.mlp.fc2]
            heads.update({a.q_proj: a.num_attention_heads, a.k_proj: a.num_attention_heads,
                          a.v_proj: a.num_attention_heads})

        def fix(inner, pruner):
            for layer in inner.vit.layers:
                layer.attention.num_attention_heads = pruner.num_heads[layer.attention.q_proj]
        return Glue(ign, heads, fix, notes=["ignored: embeddings (patch conv, cls token, positions), o_proj, "
                                            "mlp.fc2, classifier", "after: num_attention_heads"])
    if name == "whisper_encoder":
        enc = m.encoder
        ign = [enc.conv2, enc.embed_positions, m.classifier]
        heads = {}
        for layer in enc.layers:
            a = layer.self_attn
            ign += [a.out_proj, layer.fc2]
            heads.update({a.q_proj: a.num_heads, a.k_proj: a.num_heads, a.v_proj: a.num_heads})

        def fix(inner, pruner):
            for layer in inner.encoder.layers:
                layer.self_attn.num_heads = pruner.num_heads[layer.self_attn.q_proj]
        return Glue(ign, heads, fix, notes=["ignored: encoder.conv2, embed_positions, self_attn.out_proj, "
                                            "fc2, classifier", "after: num_heads of each attention"])
    if name == "resnet18":
        ign = [m.conv1, m.fc] + [x for s in (m.layer1, m.layer2, m.layer3, m.layer4) for blk in s
                                 for x in [blk.conv2] +
                                 ([blk.downsample[0]] if blk.downsample is not None else [])]
        return Glue(ign, notes=["ignored: stem conv1, each block's conv2 and downsample conv, fc"])
    if name == "mobilenet_v3_small":
        ign = [m.classifier[3]] + [blk.block[-1][0] for blk in m.features
                                   if getattr(blk, "use_res_connect", False)]
        return Glue(ign, notes=["ignored: the last conv of every inverted-residual block with a residual "
                                "add, the last classifier layer"])
    if name == "torchvision_vit":
        ign = [m.conv_proj, m.heads.head] + [x for layer in m.encoder.layers
                                              for x in (layer.self_attention, layer.mlp[3])]
        return Glue(ign, notes=["ignored: conv_proj, each nn.MultiheadAttention (its Torch-Pruning pruner "
                                "prunes embed_dim, i.e. the residual width, not heads), mlp[3], heads.head",
                                "no head groups possible for nn.MultiheadAttention with the residual kept"])
    if name == "deit":
        ign = [m.patch_embed, m.head]
        heads = {}
        for blk in m.blocks:
            ign += [blk.attn.proj, blk.mlp.fc2]
            heads[blk.attn.qkv] = blk.attn.num_heads

        def fix(inner, pruner):
            for blk in inner.blocks:
                blk.attn.num_heads = pruner.num_heads[blk.attn.qkv]
                blk.attn.attn_dim = blk.attn.num_heads * blk.attn.head_dim
        return Glue(ign, heads, fix, notes=["ignored: patch_embed, attn.proj, mlp.fc2, head",
                                            "num_heads given for the fused qkv",
                                            "after: num_heads and attn_dim of each attention"])
    if name == "convnext_atto":
        ign = [m.stem[0], m.head.fc] + [x for st in m.stages for x in
                                        [c for c in st.downsample.modules() if isinstance(c, nn.Conv2d)]
                                        + [blk.mlp.fc2 for blk in st.blocks]]
        return Glue(ign, notes=["ignored: stem conv, stage downsample convs, each block's mlp.fc2, head.fc"])
    if name == "efficientnet_b0":
        ign = [m.classifier]
        for st in m.blocks:
            for blk in st:
                if getattr(blk, "has_skip", False):
                    ign.append(blk.conv_pwl if hasattr(blk, "conv_pwl") else blk.conv_pw)
        return Glue(ign, notes=["ignored: the last 1x1 conv of every block with a skip, the classifier"])
    if name == "transformer_encoder":
        ign = [m.tok, m.head] + [x for layer in m.encoder.layers for x in (layer.self_attn, layer.linear2)]
        return Glue(ign, notes=["ignored: tok embedding, each nn.MultiheadAttention "
                                "(embed_dim pruning only), linear2, head",
                                "no head groups possible for nn.MultiheadAttention with the "
                                "residual kept"])
    if name == "mlp":
        return Glue([m[4]], notes=["ignored: the last Linear (the output)"])
    raise KeyError(name)


#: model config attributes set before tracing (the KV cache's torch.cat along the sequence is generation
#: machinery, not part of the function being pruned)
OVERRIDES = {"gpt2": {"use_cache": False}, "llama_gqa": {"use_cache": False}}
#: attempts without one piece of the glue, to show what it is for: label -> (prepare, overrides)
ABLATIONS = {"gpt2": {"without the Conv1D -> Linear conversion": (False, True),
                      "without use_cache=False": (True, False)},
             "llama_gqa": {"without use_cache=False": (True, False)}}
LIMIT_S = 60  # an attempt that runs longer than this is stopped and recorded as such


class _TimeLimit(Exception):
    pass


def measure_tp(name: str, b: Built, tp) -> dict:
    rec = _tp_attempt(name, b, tp)
    abl = {}
    for label, (prepare, overrides) in ABLATIONS.get(name, {}).items():
        r = _tp_attempt(name, b, tp, prepare=prepare, overrides=overrides)
        abl[label] = _tp_cell(r)
    if abl:
        rec["without_glue"] = abl
    return rec


def _tp_attempt(name: str, b: Built, tp, prepare: bool = True, overrides: bool = True) -> dict:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    try:
        return _tp_prune(name, b, tp, prepare, overrides)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _alarm(*_):
    raise _TimeLimit(f"still running after {LIMIT_S} s, stopped")


def _tp_prune(name: str, b: Built, tp, prepare: bool, overrides: bool) -> dict:
    model = copy.deepcopy(b.model)
    inner = _inner(model)
    rec: dict = {}
    if prepare and name in PREPARE:
        rec["converted_modules"] = PREPARE[name](inner)
    if overrides:
        for k, v in OVERRIDES.get(name, {}).items():
            setattr(inner.config, k, v)
    glue = glue_for(name, inner)
    rec["glue"] = glue.notes + [f"before: config.{k} = {v}" for k, v in OVERRIDES.get(name, {}).items()]
    with torch.no_grad():
        base = model(*b.inputs)
    reference = copy.deepcopy(model)  # the unpruned model (after any conversion) for the zeroed reference
    names = {m: n for n, m in model.named_modules()}
    weights = prunable_weights(inner)
    wnames = {id(w): n for n, w in weights.items()}
    n0 = _params(inner)
    shapes0 = _shapes(inner)
    stage = "MetaPruner(...) (dependency graph)"
    try:
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(
            model, list(b.inputs), importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=RATIO, ignored_layers=glue.ignored, num_heads=glue.num_heads,
            prune_num_heads=bool(glue.num_heads), prune_head_dims=False,
            head_pruning_ratio=RATIO if glue.num_heads else 0.0)
        rec["graph_s"] = round(time.perf_counter() - t0, 3)
        DG = pruner.DG
        stage = "DependencyGraph.get_all_groups()"
        rec["groups_all"] = sum(1 for _ in DG.get_all_groups(root_module_types=pruner.root_module_types))
        covered: dict[tuple[str, int], set[int]] = defaultdict(set)
        n_prunable = 0
        # a group item whose indices exceed its tensor's axis: an index mapping gone wrong
        bad: list[str] = []
        for group in DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                       root_module_types=pruner.root_module_types):
            n_prunable += 1
            if pruner._is_atten_group(group)[0]:  # as MetaPruner does: re-rooted at the output projection
                group = pruner._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            _cover(group, DG, weights, wnames, covered, bad)
        rec["groups_prunable"] = n_prunable
        rec["group_indices_out_of_range"] = bad
        rec["coverage"] = coverage(weights, covered)
        stage = "pruner.step()"
        pruned_groups = 0
        zero_cols: dict[tuple[str, int], set[int]] = defaultdict(set)
        for group in pruner.step(interactive=True):
            if any(len(idxs) for _, idxs in group):
                pruned_groups += 1
            for dep, idxs in group:
                mod = dep.target.module
                if not len(idxs) or not isinstance(mod, nn.Module) or \
                        not DG.is_in_channel_pruning_fn(dep.handler):
                    continue
                if isinstance(mod, nn.Linear) or (isinstance(mod,
                                                             nn.modules.conv._ConvNd) and mod.groups == 1):
                    zero_cols[(names[mod], 1)].update(int(i) for i in idxs)
            group.prune()
        rec["groups_pruned"] = pruned_groups
        n1 = _params(inner)
        rec.update(params_before=n0, params_after=n1, shapes_changed=_changed(shapes0, _shapes(inner)))
        rec["ok"] = True
    except (Exception, _TimeLimit) as e:  # noqa: BLE001 -- a failure is a result here
        rec.update(ok=False, stage=stage, error=_err(e), where=_where(e))
        return rec
    # the zeroed reference: the pruned input channels of the consumers set to 0 in the unpruned model
    ref_mods = dict(reference.named_modules())
    with torch.no_grad():
        for (mname, axis), idx in zero_cols.items():
            ref_mods[mname].weight.index_fill_(axis, torch.as_tensor(sorted(idx), dtype=torch.long), 0.0)
        ref_out = reference(*b.inputs)
    rec["change_dense_vs_zeroed"] = max_rel_diff(base, ref_out)
    rec["forward_without_attribute_glue"] = _run(model, b.inputs, ref_out) if glue.fix is not None else None
    if glue.fix is not None:
        glue.fix(inner, pruner)
    rec["forward"] = _run(model, b.inputs, ref_out)
    return rec


def _err(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def _cover(group, DG, weights, wnames, covered, bad: list | None = None) -> None:
    for dep, idxs in group:
        mod = dep.target.module
        if not isinstance(mod, nn.Module):
            continue
        out = DG.is_out_channel_pruning_fn(dep.handler)
        if isinstance(mod, nn.MultiheadAttention):
            w, axis = mod.in_proj_weight, 1  # its pruner removes embed_dim: the columns of in_proj
        elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            w = mod.weight
            axis = 0 if out or (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1) else 1
        else:
            continue
        if w is not None and id(w) in wnames:
            size = w.shape[axis]
            if len(idxs) and max(int(i) for i in idxs) >= size and bad is not None:
                bad.append(f"{wnames[id(w)]}[{axis}]: {len(idxs)} indices up to {max(int(i) for i in idxs)}, "
                           f"axis size {size}")
            covered[(wnames[id(w)], axis)].update(int(i) for i in idxs if int(i) < size)


def _run(model, inputs, ref_out) -> dict:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as e:  # noqa: BLE001
        return {"runs": False, "error": _err(e), "where": _where(e)}
    if out.shape != ref_out.shape:
        return {"runs": True, "parity_vs_zeroed": None, "note": f"output shape {tuple(out.shape)} vs "
                                                               f"{tuple(ref_out.shape)}"}
    return {"runs": True, "parity_vs_zeroed": max_rel_diff(ref_out, out)}


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    return f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"


# --- the run --------------------------------------------------------------------------------------------

def load_tp(path: str | None):
    if path:
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        require("torchvision", "Torch-Pruning's import")  # torchvision importable on a CPU-only torch
    except ModelLoadError:
        pass
    try:
        tp = importlib.import_module("torch_pruning")
    except ImportError as e:
        return None, f"Torch-Pruning not importable ({e}); its column is skipped (--torch-pruning PATH)"
    return tp, f"Torch-Pruning {tp_version(tp)}"


def tp_version(tp) -> str:
    """The installed distribution's version (its module's ``__version__`` can lag: 1.6.1 says 1.6.0)."""
    try:
        from importlib.metadata import version
        dist = version("torch-pruning")
    except Exception:  # noqa: BLE001
        dist = None
    mod = getattr(tp, "__version__", None)
    return f"{dist} (module __version__ {mod})" if dist and mod and dist != mod else str(dist or mod)


def compare_axes(inner: nn.Module, ours: list[str], theirs: list[str]) -> dict:
    """Prunable weight axes in some group of one discovery and not of the other (Torch-Pruning's axes of a
    transformers Conv1D converted to nn.Linear are mapped back: rows and columns swap)."""
    conv1d = {f"{n}.weight" for n, m in inner.named_modules()
              if _qualname(m) == "transformers.pytorch_utils.Conv1D"}

    def back(k: str) -> str:
        t, a = k[:-3], int(k[-2])
        return f"{t}[{1 - a}]" if t in conv1d else k
    theirs = {back(k) for k in theirs}
    return {"only_ours": sorted(set(ours) - theirs), "only_torch_pruning": sorted(theirs - set(ours)),
            "both": len(set(ours) & theirs)}


def _fmt_kinds(k: dict) -> str:
    return " ".join(f"{v} {n}" for n, v in sorted(k.items())) or "-"


def _tp_cell(t: dict | None) -> str:
    if t is None:
        return "skipped"
    if not t.get("ok"):
        return f"FAIL at {t['stage']}: {t['error'][:90]}"
    f = t["forward"]
    par = f.get("parity_vs_zeroed")
    run = (f"runs, parity {par:.1e}" if par is not None else "runs") if f["runs"] else \
        f"forward FAIL: {f['error'][:70]}"
    return (f"groups {t['groups_prunable']}/{t['groups_all']} pruned {t['groups_pruned']}, cov "
            f"{t['coverage']['share']:.0%}, params {t['params_after'] / t['params_before']:.2f}x, {run}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--torch-pruning", metavar="PATH", help="a folder holding the torch_pruning package")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "structured_discovery.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tp, tp_line = load_tp(args.torch_pruning)
    versions = {"torch": torch.__version__}
    for lib in ("transformers", "timm", "torchvision"):
        try:
            versions[lib] = require(lib, "the bench").__version__
        except ModelLoadError:
            versions[lib] = None
    versions["torch_pruning"] = tp_version(tp) if tp else None
    cpu = cpu_line()
    print(f"CPU: {cpu}\n{tp_line}\nversions: {versions}\nprunable parameters: {PRUNABLE}\ncovered: "
          f"{COVERED}\n")
    rows = []
    for name in args.models.split(","):
        builder, lib, _ = MODELS[name]
        row: dict = {"model": name}
        try:
            if lib:
                require(lib, "this model")
            torch.manual_seed(0)
            b = builder()
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(f"{name}: build failed: {row['error']}")
            continue
        try:
            row["ours"] = measure_ours(name, b)
        except Exception as e:  # noqa: BLE001
            row["ours"] = {"error": f"{type(e).__name__}: {e}", "where": _where(e)}
        row["torch_pruning"] = measure_tp(name, b, tp) if tp else None
        if row["torch_pruning"] and "coverage" in row["torch_pruning"] and "coverage" in row["ours"]:
            row["axes_compared"] = compare_axes(b.inner, row["ours"]["coverage"]["axes"],
                                                row["torch_pruning"]["coverage"]["axes"])
        rows.append(row)
        o = row["ours"]
        if "error" in o:
            print(f"{name}: ours FAIL {o['error']}")
        else:
            print(f"{name}: ours {o['families']} families ({_fmt_kinds(o['by_kind'])}), cov "
                  f"{o['coverage']['share']:.1%} of {o['coverage']['prunable_params']}, parity "
                  f"{o['parity_removed_vs_zeroed']:.1e}, params "
                  f"{o['params_after_half_removed'] / o['params_before']:.2f}x, {o['discovery_s']:.2f}s | "
                  f"TP: {_tp_cell(row['torch_pruning'])}", flush=True)
    _table(rows)
    meta = {"cpu": cpu, "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "versions": versions,
            "torch_pruning": tp_line, "prunable_parameters": PRUNABLE, "covered": COVERED, "ratio": RATIO,
            "command": "python bench/structured_discovery.py" +
            (" --torch-pruning PATH" if args.torch_pruning else "")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "models": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _table(rows) -> None:
    print("\n| model | ours: families | ours: prunable params covered | ours: parity | ours: left whole "
          "(weight axes) | Torch-Pruning |\n|---|---|---|---|---|---|")
    for r in rows:
        o = r.get("ours") or {}
        if "error" in r or "error" in o:
            print(f"| {r['model']} | error: {r.get('error') or o.get('error')} | | | | |")
            continue
        whole = "; ".join(f"{v} {k.split(':')[0].split(' (')[0]}"
                          for k, v in o["whole_axes_by_reason"].items())
        print(f"| {r['model']} | {o['families']} ({_fmt_kinds(o['by_kind'])}) | {o['coverage']['share']:.1%} "
              f"| {o['parity_removed_vs_zeroed']:.1e} | {whole} | {_tp_cell(r['torch_pruning'])} |")


if __name__ == "__main__":
    sys.exit(main())
