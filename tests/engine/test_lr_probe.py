"""``lr="auto"``: the probe's schedules, its choice on a task where one rate is clearly best, its determinism
and its independence from the evaluation shard, the fallback, and structural families."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from calib_data.shards import Shard
from sapp_compress import PruneConfig, TrainConfig, prune
from sapp_compress.config import LRProbeConfig
from sapp_compress.engine.lr_probe.strategies import MIN_PROGRAM, STRATEGIES, halving
from sapp_compress.errors import ConfigError

RATES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def scaled_regression(seed: int = 0, n: int = 2048, d_in: int = 64, d_out: int = 16, scale: float = 1e-2,
                      noise: float = 0.3, offset: float = 1.0) -> tuple[nn.Module, Shard]:
    """A linear teacher with weights of scale ``scale`` (inputs scaled by 1 / scale, so outputs are O(1)),
    noisy targets, and a student = teacher + an offset of the same scale. Adam moves every weight by about its
    rate per step, so the rate that fits is set by ``scale``: below 1e-3 the student cannot travel the offset
    in the budget, above it the last steps' jitter (rate x input scale) stays in the outputs."""
    rng = np.random.default_rng(seed)
    w = (scale * rng.normal(size=(d_out, d_in))).astype(np.float32)
    x = (rng.normal(size=(n, d_in)) / (scale * np.sqrt(d_in))).astype(np.float32)
    y = (x @ w.T + noise * rng.normal(size=(n, d_out))).astype(np.float32)
    student = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.from_numpy(
            w + offset * scale * rng.normal(size=w.shape).astype(np.float32)))
    return student, Shard((x,), y, "scaled-regression")


CFG = PruneConfig(block="8", sparsity=0.5, method="magnitude", min_blocks=1)


#: the probe without priming (``prime=0``, its earlier budget and scoring): on the scaled regression it finds
#: the clearly best rate; the default, primed probe chooses 1e-2 there (R^2 0.443 against 1e-3's 0.469: the
#: probe's 27 steps favour the rate that travels the offset fastest once Adam's first steps no longer penalise
#: it; on trained transformers the priming is what finds their best rate, BENCHMARKS.md section 15.2)
UNPRIMED = dict(prime=0.0, budget=0.1, scoring=1.2)


def _train(lr, probe: dict | None = None, **kw) -> TrainConfig:
    return TrainConfig(steps=300, batch_size=8, lr=lr, log_every=10**9,
                       lr_probe=LRProbeConfig(candidates=RATES, **(probe or {})), **kw)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_schedules_fit_the_budget(strategy):
    make = STRATEGIES[strategy].schedule
    for n in (4, 7, 9):
        for budget in (3, 10, 29, 60, 150, 1000):
            s = make(n, budget, 1 / 3)
            if s is None:
                continue
            assert s.cost(n) <= budget and list(s.stops) == sorted(set(s.stops)) and s.stops[-1] == s.program
    assert halving(7, 20, 1 / 3) is None or halving(7, 20, 1 / 3).program >= MIN_PROGRAM
    s = halving(7, 130, 1 / 3)  # 7 candidates to r, the best 3 on to 3r: 13 r steps
    assert s.keeps == (3, 1) and s.stops == (10, 30) and s.cost(7) == 130


def test_probe_picks_the_known_best_rate():
    """On the scaled regression, fixed rates 1e-5..1e-1 score R^2 0.01 / 0.29 / 0.47 / 0.44 / 0.34 (measured
    here, seed 0): 1e-3 is clearly best, and the unprimed probe (30 steps of the 300) chooses it."""
    student, shard = scaled_regression()
    fixed = {lr: prune(student, shard, CFG, _train(lr)).metrics["pruned_torch"]["score"] for lr in RATES}
    best = max(fixed, key=fixed.get)
    assert best == 1e-3 and fixed[best] > max(v for lr, v in fixed.items() if lr != best) + 0.01, fixed
    res = prune(student, shard, CFG, _train("auto", UNPRIMED))
    assert res.lr_source == "probe" and res.lr == best
    probe = res.lr_choice.to_json()
    assert set(probe["scores"]) == {f"{lr:g}" for lr in RATES}
    assert all(len(v) >= 1 for v in probe["scores"].values())
    assert probe["probe"]["steps"] <= 30 and probe["probe"]["seconds"] > 0
    assert res.metrics["pruned_torch"]["score"] == pytest.approx(fixed[best], abs=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "sapp"])
