"""Contract tests, run against every registered method."""
import numpy as np
import pytest
import torch
from torch import nn

from calib_data.shards import Shard
from sapp_compress import PruneConfig, TrainConfig, prune
from sapp_compress.blocks.geometry import plan_layers
from sapp_compress.blocks.masks import attach, fold
from sapp_compress.engine.methods import METHODS, select_top_k
from sapp_compress.granularity import BLOCKS, Plan
from sapp_compress.io.reparametrizations import is_parametrized


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _shard(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = (x[:, :10].argmax(1)).astype(np.int64)
    return Shard(inputs=(x,), y=y, source="synthetic")


@pytest.mark.parametrize("balanced", [False, True], ids=["free", "balanced"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_exact_kept_counts_and_zero_blocks(method, balanced):
    cfg = PruneConfig(block="8", sparsity=0.8, method=method, balanced=balanced)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    res = prune(model, _shard(), cfg, TrainConfig(steps=40, batch_size=32, lr=1e-3))
    # the input model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not is_parametrized(res.model)
    names = [lb.name for lb in res.layers]
    assert names == ["0.weight", "2.weight"]
    assert {s.name: s.reason for s in res.skipped}["4.weight"].startswith("block 8x8 does not divide")
    for lb in res.layers:
        R, C = lb.kept.shape
        if balanced:
            assert (lb.kept.sum(axis=1) == round(0.2 * C)).all()
        else:
            assert lb.n_kept == round(0.2 * R * C)
        w = dict(res.model.named_parameters())[lb.name].detach().numpy()
        blocks = w.reshape(R, 8, C, 8)
        dead = ~lb.kept
        assert (blocks.transpose(0, 2, 1, 3)[dead] == 0.0).all()          # pruned blocks exactly zero
        assert not np.signbit(blocks.transpose(0, 2, 1, 3)[dead]).any()   # and +0.0
        assert (np.abs(blocks.transpose(0, 2, 1, 3)[lb.kept]).sum(axis=(1, 2)) > 0).all()
        np.testing.assert_array_equal(lb.weight, w)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_folded_model_computes_what_the_masked_model_did(method):
    cfg = PruneConfig(block="8", sparsity=0.6, method=method)
    model = _model()
    plans, _ = plan_layers(model, cfg)
    m = METHODS[method](cfg, Plan(BLOCKS, plans), total_steps=10)
    with torch.no_grad():
        for layer in m.layers:  # a trained-looking state: random logits, a random mask
            if layer.masker.logits is not None:
                layer.masker.logits.normal_()
    m.finish()
    x = torch.randn(32, 64)
    with torch.no_grad():
        masked = model(x)
    fold(m.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=0, atol=0)


def test_sapp_at_initialisation_is_identity():
    model = _model()
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = model(x)
    cfg = PruneConfig(block="8", sparsity=0.8)
    plans, _ = plan_layers(model, cfg)
    layers = attach(plans, attention=True, powerprop=False, density=cfg.density)
    assert all(torch.equal(l.masker.attention(), torch.ones(l.view.grid)) for l in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_powerprop_reparametrization_leaves_weights_unchanged():
    model = _model()
    w0 = model[0].weight.detach().clone()
    plans, _ = plan_layers(model, PruneConfig(block="8", sparsity=0.8))
    attach(plans, attention=False, powerprop=True, density=0.2)
    torch.testing.assert_close(model[0].weight, w0, rtol=1e-5, atol=1e-6)


def test_attention_is_clipped_to_density_range():
    model = _model()
    plans, _ = plan_layers(model, PruneConfig(block="8", sparsity=0.75))
    layer = attach(plans, attention=True, powerprop=False, density=0.25)[0]
    with torch.no_grad():
        layer.masker.logits.normal_(std=10.0)
    a = layer.masker.attention()
    assert a.min() >= 0.25 - 1e-6 and a.max() <= 4.0 + 1e-6


def test_select_top_k_ties_monotone_and_rows():
    score = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    tie = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    alive = torch.ones(2, 4, dtype=torch.bool)
    keep = select_top_k(score, tie, alive, 2, per_row=True)
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False]]
    alive[0, 1] = False
    keep = select_top_k(score, tie, alive, 3, per_row=False)
    assert keep.sum() == 3 and not keep[0, 1]


def _sapp(options, steps=600):
    model = _model()
    cfg = PruneConfig(block="8", sparsity=0.75, method="sapp", method_options=options)
    plans, _ = plan_layers(model, cfg)
    return METHODS["sapp"](cfg, Plan(BLOCKS, plans), steps)


def test_sapp_logit_rate_follows_the_budget_unless_given():
    # default: the logits can travel logit_travel (4) nats at peak rate over the budget, never slower than lr
    assert _sapp({}, steps=600).logit_lr_scale(1e-3) == pytest.approx(4 / (1e-3 * 600))
    assert _sapp({}, steps=300).logit_lr_scale(5e-4) == pytest.approx(4 / (5e-4 * 300))
    assert _sapp({}, steps=100_000).logit_lr_scale(1e-2) == 1.0
    assert _sapp({"logit_travel": 4.0}, steps=400).logit_lr_scale(1e-3) == pytest.approx(10.0)
    assert _sapp({"logit_lr": 1.0}, steps=600).logit_lr_scale(1e-3) == 1.0  # the paper's setting
    assert METHODS["gmp"](PruneConfig(block="8", sparsity=0.75, method="gmp"),
                          Plan(BLOCKS, plan_layers(_model(), PruneConfig(block="8", sparsity=0.75))[0]),
                          600).logit_lr_scale(1e-3) == 1.0


@pytest.mark.parametrize("options, message", [
    ({"logit_lr": 0.0}, "logit_lr: expected a positive multiple of lr, got 0.0"),
    ({"logit_travel": -1.0}, "logit_travel: expected a positive number, got -1.0"),
    ({"score": "norm"}, "score: expected attention|effective, got 'norm'"),
    ({"logit_norm": "global"}, "logit_norm: expected layer|element, got 'global'"),
])
def test_sapp_rejects_bad_logit_options(options, message):
    from sapp_compress.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        _sapp(options)


def test_sapp_effective_score_outranks_a_near_zero_block_with_a_high_logit():
    # A block revived as zeros whose logit was pushed up (the failure plain Adam on the logits invites): by
    # attention (the default) it ranks first; by effective norm A_b * ||W_b|| it ranks last.
    attn, eff = _sapp({}), _sapp({"score": "effective"})
    for m in (attn, eff):
        layer = m.layers[0]
        with torch.no_grad():
            layer.original.copy_(torch.ones_like(layer.original))
            layer.original[:8, :8] = 1e-4  # block (0, 0): near zero
            layer.masker.logits.zero_()
            layer.masker.logits[0, 0] = 2.0
    a, e = attn.scores(attn.layers[0]), eff.scores(eff.layers[0])
    assert a.flatten().argmax() == 0
    assert e.flatten().argmin() == 0
    # elsewhere the effective score is the block's norm times its (equal) attention
    torch.testing.assert_close(e[1:, 1:],
                               torch.full_like(e[1:, 1:], 8.0) * eff.layers[0].masker.attention()[1:, 1:])


def test_logit_adam_normalises_per_tensor_and_keeps_gradient_ratios():
    from sapp_compress.engine.training import LogitAdam, reset_optimizer_state

    def first_step(tensorwise):
        p = nn.Parameter(torch.zeros(4))
        q = nn.Parameter(torch.zeros(4))  # an ordinary Adam group beside it
        opt = LogitAdam([{"params": [p], "tensorwise": tensorwise}, {"params": [q]}], lr=0.1, eps=1e-12)
        g = torch.tensor([1.0, 0.5, 0.01, -1.0])
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        return p.detach().clone(), q.detach().clone(), opt, p, g

    p_layer, q, opt, p, g = first_step(True)
    # one bias-corrected step: -lr * g / sqrt(mean(g^2)) -- the ratios of the gradients survive
    torch.testing.assert_close(p_layer, -0.1 * g / g.pow(2).mean().sqrt())
    # plain Adam's first step is -lr * sign(g) for every element (the ordinary group, and tensorwise=False)
    torch.testing.assert_close(q, -0.1 * torch.sign(g))
    p_elem, _, _, _, _ = first_step(False)
    torch.testing.assert_close(p_elem, -0.1 * torch.sign(g))
    # a reset makes the next step a first step again; the state survives a state_dict round trip
    reset_optimizer_state(opt)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach() - before, -0.1 * g / g.pow(2).mean().sqrt())
    clone = LogitAdam([{"params": [nn.Parameter(torch.zeros(4))], "tensorwise": True},
                       {"params": [nn.Parameter(torch.zeros(4))]}], lr=0.1)
    clone.load_state_dict(opt.state_dict())
    st = clone.state[clone.param_groups[0]["params"][0]]
    assert float(st["step"]) == 1.0 and st["exp_avg_sq"].dim() == 0
