"""``--lr auto``: the fine-tune's peak learning rate, chosen by measuring it on the training shard.

The probe holds out a few rows of the *training* shard (``LRProbeConfig.held_out``, at most ``max_rows``; the
evaluation shard is never seen), and fine-tunes copies of the model on the other rows at each candidate rate,
every copy from the same starting weights, on the same mini-batches, with the RNG in the same state
(:class:`~.runner.Runner`). A copy runs the chosen method as the fine-tune does (its parametrizations, SA++'s
logits and their rate rule, the coupled l2, warm-up and cosine decay over the probe's ``program`` steps); with
``phase="sparse"`` (the default) the method first prunes to the target at once by its own scores and the copy
trains in the method's final sparse phase (masks fixed); ``phase="program"`` compresses the method's whole
program into the probe's steps instead. ``LRProbeConfig.prime`` of the fine-tune's steps run once at rate zero
before the copies branch (Adam's moments filled, no weight moved), so a copy's first steps are not Adam's
first steps at its peak rate. Where a copy *is* the fine-tune in miniature
(:func:`~.runner.runs_whole_program`: magnitude), every rung anneals as its own cycle (``anneal="auto"``);
BatchNorm layers score by batch statistics (``batch_stats``).

A copy's score is the task's loss on the held-out rows (lower is better); the winner's rate is the
fine-tune's, after the dense-phase check (:mod:`.dense_check`) for a method that starts dense. The winner's
last score is held against the best constant prediction's loss on the same rows: when no candidate beats it
the probe could not tell the rates apart, which the report (``informative``) and a warning say. The candidates
share one budget of ``budget * T`` optimizer steps for a fine-tune of ``T`` steps, spent by a strategy
(:mod:`.strategies`).

Under ``torchrun`` every rank runs the same probe and the ranks' scores are compared after each rung. The
probe leaves the global RNG as it found it, so ``lr="auto"`` gives exactly the model a fixed ``lr`` at the
chosen rate gives. BENCHMARKS.md section 15 measures every choice here against the best fixed rate.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from calib_data.shards import Shard

from ...config import LRProbeConfig, PruneConfig, TrainConfig
from ...io.tasks import Task
from .dense_check import DenseCheck, dense_check
from .runner import Runner, constant_loss, runs_whole_program
from .strategies import STRATEGIES, scored_rows

log = logging.getLogger(__name__)

#: the fewest held-out rows the probe scores on: one row is no measurement, and BatchNorm's batch statistics
#: (how the candidates and the dense check are scored) need two (a single row raised in the probe, before the
#: fine-tune)
MIN_HELD = 2



@dataclass
class ProbeResult:
    """What the probe measured. ``scores[rate]`` is the held-out loss at each rung the rate reached."""

    value: float
    source: str  # "probe" or "fallback"
    strategy: str
    scores: dict[float, list[float]] = field(default_factory=dict)
    program: int = 0
    stops: tuple[int, ...] = ()
    steps: int = 0
    seconds: float = 0.0
    rows: dict = field(default_factory=dict)
    reason: str = ""
    cpu_seconds: float = 0.0
    fine_tune_seconds: float | None = None
    fine_tune_cpu_seconds: float | None = None
    anneal: str = "program"
    #: whether the candidates were scored with BatchNorm's batch statistics
    #: (:attr:`LRProbeConfig.batch_stats`)
    batch_stats: bool = False
    #: the held-out loss of the best constant prediction on the rows the last rung scored
    #: (:func:`constant_loss`)
    constant_loss: float | None = None
    #: the winner's dense-phase check (:func:`dense_check`; None: not run, or the method does not start dense)
    dense: DenseCheck | None = None

    @property
    def informative(self) -> bool:
        """Whether the chosen rate's last score beats a constant prediction: when no candidate does, the
        probe's steps could not tell the rates apart (on a CNN with 90 % of its blocks pruned at once, every
        rate's held-out loss was still above chance: BENCHMARKS.md section 15.3) and its choice is a guess."""
        if self.source != "probe" or self.constant_loss is None or self.value not in self.scores:
            return True
        return self.scores[self.value][-1] < self.constant_loss

    @property
    def candidate_steps(self) -> int:
        """The steps that measured the candidates (priming included), without the dense check's."""
        return self.steps - (self.dense.steps * len(self.dense.losses) if self.dense is not None else 0)

    def to_json(self) -> dict:
        """The report's ``lr`` entry (``value``, ``source``, ``scores`` per candidate, ``probe`` details)."""
        if self.source == "--lr":
            return {"value": self.value, "source": self.source}
        out = {"value": self.value, "source": self.source,
               "scores": {f"{lr:g}": [_finite(v) for v in s] for lr, s in self.scores.items()}}
        probe = {"strategy": self.strategy, "anneal": self.anneal, "batch_stats": self.batch_stats,
                 "metric": "held-out loss (lower is better), one per rung reached",
                 "program_steps": self.program, "rungs": list(self.stops), "steps": self.steps,
                 "seconds": round(self.seconds, 3), "rows": self.rows}
        if self.constant_loss is not None:
            probe["constant_loss"] = _finite(self.constant_loss)
            probe["informative"] = self.informative
        if self.dense is not None:
            probe["dense_check"] = self.dense.to_json()
        wall, cpu = self.dense.reused_seconds if self.dense is not None else (0.0, 0.0)
        if self.fine_tune_seconds:
            # the dense check's run the fine-tune continued from counts as the fine-tune's
            probe["fine_tune_seconds"] = round(self.fine_tune_seconds + wall, 3)
            probe["fraction_of_fine_tune"] = round((self.seconds - wall) / (self.fine_tune_seconds + wall), 4)
        if self.fine_tune_cpu_seconds:
            # process CPU time: the same ratio, unmoved by other jobs on the machine
            probe["cpu_fraction_of_fine_tune"] = round(
                (self.cpu_seconds - cpu) / (self.fine_tune_cpu_seconds + cpu), 4)
        if self.reason:
            probe["reason"] = self.reason
        out["probe"] = probe
        return out


    def digest(self) -> str:
        """sha256 of the choice, every score and the dense check's losses: equal digests, the same
        measurements (compared across ranks)."""
        body = [self.value, self.source, sorted((lr, [repr(v) for v in s]) for lr, s in self.scores.items())]
        if self.dense is not None:  # the dense check's measurements too (a method that starts dense)
            body.append(sorted((lr, repr(v)) for lr, v in self.dense.losses.items()))
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def probe_split(train: Shard, cfg: LRProbeConfig, seed: int) -> tuple[Shard, Shard] | None:
    """(rows the candidates train on, rows they are scored on): ``held_out`` of the shard, at most
    ``max_rows``; None when the shard is too small to hold :data:`MIN_HELD` out."""
    n = len(train)
    k = min(int(round(cfg.held_out * n)), cfg.max_rows)
    if k < MIN_HELD or n - k < 1:
        return None
    return train.split(k / n, seed + 1)