def test_auto_is_deterministic_and_is_the_fixed_run_at_its_choice(method):
    """Two runs: the same scores and choice; and the fine-tune after the probe is, bit for bit, the one a
    fixed --lr at the chosen rate gives (the probe leaves the RNG as it found it; with SA++, which starts
    dense, the fine-tune continues from the dense check's run of its own first steps)."""
    student, shard = scaled_regression(seed=1)
    cfg = dataclasses.replace(CFG, method=method)
    a, b = (prune(student, shard, cfg, _train("auto", seed=3)) for _ in range(2))
    check = a.lr_choice.to_json()["probe"].get("dense_check")
    assert (check is not None and check["resumed"]) == (method == "sapp")
    assert a.lr_choice.scores == b.lr_choice.scores and a.lr == b.lr
    assert a.lr_choice.digest() == b.lr_choice.digest()
    fixed = prune(student, shard, cfg, _train(a.lr, seed=3))
    assert fixed.mask_digest == a.mask_digest
    assert all(np.array_equal(x.weight, y.weight) for x, y in zip(a.layers, fixed.layers))
    assert [r["loss"] for r in a.history] == [r["loss"] for r in fixed.history]


def test_probe_never_sees_the_evaluation_shard():
    """The candidates are scored on rows held out of the training shard: another evaluation shard (labels
    shuffled) changes nothing the probe measured."""
    student, shard = scaled_regression(seed=2)
    train, ev = shard.split(0.2, 0)
    shuffled = Shard(ev.inputs, ev.y[np.random.default_rng(0).permutation(len(ev))], "shuffled")
    a = prune(student, train, CFG, _train("auto"), eval_shard=ev)
    b = prune(student, train, CFG, _train("auto"), eval_shard=shuffled)
    assert a.lr_choice.digest() == b.lr_choice.digest()
    # 10 % of the 1638 training rows held out; scored: 0.6 x 24 steps x 8 rows = 115.2, half over the first
    # rung's 5 evaluations, half over the last rung's 2 (28.8 each): at least 32 an evaluation
    assert a.lr_choice.rows == {"trained": 1474, "scored": 164, "scored_per_rung": [32, 32]}


def test_too_short_a_budget_falls_back():
    student, shard = scaled_regression()
    res = prune(student, shard, CFG, dataclasses.replace(_train("auto"), steps=40))
    assert res.lr_source == "fallback" and res.lr == 1e-3
    rep = res.lr_choice.to_json()
    assert rep["source"] == "fallback" and "too few" in rep["probe"]["reason"] and rep["scores"] == {}


def test_fixed_lr_is_kept():
    student, shard = scaled_regression()
    res = prune(student, shard, CFG, dataclasses.replace(_train(2e-3), steps=20))
    assert (res.lr, res.lr_source, res.lr_choice.to_json()) == \
        (2e-3, "--lr", {"value": 2e-3, "source": "--lr"})


