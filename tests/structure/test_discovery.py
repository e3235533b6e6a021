"""Group discovery on library models: the families found (counts, kinds, units), what is left whole and why,
and the removal they allow: the physically smaller model computes exactly what the model with the removed
units zeroed at their consumers computes."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import needs  # noqa: E402
from library import MODELS, Built  # noqa: E402

from sapp_compress.structure import discover
from sapp_compress.structure.remove import max_rel_diff, random_keep, remove, zero_removed


def build(name: str) -> Built:
    builder, library, _ = MODELS[name]
    if library:
        needs(library)
    torch.manual_seed(0)
    return builder()


@pytest.fixture(scope="module")
def discovered():
    cache = {}

    def get(name):
        if name not in cache:
            b = build(name)
            cache[name] = (b, discover(b.model, b.inputs, names_from=b.inner))
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(MODELS))
def test_families_found(name, discovered):
    b, plan = discovered(name)
    assert len(plan.families) == MODELS[name][2], [f.name for f in plan.families]
    got = {f.name: (f.kind, f.n_units, f.unit_size) for f in plan.families}
    for fam, want in b.families.items():
        assert got.get(fam) == want, (fam, got)
    for f in plan.families:  # units of one family touch the same tensors the same way
        assert f.producers and f.consumers
        assert all(set(u) == set(f.units[0]) for u in f.units)
        sizes = {k: len(v) for k, v in f.units[0].items()}
        assert all({k: len(v) for k, v in u.items()} == sizes for u in f.units)
    # every 2-D+ weight axis is accounted for: in a family, or left whole with a reason
    covered = {k for f in plan.families for k in f.keys}
    whole = {(w.tensor, w.axis): w.reason for w in plan.whole}
    for n, p in b.inner.named_parameters():
        if p.dim() >= 2 and not any(t == n for t, _ in covered):
            assert any(t == n for t, _ in whole), n
    assert all(r for r in whole.values())


def test_heads_and_gqa_units(discovered):
    """A GQA unit is one kv head and its query heads: 8 rows of k and v, 4 x 8 rows of q, 32 columns of o."""
    b, plan = discovered("llama_gqa")
    att = plan.family("model.layers.0.self_attn (heads)")
    u = att.units[1]
    p = "model.layers.0.self_attn."
    assert list(u[(p + "k_proj.weight", 0)]) == list(range(8, 16))
    assert list(u[(p + "v_proj.weight", 0)]) == list(range(8, 16))
    assert list(u[(p + "q_proj.weight", 0)]) == list(range(32, 64))
    assert list(u[(p + "o_proj.weight", 1)]) == list(range(32, 64))
    mlp = plan.family("model.layers.0.mlp (neurons)")
    assert {t for t, _ in mlp.producers} == {"model.layers.0.mlp.gate_proj.weight",
                                             "model.layers.0.mlp.up_proj.weight"}
    assert mlp.consumers == (("model.layers.0.mlp.down_proj.weight", 1),)


def test_relative_position_bias_column_goes_with_its_head(discovered):
    """Swin adds a bias table (positions x heads) to the scores through the attention mask, in the shifted
    windows summed with a mask of the data: a head's unit holds its column of the table, which the removal
    slices (before, the table kept every head and the smaller model failed, so heads stayed whole)."""
    _, plan = discovered("swin")
    for block in (0, 1):  # unshifted, shifted
        p = f"swin.encoder.layers.1.blocks.{block}.attention."
        u = plan.family(p[:-1] + " (heads)").units[3]
        assert list(u[(p + "relative_position_bias.relative_position_bias_table", 1)]) == [3]
        assert list(u[(p + "q_proj.weight", 0)]) == list(range(48, 64))
    _, plan = discovered("t5_encoder")  # one bias for every block: a head goes from all of them at once
    u = plan.family("encoder.block (heads)").units[2]
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert list(u[(bias, 1)]) == [2]
    assert all(list(u[(f"encoder.block.{b}.layer.0.SelfAttention.q.weight", 0)]) == list(range(32, 48))
               for b in (0, 1))


def test_fused_projections_split_by_head(discovered):
    """GPT-2's c_attn and nn.MultiheadAttention's in_proj_weight hold q, k and v: a head is its rows in
    each."""
    _, plan = discovered("gpt2")
    u = plan.family("transformer.h.0.attn (heads)").units[2]
    cols = u[("transformer.h.0.attn.c_attn.weight", 1)]  # Conv1D: [in, out]
    assert list(cols) == [*range(32, 48), *range(96, 112), *range(160, 176)]
    _, plan = discovered("transformer_encoder")
    u = plan.family("encoder.layers.0.self_attn (heads)").units[1]
    assert list(u[("encoder.layers.0.self_attn.in_proj_weight", 0)]) == [*range(16, 32), *range(80, 96),
                                                                         *range(144, 160)]


def test_residual_and_unused_left_whole(discovered):
    """The residual stream stays (its width is tied across every block); the pooler of a feature-extraction
    BertModel, which the selected output does not use, is left alone with that reason."""
    _, plan = discovered("resnet18")
    whole = {(w.tensor, w.axis): w.reason for w in plan.whole}
    assert "residual" in whole[("layer1.0.conv2.weight", 0)]
    assert "residual" in whole[("layer2.0.downsample.0.weight", 0)]
    _, plan = discovered("bert_features")
    whole = {(w.tensor, w.axis): w.reason for w in plan.whole}
    assert "does not depend" in whole[("pooler.dense.weight", 0)]
    assert "residual" in whole[("encoder.layer.0.attention.output.dense.weight", 0)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_removal_keeps_the_kept_part(name, discovered):
    """Removing half of every family's units (at random) gives the same outputs, to 1e-5 of their scale, as
    zeroing those units at their consumers; the model gets smaller, and its output does change."""
    b, plan = discovered(name)
    keep = random_keep(plan.families, {f.name: f.n_units // 2 for f in plan.families}, seed=1)
    ref = copy.deepcopy(b.model)
    zero_removed(ref.inner if hasattr(ref, "inner") else ref, plan.families, keep)
    small = copy.deepcopy(b.model)
    inner = small.inner if hasattr(small, "inner") else small
    remove(inner, plan, keep)
    with torch.no_grad():
        dense, a, c = b.model(*b.inputs), ref(*b.inputs), small(*b.inputs)
    assert max_rel_diff(a, c) <= 1e-5
    assert max_rel_diff(dense, a) > 1e-3
    n0 = sum(p.numel() for p in b.inner.parameters())
    n1 = sum(p.numel() for p in inner.parameters())
    params = dict(b.inner.named_parameters())
    removed = sum(len(idx) for f in plan.families for u, k in zip(f.units, keep[f.name]) if not k
                  for (t, _), idx in u.items() if t in params)
    assert n1 < n0 and removed > 0


def test_removal_updates_module_sizes(discovered):
    b, plan = discovered("resnet18")
    keep = {f.name: np.arange(f.n_units) < f.n_units // 4 for f in plan.families}
    m = copy.deepcopy(b.model)
    remove(m, plan, keep)
    assert (m.layer1[0].conv1.out_channels, m.layer1[0].bn1.num_features,
            m.layer1[0].conv2.in_channels) == (16, 16, 16)
    b, plan = discovered("deit")
    keep = {f.name: np.arange(f.n_units) < 1 for f in plan.families}
    m = copy.deepcopy(b.model)
    remove(m, plan, keep)
    assert (m.blocks[0].attn.num_heads, m.blocks[0].attn.qkv.out_features,
            m.blocks[0].mlp.fc1.out_features) == \
        (1, 192, 1)


def test_baddbmm_by_keyword_joins_its_operands():
    """``bias.baddbmm(batch1=q, batch2=k^T)`` (Bloom's alibi scores name their operands): the tracer reads
    them by name, and q's and k's neurons, contracted together in the scores, are one family (it raised
    IndexError)."""
    from torch import nn

    class Scores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.o = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            q, k = self.q(x), self.k(x)
            bias = torch.zeros(x.shape[0], x.shape[1], x.shape[1])
            s = bias.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=0.25)
            return self.o(torch.softmax(s, -1) @ q).mean(1)

    torch.manual_seed(0)
    (fam,) = discover(Scores(), (torch.randn(2, 5, 8),)).families
    assert fam.n_units == 16 and {t for t, _ in fam.producers} == {"q.weight", "q.bias", "k.weight", "k.bias"}
    assert fam.consumers == (("o.weight", 1),)


def test_trace_leaves_a_modules_cache_as_it_was():
    """A module that caches what it derives from its weights in eval mode (timm's LeViT: its attention biases,
    in a dict): the trace, which runs with gradients enabled, leaves the cache as it found it. A cache it
    filled held tensors of the traced graph, which no deep copy of the model accepts (--structure channels
    exited 1)."""
    import copy as copy_module

    from torch import nn

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
            self.bias = nn.Parameter(torch.randn(16))
            self.cache: dict = {}

        def forward(self, x):
            if not self.training:
                self.last = x.shape[0]  # an attribute the forward adds
                if "b" not in self.cache:
                    self.cache["b"] = self.bias * 2
                return self.out(torch.relu(self.fc(x) + self.cache["b"]))
            return self.out(torch.relu(self.fc(x) + self.bias * 2))

    torch.manual_seed(0)
    m = Cached().eval()
    fams = discover(m, (torch.randn(4, 8),)).families
    assert [f.n_units for f in fams] == [16]
    assert m.cache == {} and not hasattr(m, "last") and not m.training
    copy_module.deepcopy(m)  # raised "Only Tensors created explicitly by the user ..." with the traced cache
