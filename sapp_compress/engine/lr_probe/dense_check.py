"""The dense-phase check of the probe's winner (:attr:`~sapp_compress.config.LRProbeConfig.dense_check`).

The candidates train in the final sparse phase, so they cannot see what a rate does to a method's *dense*
phase, where SA++, GMP, ACDC and Powerprop start: a rate can recover the pruned model fastest and still wreck
the dense model in the first steps (BENCHMARKS.md section 15.5). So for such a method the fine-tune's own
first steps (its warm-up and one step at the peak) are run at the winner on a copy (:func:`dense_check`), and
the winner is vetoed, for the next lower candidate, when that loses more than ``dense_check`` of the model's
held-out advantage over a constant prediction and ends more than ``dense_ratio`` times above the next lower
rate's loss. The fine-tune continues from the run of the rate chosen (bit for bit the fixed-rate run's first
steps), so a check that passes costs the probe no steps.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from .runner import Runner, constant_loss
from .strategies import MIN_PROGRAM, check_same_scores

log = logging.getLogger(__name__)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass
class DenseCheck:
    """The dense-phase check of the probe's winner (:attr:`LRProbeConfig.dense_check`): the held-out loss of
    the starting weights (``start``) and of each rate checked after the fine-tune's first ``steps`` steps at
    it, against ``bound`` and ``ratio`` times the next lower rate's (:func:`dense_check`). ``state`` is the
    chosen rate's run at ``steps``, which the fine-tune continues from (``resumed``), so a check that passes
    costs no steps: ``reused_seconds`` of the probe's time were the fine-tune's."""

    steps: int
    start: float
    bound: float
    ratio: float
    losses: dict[float, float]
    vetoed: list[float]
    state: dict | None = None
    run_seconds: dict[float, tuple[float, float]] = field(default_factory=dict)
    resumed: bool = False

    @property
    def reused_seconds(self) -> tuple[float, float]:
        """(wall, CPU) seconds of the run the fine-tune continued from (0 when it did not)."""
        if not self.resumed:
            return 0.0, 0.0
        return self.run_seconds.get(self.chosen, (0.0, 0.0))

    @property
    def chosen(self) -> float:
        """The first rate checked that was not vetoed (rates are checked from the winner down)."""
        return next(lr for lr in self.losses if lr not in self.vetoed)

    def to_json(self) -> dict:
        out = {"steps": self.steps, "start": _finite(self.start), "bound": _finite(self.bound),
               "ratio": self.ratio, "losses": {f"{lr:g}": _finite(v) for lr, v in self.losses.items()},
               "vetoed": [f"{lr:g}" for lr in self.vetoed], "resumed": self.resumed}
        if self.resumed:
            out["seconds_reused_by_fine_tune"] = round(self.reused_seconds[0], 3)
        return out


def dense_check(runner: Runner, cands: list[float], best: float, total_steps: int, share: float,
                ratio: float) -> tuple[float, DenseCheck | None]:
    """Veto a winner that wrecks the method's dense phase; (the rate, the check), or (``best``, None) for a
    method that does not start dense.

    From ``best`` down the candidates, each rate runs the fine-tune's own first steps, its warm-up and one
    step at the peak (:meth:`Runner.dense_run`). A rate whose held-out loss then stays within
    ``start + share * max(0, constant - start)`` is the fine-tune's, and the fine-tune continues from that
    run; one above it is vetoed only if it also ends above ``ratio`` times the next lower rate's loss: where
    every rate loses about as much, the loss is the task's noise at a hot rate, not a destroyed model
    (BENCHMARKS.md 15.5). The probe's candidates train in the final sparse phase, where a rate that destroys a
    trained model's dense function can still recover the pruned one fastest."""
    warm = math.ceil(runner.fine_tune_cfg.warmup * total_steps) + 1
    steps = min(max(warm, MIN_PROGRAM), runner.dense_steps(total_steps), total_steps - 1)
    if steps < 1:
        return best, None
    n = runner.rows or len(runner.held)
    floor = constant_loss(runner.task, runner._targets(n)[:n], runner.train_cfg.distill_temperature)
    check = DenseCheck(steps, math.nan, math.nan, ratio, {}, [])
    states: dict[float, dict] = {}
    order = sorted((c for c in cands if c <= best), reverse=True)

    def loss(lr: float) -> float:
        if lr not in check.losses:
            start, check.losses[lr], states[lr], wall, cpu = runner.dense_run(lr, steps, total_steps)
            check.run_seconds[lr] = (wall, cpu)
            if math.isnan(check.start):
                check.start = start
                check.bound = start + share * max(0.0, floor - start)
            log.info("lr probe: dense check, lr %g: held-out loss %.5g after the fine-tune's first %d steps "
                     "(bound %.5g)", lr, check.losses[lr], steps, check.bound)
        return check.losses[lr]

    for i, lr in enumerate(order):  # the lowest rate is never vetoed: nothing lower to hold it against
        if loss(lr) <= check.bound or i + 1 == len(order) or loss(lr) <= ratio * loss(order[i + 1]):
            break
        check.vetoed.append(lr)
    check.state = states[check.chosen]
    check_same_scores(check.losses, -1)
    return check.chosen, check


__all__ = ["DenseCheck", "dense_check"]