def test_probe_on_structural_families():
    """--structure channels: the probe runs the same engine on the families (neurons here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype(np.float32)
    shard = Shard((x,), (x[:, :4].argmax(1)).astype(np.int64), "toy")
    res = prune(model, shard, PruneConfig(block="8", sparsity=0.5, structure="channels"),
                TrainConfig(steps=200, batch_size=32, log_every=10**9))
    assert res.lr_source == "probe" and res.lr in LRProbeConfig().candidates
    assert len(res.lr_choice.scores) == 7 and res.structure is not None


@pytest.mark.parametrize("bad, message", [
    (dict(candidates=(1e-3,)), "at least 2 positive rates"),
    (dict(budget=0.0), "lr_probe.budget: expected a fraction in (0, 1)"),
    (dict(strategy="nope"), "lr_probe.strategy: expected one of"),
    (dict(dense_check=0.0), "lr_probe.dense_check: expected a share in (0, 1] or None, got 0.0"),
    (dict(dense_check=1.5), "lr_probe.dense_check: expected a share in (0, 1] or None, got 1.5"),
])
def test_bad_probe_config(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LRProbeConfig(**bad)
    with pytest.raises(ConfigError, match="lr: expected a positive number or 'auto'"):
        TrainConfig(lr="fast")


def test_ranks_with_different_scores_stop(monkeypatch):
    """Checked like the masks: ranks whose probes measured different scores raise instead of fine-tuning at
    different rates."""
    from sapp_compress.engine import distributed
    from sapp_compress.engine.lr_probe import strategies

    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(0, 2))
    monkeypatch.setattr(distributed, "gather_digests", lambda d: [d, "0" * 64])
    with pytest.raises(RuntimeError, match="the lr probe's scores differ across ranks at rung 0"):
        strategies.check_same_scores({1e-3: 0.5}, 0)


def test_scoring_rows_are_bounded_by_the_probes_training():
    """Half of the allowed rows go to the last rung's evaluations, the other half to the earlier ones; clamped
    to [MIN_SCORED, held-out rows]. The default halving over 7 candidates scores 7 then 3."""
    from sapp_compress.engine.lr_probe.strategies import MIN_SCORED, halving, scored_rows

    sched = halving(7, 29, 1.0 / 3.0)
    assert (sched.runs or 7, sched.keeps[:-1]) == (7, (3,))
    # a transformer's probe: 29 steps of 32 rows, 1.2x -> 1113.6 rows: 556.8 / 7 = 79, 556.8 / 3 = 185
    assert scored_rows(sched, 7, 1.2 * 29 * 32, 418) == (79, 185)
    assert scored_rows(sched, 7, 1e6, 418) == (418, 418)  # plenty: every held-out row at every rung
    assert scored_rows(sched, 7, 10, 418) == (MIN_SCORED, MIN_SCORED)
    assert scored_rows(sched, 7, 10, 20) == (20, 20)  # never more than are held out
    grid = halving(7, 29, 1.0 / 3.0).__class__(4, (4,), (1,))
    assert scored_rows(grid, 7, 700, 418) == (100,)


def test_rung_cycles_anneal_every_rung():
    """``anneal="rung"``: each rung is a warm-up and cosine cycle of its own, so the step before every score
    runs near zero (the default decays once, over the whole program: an early rung scores near the peak)."""
    from sapp_compress.engine.lr_probe.strategies import rung_cycle
    from sapp_compress.engine.schedules import cosine_lr

    sched = halving(7, 130, 1 / 3)  # rungs end at 10 and 30
    first, second = rung_cycle(0, 10, 0.1), rung_cycle(10, 30, 0.1)
    assert first(0) == pytest.approx(cosine_lr(0.0, 0.1)) and first(1) == pytest.approx(1.0)
    assert first(9) < 0.05 and second(29) < 0.01  # the last step of each rung: annealed
    assert second(10) < 0.6 and second(12) == pytest.approx(1.0)  # a warm restart, warm-up again
    assert cosine_lr(9 / sched.program, 0.1) > 0.85  # the default: rung 0 scores at ~90 % of the peak


def test_probe_with_rung_cycles_picks_the_known_best_rate():
    student, shard = scaled_regression()
    res = prune(student, shard, CFG, _train("auto", {**UNPRIMED, "anneal": "rung"}))
    assert res.lr == 1e-3 and res.lr_choice.to_json()["probe"]["anneal"] == "rung"
    with pytest.raises(ConfigError, match="lr_probe.anneal: expected auto|program|rung"):
        LRProbeConfig(anneal="cycle")


def test_priming_fills_the_optimizer_once_and_moves_no_weight(monkeypatch):
    """``prime``: steps at rate zero run once and are shared: every candidate starts from the same primed
    state, whose weights are the starting weights and whose Adam moments are filled; the steps count once."""
    from sapp_compress.engine.lr_probe import runner as lr_probe

    student, shard = scaled_regression()
    primed = []
    real = lr_probe.Runner._primed

    def spy(self):
        out = real(self)
        primed.append(out[2])  # (model, method, resume state)
        return out

    monkeypatch.setattr(lr_probe.Runner, "_primed", spy)
    res = prune(student, shard, CFG, _train("auto", {**UNPRIMED, "prime": 0.05}))
    state = primed[0]
    assert len(primed) == len(RATES) and all(s is state for s in primed)  # one priming, shared
    assert state["step"] == 16  # 5 % of 300 steps, and the program's first step (at warm-up's rate zero)
    weights = [v for k, v in state["model"].items() if k.endswith("original")] or [state["model"]["weight"]]
    assert torch.equal(weights[0], student.weight.detach())  # rate zero: no weight moved
    moments = [s for s in state["optimizer"]["state"].values() if "exp_avg_sq" in s]
    assert moments and all(float(s["exp_avg_sq"].abs().sum()) > 0 for s in moments)
    probe = res.lr_choice.to_json()["probe"]
    # the shared first step counts once, not once per candidate
    assert probe["steps"] == 15 + halving(len(RATES), 30, 1 / 3).cost(len(RATES)) - (len(RATES) - 1)
    # the best two rates (R^2 0.469 and 0.443; test_probe_picks_the_known_best_rate)
    assert res.lr in (1e-3, 1e-2)


def test_the_candidates_first_step_runs_once(monkeypatch):
    """With priming, the program's first step runs at warm-up's rate zero for every candidate (the same state,
    batch and RNG), so it is run once with the priming: every score is what a candidate that ran that step
    itself measures (there at a rate of ~1e-11 x its peak: equal to 1e-6), in n - 1 fewer steps."""
    from sapp_compress.engine.lr_probe import runner as lr_probe

    student, shard = scaled_regression()
    train = _train("auto", {**UNPRIMED, "prime": 0.05})
    shared = prune(student, shard, CFG, train).lr_choice
    monkeypatch.setattr(lr_probe.Runner, "warm_start", lambda self: False)
    own = prune(student, shard, CFG, train).lr_choice
    assert shared.value == own.value and shared.scores.keys() == own.scores.keys()
    for lr, s in own.scores.items():
        assert np.allclose(shared.scores[lr], s, rtol=1e-6, atol=0), lr
    assert own.steps - shared.steps == len(RATES) - 1


def test_halving_keeps_at_most_keep_plus_one_candidates_alive(monkeypatch):
    """Every candidate alive holds a copy of the model and its optimizer moments: a rung drops a candidate as
    soon as ``keep`` better ones have been scored, so at most ``keep + 1`` are alive at once (not all of
    them), and the survivors are still the rung's best."""
    from sapp_compress.engine.lr_probe import runner as lr_probe

    student, shard = scaled_regression()
    alive = []
    real = lr_probe.Runner.advance

    def spy(self, lr, stop, lr_at=None):
        loss = real(self, lr, stop, lr_at)
        alive.append(len(self.live))
        return loss

    monkeypatch.setattr(lr_probe.Runner, "advance", spy)
    res = prune(student, shard, CFG, _train("auto"))
    keep = halving(len(RATES), 24, 1 / 3).keeps[0]
    assert len(alive) > len(RATES) and max(alive) == keep + 1
    scores = res.lr_choice.scores
    first = sorted(RATES, key=lambda r: (scores[r][0], r))
    # the best of the first rung went on
    assert sorted(r for r in RATES if len(scores[r]) > 1) == sorted(first[:keep])