def choose_lr(student: nn.Module, plan, teacher: nn.Module | None, task: Task, train: Shard,
              prune_cfg: PruneConfig, train_cfg: TrainConfig, device: torch.device,
              total_steps: int, progress=None) -> ProbeResult:
    """The fine-tune's peak rate: ``train_cfg.lr`` when it is a number (source ``--lr``), else
    :func:`probe_lr`'s."""
    if train_cfg.lr != "auto":
        return ProbeResult(float(train_cfg.lr), "--lr", "")
    return probe_lr(student, plan, teacher, task, train, prune_cfg, train_cfg, device, total_steps, progress)


def probe_lr(student: nn.Module, plan, teacher: nn.Module | None, task: Task, train: Shard,
             prune_cfg: PruneConfig, train_cfg: TrainConfig, device: torch.device,
             total_steps: int, progress=None) -> ProbeResult:
    """Choose the peak learning rate of a fine-tune of ``total_steps`` steps (see the module's docstring).

    ``student`` and ``plan`` are the model and its planned units (:class:`~sapp_compress.granularity.Plan`)
    before the method is attached;
    they are copied, never changed. The global RNG states are restored when it returns."""
    cfg = train_cfg.lr_probe
    # torch's first optimizer imports torch._dynamo (about 1.5 s, once per process), which the fine-tune would
    # pay otherwise: paid here, outside the probe's timing
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    t0, c0 = time.perf_counter(), time.process_time()
    cands = sorted(cfg.candidates)
    budget = int(cfg.budget * total_steps)
    sched = STRATEGIES[cfg.strategy].schedule(len(cands), budget, cfg.keep)
    split = probe_split(train, cfg, train_cfg.seed)
    if sched is None or split is None:
        why = (f"a fine-tune of {total_steps} steps leaves the probe {budget} steps ({cfg.budget:.0%}), too "
               f"few for {len(cands)} candidates" if sched is None
               else f"{len(train)} training rows are too few to hold {MIN_HELD} out ({cfg.held_out:.0%})")
        log.info("lr probe skipped: %s; lr %g", why, cfg.fallback)
        return ProbeResult(cfg.fallback, "fallback", cfg.strategy, reason=why)
    fit, held = split
    runner = Runner(student, plan, teacher, task, fit, held, prune_cfg, train_cfg, device, sched.program,
                     int(round(cfg.prime * total_steps)), branches=sched.runs or len(cands))
    runner.rows_per_rung = scored_rows(sched, len(cands), cfg.scoring * budget * train_cfg.batch_size,
                                       len(held))
    runner.train = train
    runner.progress = progress  # a step event after each candidate's run (the probe's steps so far)
    runner.expected = sched.cost(sched.runs or len(cands)) + runner.shared
    runner.rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        best, scores = STRATEGIES[cfg.strategy].run(runner, cands, sched)
        check = None
        if cfg.dense_check is not None:
            best, check = dense_check(runner, cands, best, total_steps, cfg.dense_check, cfg.dense_ratio)
    floor = None
    if cfg.strategy != "range":  # the staircase scores one run, not candidates side by side
        n = min(len(held), runner.rows_per_rung[-1])
        floor = constant_loss(task, runner._targets(n)[:n], train_cfg.distill_temperature)
    res = ProbeResult(best, "probe", cfg.strategy, scores, sched.program, sched.stops, runner.steps,
                      time.perf_counter() - t0,
                      {"trained": len(fit), "scored": len(held),
                       "scored_per_rung": list(runner.rows_per_rung)},
                      cpu_seconds=time.process_time() - c0, anneal=runner.anneal,
                      batch_stats=runner.batch_stats, constant_loss=floor, dense=check)
    log.info("lr probe: %g (%d steps, %.1fs)", best, runner.steps, res.seconds)
    return res


__all__ = ["MIN_HELD", "ProbeResult", "choose_lr", "probe_lr", "probe_split", "runs_whole_program"]
