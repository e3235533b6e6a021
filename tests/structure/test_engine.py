"""The pruning methods on structural families: the same engine and registry as blocks, with a family's units
as a ``[1, n]`` grid. Contract tests over every registered method."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from calib_data.shards import Shard
from sapp_compress import PruneConfig, TrainConfig, prune
from sapp_compress.engine.methods import METHODS
from sapp_compress.granularity import CHANNELS, Plan
from sapp_compress.io.reparametrizations import is_parametrized
from sapp_compress.structure import discover
from sapp_compress.structure.gates import FamilyPlan, attach, fold
from sapp_compress.structure.remove import remove


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 5))


def _shard(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 32)).astype(np.float32)
    return Shard(inputs=(x,), y=(x[:, :5].argmax(1)).astype(np.int64), source="synthetic")


def _plans(model):
    plan = discover(model, (torch.randn(2, 32),))
    return [FamilyPlan(f, model) for f in plan.families]


def _plan(model):
    """The families of :func:`_plans` as the engine's plan (what a method attaches to)."""
    return Plan(CHANNELS, _plans(model))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_exact_kept_units_and_a_smaller_model(method):
    """Every method ends with exactly round((1 - s) n) units per family (or fewer, when a kept unit's consumer
    ended all zero), and the model is physically smaller: Linear(32, 32), Linear(32, 24)."""
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    res = prune(model, _shard(), PruneConfig(block="8", sparsity=0.5, method=method, structure="channels"),
                TrainConfig(steps=40, batch_size=32, lr=1e-3))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the input is untouched
    assert not is_parametrized(res.model)
    assert res.layers == [] and res.structure is not None
    kept = {f.name: int(k.sum()) for f, k in zip(res.structure.families, res.structure.keep.values())}
    assert set(kept) == {"0 (neurons)", "2 (neurons)"}
    assert 30 <= kept["0 (neurons)"] <= 32 and 22 <= kept["2 (neurons)"] <= 24
    m = res.model
    assert (m[0].out_features, m[2].in_features, m[2].out_features, m[4].in_features) == \
        (kept["0 (neurons)"], kept["0 (neurons)"], kept["2 (neurons)"], kept["2 (neurons)"])
    assert res.structure.parity <= 1e-5
    assert np.isfinite(res.metrics["pruned_torch"]["score"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gates_fold_to_what_the_masked_model_computes(method):
    """With random logits and a random mask, folding the gates and removing the pruned units gives exactly
    the masked model's outputs."""
    model = _model()
    cfg = PruneConfig(block="8", sparsity=0.6, method=method, structure="channels")
    m = METHODS[method](cfg, _plan(model), total_steps=10)
    with torch.no_grad():
        for layer in m.layers:
            if layer.masker.logits is not None:
                layer.masker.logits.normal_()
    m.finish()
    # round(0.4 x 64) = 26 and round(0.4 x 48) = 19, to the nearest multiple of 8 (GroupFamily.kept_units)
    assert [int(layer.alive().sum()) for layer in m.layers] == [24, 16]
    x = torch.randn(16, 32)
    with torch.no_grad():
        masked = model(x)
    keep = fold(m.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=0, atol=0)
    remove(model, [layer.family for layer in m.layers], keep)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-6)


def test_gate_is_identity_at_start_and_scales_consumers():
    """At initialisation (logits 0, mask 1) the gated model is the model; a unit at mask 0 is the unit
    removed:
    its down-projection column is zero in the effective weight, its up-projection row untouched."""
    model = _model()
    x = torch.randn(8, 32)
    with torch.no_grad():
        ref = model(x)
    layers = attach(_plans(model), attention=True, powerprop=False, density=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    w2 = model[2].parametrizations.weight.original.detach().clone()
    keep = torch.ones(1, 64, dtype=torch.bool)
    keep[0, 5] = False
    layers[0].set_mask(keep)
    eff = model[2].weight.detach()
    assert (eff[:, 5] == 0).all() and torch.equal(eff[:, 4], w2[:, 4])
    assert torch.equal(model[0].weight[5], model[0].weight[5])  # the producer is not gated


def test_revive_zero_keeps_producers_and_decay_skips_pruned_units():
    """A dense phase's revival zeroes only the consumer slices (so the unit has a gradient again); the coupled
    l2 penalty leaves pruned units' slices alone, in every tensor they touch."""
    model = _model()
    layers = attach(_plans(model), attention=False, powerprop=False, density=0.5)
    fam = layers[0]
    keep = torch.ones(1, 64, dtype=torch.bool)
    keep[0, :10] = False
    fam.set_mask(keep)
    up = model[0].weight.detach().clone()
    for t in fam.trained():
        t.grad = torch.zeros_like(t)
    fam.decay_(1.0)
    grads = {id(t): t.grad for t in fam.trained()}
    assert (grads[id(model[0].weight)][:10] == 0).all() and (grads[id(model[0].weight)][10:] != 0).any()
    down = model[2].parametrizations.weight.original
    assert (grads[id(down)][:, :10] == 0).all()
    fam.revive(zero=True)
    assert torch.equal(model[0].weight.detach(), up)
    assert (down[:, :10] == 0).all() and (down[:, 10:] != 0).any()
    assert fam.alive().all()


def test_scores_are_group_norms_over_every_tensor():
    model = _model()
    layers = attach(_plans(model), attention=False, powerprop=False, density=0.5)
    fam = layers[0]
    w0, b0 = model[0].weight.detach(), model[0].bias.detach()
    w2 = model[2].parametrizations.weight.original.detach()
    want = (w0.pow(2).sum(1) + b0.pow(2) + w2.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(fam.norms().reshape(-1), want, rtol=1e-5, atol=1e-6)


def test_sapp_ranks_units_by_attention():
    """SA++ on units: the kept units are those of highest logit."""
    model = _model()
    cfg = PruneConfig(block="8", sparsity=0.75, structure="channels")
    m = METHODS["sapp"](cfg, _plan(model), total_steps=10)
    with torch.no_grad():
        for layer in m.layers:
            layer.masker.logits.copy_(torch.arange(layer.grid[1], dtype=torch.float32).reshape(1, -1))
    m.finish()
    for layer in m.layers:
        n = layer.grid[1]
        kept = layer.family.kept_units(0.75)  # 16 of 64, 16 of 48 (12, kept up to a multiple of 8)
        assert kept == 16 and torch.equal(layer.alive().reshape(-1), torch.arange(n) >= n - kept)
    _ = copy


def _family(kind: str, n: int):
    from sapp_compress.structure.groups import GroupFamily

    key = ("w", 0)
    return GroupFamily("f", kind, tuple({key: np.array([i])} for i in range(n)), (key,), (), ())


@pytest.mark.parametrize(("kind", "n", "sparsity", "kept"), [
    ("channels", 64, 0.6, 24), ("channels", 128, 0.6, 48), ("channels", 256, 0.6, 104),
    ("channels", 512, 0.6, 208),
    ("neurons", 3072, 0.6, 1232), ("neurons", 100, 0.5, 48),  # 50 -> 48: nearest multiple of 8
    ("channels", 64, 0.5, 32), ("channels", 96, 0.75, 24),  # already multiples: unchanged
    ("neurons", 36, 0.5, 16),  # 18 -> 16
    ("channels", 48, 0.75, 16), ("channels", 40, 0.7, 16),  # 12: a tie between 8 and 16, kept up
    # under 8, small, all: exact
    ("channels", 64, 0.95, 3), ("channels", 12, 0.5, 6), ("channels", 64, 0.0, 64),
    ("channels", 16, 0.25, 12), ("neurons", 24, 0.125, 21),  # the multiple would keep the whole family: exact
    ("heads", 12, 0.5, 6), ("heads", 64, 0.6, 26), ("conv groups", 64, 0.6, 26),  # whole slices: exact
])
def test_uniform_widths_are_kernel_friendly(kind, n, sparsity, kept):
    """A neuron or channel family of 16 units or more keeps a multiple of 8 under a uniform sparsity (ONNX
    Runtime's kernels run other widths far slower, BENCHMARKS.md 16.4); heads, small families, counts under 8
    and counts whose multiple would be the whole family are exact."""
    assert _family(kind, n).kept_units(sparsity) == kept


def test_methods_end_at_the_kernel_friendly_widths_and_allocations_are_exact():
    """The engine prunes every family to ``kept_units`` (the gradual schedules aim at it, so it is reached
    exactly); a latency-aware allocation's widths (``targets``) are kept as chosen, multiples of 8 or not."""
    model = _model()
    cfg = PruneConfig(block="8", sparsity=0.6, method="gmp", structure="channels")
    m = METHODS["gmp"](cfg, _plan(model), total_steps=20)
    for step in range(20):
        m.begin_step(step)
    m.finish()
    assert [int(layer.alive().sum()) for layer in m.layers] == [24, 16]
    m = METHODS["magnitude"](cfg, _plan(_model()), total_steps=10)
    m.targets.update({m.layers[0].name: 1 - 26 / 64})
    m.finish()
    assert [int(layer.alive().sum()) for layer in m.layers] == [26, 16]


def test_a_chained_familys_norm_counts_its_producer_rows():
    """Family "2 (neurons)" makes model[2]'s rows, whose input columns family "0 (neurons)" gates: its group
    norm still counts those rows (with its bias and its consumer columns in model[4])."""
    model = _model()
    layers = attach(_plans(model), attention=False, powerprop=False, density=0.5)
    fam = {layer.name: layer for layer in layers}["2 (neurons)"]
    w2 = model[2].parametrizations.weight.original.detach()
    b2, w4 = model[2].bias.detach(), model[4].parametrizations.weight.original.detach()
    want = (w2.pow(2).sum(1) + b2.pow(2) + w4.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(fam.norms().reshape(-1), want, rtol=1e-5, atol=1e-6)


class _SqueezeExcite(nn.Module):
    """A conv, a squeeze-excitation (pool, 1x1 conv down, 1x1 conv up, sigmoid, scale), a conv, a head: the up
    projection's rows belong to the first conv's channels while its input columns are the squeeze's units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(32, 16, 1), nn.Conv2d(16, 32, 1)
        self.out = nn.Conv2d(32, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(self.out(x * s)).mean((2, 3)))


def test_squeeze_excitation_prunes_with_the_coupled_decay():
    """The coupled l2 decays the up projection through the family that owns it although another family gates
    it (torchvision's mobilenet_v3 and efficientnet failed here with a KeyError); the pruned model is smaller
    and computes what the masked one did."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3, 8, 8)).astype(np.float32)
    shard = Shard((x,), rng.integers(0, 4, size=256).astype(np.int64), "synthetic")
    res = prune(_SqueezeExcite(), shard, PruneConfig(block="8", sparsity=0.5, method="sapp",
                                                     structure="channels"),
                TrainConfig(steps=20, batch_size=32, lr=1e-3, weight_decay=1e-2))
    m = res.model
    # 16 of 32 channels, 8 of 16 squeeze units: the rule's widths, exactly
    assert m.conv.out_channels == m.fc1.in_channels == m.fc2.out_channels == m.out.in_channels == 16
    assert m.fc1.out_channels == m.fc2.in_channels == 8
    assert res.structure.parity <= 1e-5


class _ChannelShuffle(nn.Module):
    """ShuffleNet's pattern: one conv's channels interleaved by a channel shuffle, then split between two
    convs, so the conv's output channels form two families."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        p, q = x.chunk(2, dim=1)
        return self.head(torch.cat([torch.relu(self.a(p)), torch.relu(self.b(q))], 1).mean((2, 3)))


def test_families_of_one_conv_split_by_a_shuffle_get_distinct_names_and_prune_exactly():
    """The two families a shuffle makes of one conv's channels are named apart (the engine keys its state by
    name:
    torchvision's shufflenet_v2 failed on the clash), and whatever the fine-tune keeps, the smaller model
    computes what the masked one did (the plan's removal check tries two keep sets; a removal exact for one
    only is left whole)."""
    from sapp_compress.structure.groups import discover

    torch.manual_seed(0)
    names = [f.name for f in discover(_ChannelShuffle(), (torch.randn(2, 3, 8, 8),)).families]
    assert names[:2] == ["conv #1 (channels)", "conv #2 (channels)"] and len(set(names)) == len(names)
    rng = np.random.default_rng(0)
    shard = Shard((rng.normal(size=(128, 3, 8, 8)).astype(np.float32),),
                  rng.integers(0, 4, 128).astype(np.int64), "synthetic")
    for seed in range(3):
        res = prune(_ChannelShuffle(), shard, PruneConfig(block="8", sparsity=0.5, method="sapp",
                                                          structure="channels"),
                    TrainConfig(steps=12, batch_size=32, lr=1e-3, seed=seed))
        assert res.structure.parity <= 1e-5


@pytest.mark.parametrize("zeroed", [0, 3, 9])
def test_fold_keeps_the_rules_width(zeroed):
    """A kept unit whose consumer slices ended at zero stays at the fold: a neuron family kept at the rule's
    width (24 of 64 at s = 0.6: a multiple of 8) stays 24 wide however many of its units ended at zero (it
    went to 16 with 9 of them, and VGG11 to 248 of 512 channels, off the rule); the other family (16 of 48
    kept) is untouched, and the removal computes what the masked model did."""
    model = _model()
    cfg = PruneConfig(block="8", sparsity=0.6, method="magnitude", structure="channels")
    m = METHODS["magnitude"](cfg, _plan(model), total_steps=10)
    m.finish()
    alive = np.flatnonzero(m.layers[0].alive().reshape(-1).numpy())
    assert len(alive) == 24
    # the consumer (model[2]) columns of `zeroed` kept units: zero, as if revived and unmoved
    with torch.no_grad():
        model[2].parametrizations.weight.original[:, alive[:zeroed]] = 0
    x = torch.randn(16, 32)
    with torch.no_grad():
        masked = model(x)
    keep = fold(m.layers)
    assert [int(k.sum()) for k in keep.values()] == [24, 16]
    assert keep[m.layers[0].name][alive].all()
    remove(model, [layer.family for layer in m.layers], keep)
    assert model[0].out_features == 24
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-6)


class _ShuffleBN(_ChannelShuffle):
    """The shuffle pattern with a BatchNorm after the first conv (its running statistics move on any forward
    in training mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        p, q = x.chunk(2, dim=1)
        return self.head(torch.cat([torch.relu(self.a(p)), torch.relu(self.b(q))], 1).mean((2, 3)))


@pytest.mark.parametrize("training", [False, True])
def test_removal_check_leaves_the_model_exactly_as_it_was(training):
    """The plan's removal check, family by family when the joint check fails (the shuffle's families fail it),
    leaves the model it checks exactly as it was: every parameter and buffer, BatchNorm's running statistics
    included (it zeroes and shrinks copies: a module may cache what it derives from its weights)."""
    from sapp_compress.config import BlockSpec
    from sapp_compress.structure.plan import plan_families

    torch.manual_seed(0)
    model = _ShuffleBN().train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fams, _ = plan_families(model, model, (torch.randn(4, 3, 8, 8),),
                                     PruneConfig(BlockSpec(1, 1), 0.5, structure="channels"))
    assert fams and model.training == training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])]