@pytest.mark.parametrize("method", ["sapp", "gmp"])
def test_primed_probe_over_the_whole_program_is_deterministic(method):
    """``phase="program"`` with priming: the priming runs the program's first steps at rate zero (dense phase,
    no prune yet), every candidate continues from there through the method's own program; two runs measure the
    same scores and the fine-tune after it is the fixed run at its choice."""
    student, shard = scaled_regression(seed=2)
    cfg = dataclasses.replace(CFG, method=method)
    probe = {"phase": "program", "prime": 0.05}
    a, b = (prune(student, shard, cfg, _train("auto", probe, seed=1)) for _ in range(2))
    assert a.lr_choice.source == "probe" and a.lr_choice.digest() == b.lr_choice.digest()
    assert all(len(s) >= 1 and all(np.isfinite(s)) for s in a.lr_choice.scores.values())
    assert prune(student, shard, cfg, _train(a.lr, seed=1)).mask_digest == a.mask_digest


def test_constant_loss_is_the_best_input_independent_prediction():
    """The floor the probe's scores are held against: the class prior's cross-entropy, the base rate's
    log-loss, the targets' variance, the KL to the teacher's mean distribution (0 when every row has the same
    target)."""
    from sapp_compress.engine.lr_probe.runner import constant_loss
    from sapp_compress.io.tasks import Task

    labels = torch.tensor([0, 0, 0, 1])  # prior (0.75, 0.25, 0): entropy 0.5623
    assert constant_loss(Task("classification", 3), labels) == pytest.approx(0.5623, abs=1e-4)
    y = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    assert constant_loss(Task("binary", 1), y) == pytest.approx(0.5623, abs=1e-4)
    r = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert constant_loss(Task("regression", 2), r) == pytest.approx((1 + 4) / 2, abs=1e-6)
    same = torch.tensor([[2.0, 0.0, -1.0]] * 5)
    assert constant_loss(Task("distill_classification", 3), same, 2.0) == pytest.approx(0.0, abs=1e-6)


def test_a_probe_that_cannot_beat_a_constant_says_so():
    """Labels independent of the inputs: no candidate beats the class prior on the held-out rows, so the
    report marks the probe uninformative and the run warns; a task the probe can learn (the scaled regression)
    does not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 32)).astype(np.float32)
    shard = Shard((x,), rng.integers(0, 4, size=2048).astype(np.int64), "random-labels")
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    res = prune(model, shard, CFG, _train("auto"))
    probe = res.lr_choice.to_json()["probe"]
    # the prior
    assert probe["informative"] is False and np.log(4) - 0.05 < probe["constant_loss"] <= np.log(4)
    assert res.lr_choice.scores[res.lr][-1] >= probe["constant_loss"]
    assert any("no candidate rate beat a constant prediction" in w for w in res.warnings)
    student, reg = scaled_regression()
    ok = prune(student, reg, CFG, _train("auto"))
    assert ok.lr_choice.informative and ok.lr_choice.to_json()["probe"]["informative"] is True
    assert not any("constant prediction" in w for w in ok.warnings)


def test_dense_check_vetoes_a_rate_that_wrecks_the_dense_phase(monkeypatch):
    """SA++'s program starts dense. On the scaled regression (weights of scale 1e-2) a peak rate of 1e-1 moves
    every weight by about 0.1 a step: the fine-tune's first steps at it (its warm-up and one step at the peak)
    take the held-out loss far above the start and far above what 1e-2's do, so the check vetoes it and steps
    down; 1e-3 passes as it is; the check is deterministic and counted in the probe's steps; magnitude (no
    dense phase) has none."""
    from sapp_compress.engine.lr_probe import probe

    seen: dict = {}
    real = probe.dense_check

    def spy(runner, cands, best, *rest):
        out = real(runner, cands, best, *rest)
        seen["steps"] = runner.steps
        # the same runner, while it still holds the starting weights (the fine-tune trains them afterwards)
        seen.update({lr: real(runner, cands, lr, *rest) for lr in (1e-1, 1e-3)},
                    again=real(runner, cands, 1e-1, *rest))
        return out

    monkeypatch.setattr(probe, "dense_check", spy)
    student, shard = scaled_regression()
    res = prune(student, shard, dataclasses.replace(CFG, method="sapp"), _train("auto"))
    rep = res.lr_choice.to_json()["probe"]
    assert set(rep["dense_check"]) == {"steps", "start", "bound", "ratio", "losses", "vetoed", "resumed",
                                       "seconds_reused_by_fine_tune"}
    # 5 % of 300 steps, then the peak
    assert rep["dense_check"]["steps"] == 16 and rep["dense_check"]["resumed"]
    hot, check = seen[1e-1]
    assert check.vetoed == [1e-1] and hot == 1e-2 and check.state is not None and \
        int(check.state["step"]) == 16
    assert check.losses[1e-1] > check.bound and check.losses[1e-1] > check.ratio * check.losses[1e-2], check
    assert seen["again"][1].losses == check.losses  # deterministic
    cool, check = seen[1e-3]
    assert cool == 1e-3 and check.vetoed == [] and check.losses[1e-3] <= check.bound
    monkeypatch.setattr(probe, "dense_check", real)
    off = prune(student, shard, dataclasses.replace(CFG, method="sapp"),
                _train("auto", {"dense_check": None}))
    assert "dense_check" not in off.lr_choice.to_json()["probe"]
    assert seen["steps"] == off.lr_choice.steps + \
        rep["dense_check"]["steps"] * len(rep["dense_check"]["losses"])
    mag = prune(student, shard, CFG, _train("auto"))
    assert "dense_check" not in mag.lr_choice.to_json()["probe"]


def _bn_mlp(seed: int = 0, n: int = 1024) -> tuple[nn.Module, Shard]:
    """A regression by an MLP with a BatchNorm between its layers, its running statistics those of its
    inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 4, generator=g))
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    model.train()
    with torch.no_grad():
        model(x)  # running statistics from the data (momentum 0.1, one batch)
    return model.eval(), Shard((x.numpy(),), y.numpy(), "bn-mlp")


def test_candidates_are_scored_by_batch_statistics():
    """``batch_stats``: BatchNorm normalises each held-out chunk by its own statistics when a candidate is
    scored, so the running statistics a model arrives with (after a one-shot prune they describe the dense
    model) change no score, bit for bit; scored by them (``batch_stats=False``) they do. A model without
    BatchNorm scores the same either way."""
    import copy

    model, shard = _bn_mlp()
    stale = copy.deepcopy(model)
    stale[1].running_mean += 3.0
    stale[1].running_var *= 20.0
    by_batch = [prune(m, shard, CFG, _train("auto", {"batch_stats": True})).lr_choice for m in (model, stale)]
    assert by_batch[0].source == "probe" and by_batch[0].digest() == by_batch[1].digest()
    by_running = [prune(m, shard, CFG, _train("auto", {"batch_stats": False})).lr_choice
                  for m in (model, stale)]
    assert by_running[0].digest() != by_running[1].digest()
    assert by_running[0].digest() != by_batch[0].digest()
    student, data = scaled_regression()
    same = [prune(student, data, CFG, _train("auto", {"batch_stats": b})).lr_choice.digest()
            for b in (True, False)]
    assert same[0] == same[1]


@pytest.mark.parametrize("method", ["magnitude", "sapp"])
def test_a_shard_too_small_to_hold_two_rows_out_falls_back(method):
    """A probe scored on one held-out row measures nothing, and BatchNorm has no batch statistics of one row
    (the dense check's scoring and magnitude's raised there, before the fine-tune): a 12-row shard (10
    training rows after the evaluation split, 1 of them held out) falls back with the reason; 20 rows (2 held
    out) are probed, batch statistics and all."""
    model, _ = _bn_mlp()
    cfg, train = dataclasses.replace(CFG, method=method), dataclasses.replace(_train("auto"), batch_size=4)
    small, enough = (prune(model, _bn_mlp(n=n)[1], cfg, train).lr_choice for n in (12, 20))
    assert small.source == "fallback" and small.reason == "10 training rows are too few to hold 2 out (10%)"
    assert enough.source == "probe" and enough.rows["scored"] == 2


def test_only_a_prune_at_step_0_then_sparse_is_the_whole_program():
    """Of the registered methods only magnitude's program (one prune at step 0, then sparse to the end) is
    what a probe candidate runs in phase ``sparse``; every method with a dense phase first is not, nor is any
    method under ``phase="program"`` (the default's settings differ only where this holds)."""
    from sapp_compress.engine.lr_probe.runner import runs_whole_program
    from sapp_compress.engine.methods import METHODS
    from sapp_compress.granularity import BLOCKS, Plan

    programs = {name: cls(dataclasses.replace(CFG, method=name), Plan(BLOCKS), 100).phases
                for name, cls in METHODS.items()}
    assert {name for name, ph in programs.items() if runs_whole_program(ph, "sparse")} == {"magnitude"}
    assert not any(runs_whole_program(ph, "program") for ph in programs.values())


@pytest.mark.parametrize("method, phase, anneal", [("magnitude", "sparse", "rung"),
                                                   ("sapp", "sparse", "program"),
                                                   ("magnitude", "program", "program")])
def test_auto_anneals_every_rung_where_the_probe_is_the_whole_program(method, phase, anneal):
    """``anneal="auto"`` (the default): where a candidate is the fine-tune in miniature (phase ``sparse`` and
    magnitude's program, one prune at step 0 then sparse), every rung anneals; SA++ (dense and sparsify phases
    first), or the compressed whole program, keep one anneal over the program. BatchNorm scores by batch
    statistics either way (the default). The default measures exactly what the explicit setting measures, bit
    for bit, and the report names it."""
    model, shard = _bn_mlp()
    cfg = dataclasses.replace(CFG, method=method)
    auto = prune(model, shard, cfg, _train("auto", {"phase": phase})).lr_choice
    explicit, other = (prune(model, shard, cfg, _train("auto", {"phase": phase, "anneal": a})).lr_choice
                       for a in (anneal, "program" if anneal == "rung" else "rung"))
    assert auto.source == "probe" and (auto.anneal, auto.batch_stats) == (anneal, True)
    assert auto.digest() == explicit.digest() != other.digest()
    probe = auto.to_json()["probe"]
    assert (probe["anneal"], probe["batch_stats"]) == (anneal, True)
    with pytest.raises(ConfigError, match="lr_probe.batch_stats: expected true or false"):
        LRProbeConfig(batch_stats="yes")
