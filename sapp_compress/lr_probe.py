"""``--lr auto``: the fine-tune's peak learning rate, chosen by measuring it on the training shard.

The probe holds out a few rows of the *training* shard (``LRProbeConfig.held_out``, at most ``max_rows``; the
evaluation shard is never seen), and fine-tunes copies of the model on the other rows at each candidate rate
(half-decades from 1e-5 to 1e-2), every copy from the same starting weights, on the same mini-batches, with the
RNG in the same state. A copy runs the chosen method as the fine-tune does (its parametrizations, SA++'s
logits and their rate rule, the coupled l2, warm-up and cosine decay over the probe's ``program`` steps); with
``phase="sparse"`` (the default) the method first prunes to the target sparsity at once by its own scores and
the copy trains in the method's final sparse phase (masks fixed), so what is measured is how well each rate
recovers the pruned model; ``phase="program"`` compresses the method's whole program (dense, sparsify, sparse,
..., final sparse) into the probe's steps instead. Before the copies branch, ``LRProbeConfig.prime`` of the
fine-tune's steps run once at rate zero from the starting weights, with the program's first step, which every
copy's warm-up runs at rate zero too, and every copy starts from that state (Adam's moments filled, no weight
moved): a copy's first steps are then not Adam's first steps at its peak rate, which move every weight by about
the rate and ranked every rate above 3e-4 last on a trained transformer (BENCHMARKS.md section 15.2).

Where a copy *is* the fine-tune in miniature (``phase="sparse"`` and a method that prunes once at step 0 and then
trains sparse: magnitude; :func:`runs_whole_program`), every rung is by default (``anneal="auto"``) its own warm-up
and cosine cycle, so each score is taken with the rate annealed, as the fine-tune's final model is; this lets
higher rates win, which such a method wants (BENCHMARKS.md section 15.10: magnitude's best fixed rate on the digits
MLP and stdlib_bert), and which a method with a dense and a sparsify phase before its final sparse phase (SA++, GMP,
ACDC, Powerprop) does not always survive (15.4): for those the rate anneals over the whole program (an early rung
scores a copy near its peak rate). BatchNorm layers score every copy by batch statistics (``batch_stats``), not
running ones left stale by the one-shot prune (15.9, 15.11). A copy's score is the task's loss on the held-out rows
(lower is better; the first rows of the held-out ones, as many as ``LRProbeConfig.scoring`` allows at that rung,
every candidate of a rung on the same rows); the winner's rate is the fine-tune's. The winner's last score is also
held against the best constant prediction's loss on the same rows (:func:`constant_loss`): when no candidate beats it
the probe could not tell the rates apart, which the report (``informative``) and a warning say.

The candidates train in the final sparse phase, so they cannot see what a rate does to a method's *dense* phase,
where SA++, GMP, ACDC and Powerprop start: on the trained stdlib_bert 1e-2 recovers the pruned model as fast as any
rate, and wrecks the dense model in SA++'s first steps (training loss 0.008 to 3.4 by the end of the warm-up; the
fine-tune ends at chance). So for such a method the fine-tune's own first steps (its warm-up and one step at the
peak) are run at the winner on a copy (:func:`dense_check`), and the winner is vetoed, for the next lower candidate,
when that loses more than ``LRProbeConfig.dense_check`` of the model's held-out advantage over a constant
prediction and ends more than ``LRProbeConfig.dense_ratio`` times above the next lower rate's loss. The fine-tune
continues from the run of the rate chosen (bit for bit the fixed-rate run's first steps), so a check that passes
costs the probe no steps.

The candidates share one budget of ``budget * T`` optimizer steps for a fine-tune of ``T`` steps, spent by a
:data:`STRATEGIES` entry: a pure function of (candidates, budget) giving the program length and the *rungs*, and
the loop that runs them:

- ``halving`` (successive halving, the default): every candidate runs the first ``r`` steps of the program and
  is scored; the best ``ceil(keep * n)`` continue (from where they stopped: in-memory checkpoints) to ``r / keep``
  steps, and so on until one is left. With 7 candidates and ``keep = 1/3`` the cost is ``7 r + 3 (3 r - r) = 13 r``
  steps and the last rung scores 3 candidates at a horizon of ``3 r``, against ``budget / 7`` for a grid;
- ``grid``: every candidate runs the whole program of ``budget / n`` steps;
- ``range`` (an LR range test): one copy climbs a staircase of the candidates, lowest first, ``budget / n`` steps
  each; the stair that lowered the held-out loss most wins.

BENCHMARKS.md section 15 measures them against the best fixed rate; a probe sees ``budget / T`` of the fine-tune,
so on short fine-tunes it cannot see what a rate does after the first tens of steps (section 15 shows where that
costs). Under ``torchrun`` every rank runs the same probe (each its slice of every global batch, as in the
fine-tune) and the ranks' scores are compared after each rung, as the masks are: ranks that disagree stop the run
instead of fine-tuning at different rates. The probe leaves the global RNG as it found it, so ``lr="auto"`` gives
exactly the model a fixed ``lr`` at the chosen rate gives.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from calib_data.shards import IGNORE_INDEX, Shard

from . import distributed
from .config import LRProbeConfig, PruneConfig, TrainConfig
from .methods import METHODS
from .schedules import cosine_lr
from .tasks import Task
from .training import fine_tune, to_tensors

log = logging.getLogger(__name__)

#: the fewest held-out rows an evaluation scores (:attr:`LRProbeConfig.scoring`)
MIN_SCORED = 32

#: the fewest held-out rows the probe scores on: one row is no measurement, and BatchNorm's batch statistics (how the
#: candidates and the dense check are scored) need two (a single row raised in the probe, before the fine-tune)
MIN_HELD = 2

#: the shortest compressed program worth measuring (a dense step, a prune, a sparse step, ...); a budget that
#: cannot give the last rung this many steps falls back to ``LRProbeConfig.fallback``
MIN_PROGRAM = 4


# ----------------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    """How a probe spends its budget: each candidate's program is ``program`` steps long; rung ``i`` runs the
    survivors to step ``stops[i]`` of it, scores them, and keeps the best ``keeps[i]``."""

    program: int
    stops: tuple[int, ...]
    keeps: tuple[int, ...]
    runs: int | None = None  # runs at the first rung (None: one per candidate)

    def cost(self, n: int) -> int:
        """Optimizer steps spent with ``n`` candidates."""
        alive, done, total = self.runs or n, 0, 0
        for stop, keep in zip(self.stops, self.keeps):
            total += alive * (stop - done)
            alive, done = keep, stop
        return total


def halving(n: int, budget: int, keep: float) -> Schedule | None:
    """Successive halving: survivors ``n_0 = n``, ``n_{i+1} = ceil(keep * n_i)`` until one is left; rung ``i``
    ends at ``r / keep^i`` steps, with the largest ``r`` whose cost, ``sum_i n_i (stop_i - stop_{i-1})``, fits
    ``budget``. None when the last rung would be shorter than :data:`MIN_PROGRAM`."""
    survivors = [n]
    while survivors[-1] > 1:
        survivors.append(max(1, math.ceil(keep * survivors[-1] - 1e-9)))
    growth = [(1.0 / keep) ** i for i in range(len(survivors) - 1)]
    per_r = sum(a * (g - (growth[i - 1] if i else 0.0)) for i, (a, g) in enumerate(zip(survivors, growth)))
    r = budget / per_r
    while r > 0:
        stops = tuple(max(1, int(round(r * g))) for g in growth)
        sched = Schedule(stops[-1], stops, tuple(survivors[1:]))
        if sched.cost(n) <= budget and all(a < b for a, b in zip(stops, stops[1:])):
            return sched if sched.program >= MIN_PROGRAM else None
        r -= 0.25
    return None


def grid(n: int, budget: int, keep: float) -> Schedule | None:
    """Every candidate runs the whole program of ``budget // n`` steps; the best one wins."""
    program = budget // n
    return Schedule(program, (program,), (1,)) if program >= MIN_PROGRAM else None


def staircase(n: int, budget: int, keep: float) -> Schedule | None:
    """The LR range test: one run of ``budget`` steps, ``budget // n`` at each candidate, lowest first."""
    per = budget // n
    return Schedule(per * n, tuple(per * (i + 1) for i in range(n)), (1,) * n, runs=1) if per >= 1 else None


def scored_rows(sched: Schedule, n: int, allowed: float, held: int) -> tuple[int, ...]:
    """Held-out rows scored at each rung of ``sched`` with ``n`` candidates, ``allowed`` rows in all: half to the
    last rung's evaluations, the other half shared by the earlier ones (one rung: all of it), at least
    :data:`MIN_SCORED` and at most ``held`` an evaluation. Every candidate of a rung is scored on the same rows."""
    evals = [sched.runs or n] + list(sched.keeps[:-1])
    clamp = lambda r: int(min(held, max(MIN_SCORED, r)))  # noqa: E731
    if len(evals) == 1:
        return (clamp(allowed / evals[0]),)
    early = clamp(allowed / 2 / sum(evals[:-1]))
    return (early,) * (len(evals) - 1) + (clamp(allowed / 2 / evals[-1]),)


# ------------------------------------------------------------------------------------------------- result
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
    #: whether the candidates were scored with BatchNorm's batch statistics (:attr:`LRProbeConfig.batch_stats`)
    batch_stats: bool = False
    #: the held-out loss of the best constant prediction on the rows the last rung scored (:func:`constant_loss`)
    constant_loss: float | None = None
    #: the winner's dense-phase check (:func:`dense_check`; None: not run, or the method does not start dense)
    dense: DenseCheck | None = None

    @property
    def informative(self) -> bool:
        """Whether the chosen rate's last score beats a constant prediction: when no candidate does, the probe's
        steps could not tell the rates apart (on a CNN with 90 % of its blocks pruned at once, every rate's
        held-out loss was still above chance: BENCHMARKS.md section 15.3) and its choice is a guess."""
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
                 "metric": "held-out loss (lower is better), one per rung reached", "program_steps": self.program,
                 "rungs": list(self.stops), "steps": self.steps,
                 "seconds": round(self.seconds, 3), "rows": self.rows}
        if self.constant_loss is not None:
            probe["constant_loss"] = _finite(self.constant_loss)
            probe["informative"] = self.informative
        if self.dense is not None:
            probe["dense_check"] = self.dense.to_json()
        wall, cpu = self.dense.reused_seconds if self.dense is not None else (0.0, 0.0)
        if self.fine_tune_seconds:  # the dense check's run the fine-tune continued from counts as the fine-tune's
            probe["fine_tune_seconds"] = round(self.fine_tune_seconds + wall, 3)
            probe["fraction_of_fine_tune"] = round((self.seconds - wall) / (self.fine_tune_seconds + wall), 4)
        if self.fine_tune_cpu_seconds:  # process CPU time: the same ratio, unmoved by other jobs on the machine
            probe["cpu_fraction_of_fine_tune"] = round((self.cpu_seconds - cpu) / (self.fine_tune_cpu_seconds + cpu), 4)
        if self.reason:
            probe["reason"] = self.reason
        out["probe"] = probe
        return out


    def digest(self) -> str:
        """sha256 of the choice, every score and the dense check's losses: equal digests, the same measurements
        (compared across ranks)."""
        body = [self.value, self.source, sorted((lr, [repr(v) for v in s]) for lr, s in self.scores.items())]
        if self.dense is not None:  # the dense check's measurements too (a method that starts dense)
            body.append(sorted((lr, repr(v)) for lr, v in self.dense.losses.items()))
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def runs_whole_program(phases: list, phase: str) -> bool:
    """Whether a probe candidate in ``phase`` runs a method's whole program (``phases``): phase ``sparse`` and a
    program that prunes once at step 0 and then trains sparse to the end (magnitude), so a candidate is the
    fine-tune in miniature, and every rung anneals as the fine-tune does (``anneal="auto"``)."""
    *before, last = phases
    return phase == "sparse" and last.kind == "sparse" and all(p.end == 0.0 for p in before)


# ------------------------------------------------------------------------------------------------- runner
class _Memory:
    """:func:`~sapp_compress.training.fine_tune`'s checkpointer interface, in memory: keeps the run's state once it
    reaches ``stop`` (the last step of that call, so nothing changes it afterwards), and resumes from it on the
    next call (the resume path of the checkpoints: optimizer, method phase, RNG, step)."""

    path = "memory"

    def __init__(self) -> None:
        self.state: dict | None = None
        self.stop = 0

    def load(self) -> dict | None:
        return self.state

    def due(self, next_step: int, total: int) -> bool:
        return next_step == self.stop and next_step < total

    def save(self, state: dict) -> None:
        self.state = state


class _Runner:
    """Fine-tunes copies of the unparametrized ``student`` (with its ``plans``) at a candidate rate over the
    compressed program, to a given step, and scores them on the held-out rows."""

    def __init__(self, student: nn.Module, plans: list, teacher: nn.Module | None, task: Task, fit: Shard,
                 held: Shard, prune_cfg: PruneConfig, train_cfg: TrainConfig, device: torch.device,
                 program: int, prime: int = 0, branches: int = 2) -> None:
        self.student, self.plans, self.teacher, self.task = student, plans, teacher, task
        self.fit, self.held, self.prune_cfg, self.device, self.program = fit, held, prune_cfg, device, program
        self.phase = train_cfg.lr_probe.phase
        self.anneal_cfg, self.batch_stats = train_cfg.lr_probe.anneal, train_cfg.lr_probe.batch_stats
        self.prime = prime
        self.fine_tune_cfg = train_cfg  # the fine-tune's own settings (the dense check runs its first steps)
        self.train: Shard | None = None  # the whole training shard (the fine-tune's), for the dense check
        self.rng: tuple | None = None  # the RNG states as the fine-tune will find them (CPU, CUDA)
        self.template: tuple[nn.Module, object] | None = None  # the finished copy every candidate starts as
        self.primed: tuple[nn.Module, object, dict] | None = None  # (model, method, state) after priming
        self.train_cfg = dataclasses.replace(train_cfg, log_every=10**9, checkpoint_dir=None, resume=False,
                                             warmup=train_cfg.warmup if train_cfg.lr_probe.warmup is None
                                             else train_cfg.lr_probe.warmup)
        #: steps every candidate runs identically, run once before they branch: the priming, and with it the
        #: program's first step when several candidates branch and their warm-up runs it at rate zero (see
        #: :meth:`_primed`; the range test's one run climbs from the lowest candidate instead)
        self.shared = prime + 1 if prime and branches > 1 and self.warm_start() else prime
        self.live: dict[float, tuple[nn.Module, object, _Memory]] = {}
        self.steps = 0
        self.rows: int | None = None  # held-out rows scored now (the first ones; None: all); set per rung
        self.rows_per_rung: tuple[int, ...] = ()
        self.targets: torch.Tensor | None = None  # of the first held-out rows scored so far (:meth:`_targets`)

    def warm_start(self) -> bool:
        """Whether a candidate's program starts with a warm-up from rate zero (its first step then moves no
        weight, whatever the candidate's rate)."""
        return self.train_cfg.warmup > 0

    def advance(self, lr: float, stop: int, lr_at: Callable[[int], float] | None = None) -> float:
        """Run candidate ``lr`` from where it stopped (or from the starting weights) to step ``stop`` of the
        program; its held-out loss there (inf when it diverged). ``lr_at``: the rate's multiple at each step
        of the program (default: the fine-tune's cosine with warm-up over the program). With priming, the
        program follows the ``prime`` steps every candidate shares (rate zero)."""
        if lr not in self.live:
            memory = _Memory()
            if self.prime:
                model, method, memory.state = self._branch()
            else:
                model, method = self._fresh()
            self.live[lr] = (model, method, memory)
            torch.manual_seed(self.train_cfg.seed)
        model, method, memory = self.live[lr]
        done = int(memory.state["step"]) if memory.state else 0
        memory.stop = self.prime + stop
        rate = lr_at or (lambda step: cosine_lr(step / max(1, self.program), self.train_cfg.warmup))
        cfg = dataclasses.replace(self.train_cfg, lr=lr)
        try:
            fine_tune(model, self.teacher, method, self.task, self.fit, cfg, self.device, self.prime + self.program,
                      stop=self.prime + stop, checkpointer=memory,
                      lr_at=lambda step: 0.0 if step < self.shared else rate(step - self.prime))
            loss = self._loss(model)
        except FloatingPointError:
            loss = math.inf
        self.steps += self.prime + stop - done
        return loss if math.isfinite(loss) else math.inf

    def _fresh(self) -> tuple[nn.Module, object]:
        """A copy of the starting weights with the method attached (pruned at once in phase ``sparse``): a copy of
        one such model built once (a structured method's ``finish`` scores every unit of every family, which on a
        resnet18 cost more than the copy)."""
        return copy.deepcopy(self._template())  # one memo: the method's layers name the copy's modules

    def _template(self) -> tuple[nn.Module, object]:
        if self.template is None:
            model, method = self._attached(self.prime + self.program)
            if self.phase == "sparse":
                method.finish()  # masks at the target now, by the method's own scores; the final sparse phase
            self.template = (model, method)
        return self.template

    @property
    def whole_program(self) -> bool:
        """Whether the candidates run the method's whole program (:func:`runs_whole_program`)."""
        return runs_whole_program(self._template()[1].phases, self.phase)

    @property
    def anneal(self) -> str:
        """:attr:`LRProbeConfig.anneal` resolved: ``auto`` is ``rung`` for a whole program, else ``program``."""
        if self.anneal_cfg != "auto":
            return self.anneal_cfg
        return "rung" if self.whole_program else "program"

    def _attached(self, total_steps: int) -> tuple[nn.Module, object]:
        """A copy of the starting weights on the device, with the method attached for ``total_steps`` steps."""
        model, plans = copy.deepcopy((self.student, self.plans))  # one memo: the plans name the copy's modules
        return model.to(self.device), METHODS[self.prune_cfg.method](self.prune_cfg, plans, total_steps)

    def _primed(self) -> tuple[nn.Module, object, dict]:
        """The state every candidate starts from with ``prime`` steps: ``prime`` steps at rate zero from the
        starting weights, which fill the optimizer's moments (and BatchNorm's statistics) and move no weight;
        run once, shared. Without them a candidate's first steps are Adam's first steps, whose second moment
        rests on one or two gradients: about ``lr`` on every weight, a shock that the fine-tune's warm-up (a
        few steps at a low rate) never gives it, and that ranks every rate above ~3e-4 last on a trained
        transformer (BENCHMARKS.md section 15).

        The priming also runs the program's first step (``shared = prime + 1``) when the candidates' warm-up starts
        from rate zero: that step is the same for every candidate (the same state, batch and RNG, no weight moved),
        so running it once instead of once per candidate saves ``n - 1`` steps of a probe of a few tens (on CTR's
        300-step fine-tune, 6 of 32: 2 % of the fine-tune)."""
        if self.primed is None:
            model, method = self._fresh()
            memory = _Memory()
            memory.stop = self.shared
            torch.manual_seed(self.train_cfg.seed)
            fine_tune(model, self.teacher, method, self.task, self.fit, dataclasses.replace(self.train_cfg, lr=1.0),
                      self.device, self.prime + self.program, stop=self.shared, checkpointer=memory,
                      lr_at=lambda step: 0.0)
            self.primed = (model, method, memory.state)
            self.steps += self.shared
        return self.primed

    def _branch(self) -> tuple[nn.Module, object, dict]:
        """A candidate at the primed state: a copy of the primed model and method, and a resume state whose
        optimizer moments are its own (the weights, BatchNorm's statistics and masks come with the copy)."""
        model, method, state = self._primed()
        model, method = copy.deepcopy((model, method))
        return model, method, {**state, "model": model.state_dict(), "optimizer": copy.deepcopy(state["optimizer"]),
                               "method": copy.deepcopy(state["method"]), "history": list(state["history"])}

    def start_loss(self) -> float:
        """The held-out loss of the starting weights with the method attached (masks as the probe starts)."""
        return self._loss(self._fresh()[0])

    def drop(self, lr: float) -> None:
        self.live.pop(lr, None)

    def dense_steps(self, total_steps: int) -> int:
        """Steps the fine-tune's program stays in its first phase when that is dense (else 0)."""
        first = self._template()[1].phases[0]  # the program's fractions, whatever its length
        return int(round(first.end * total_steps)) if first.kind == "dense" else 0

    def dense_run(self, lr: float, steps: int, total_steps: int) -> tuple[float, float, dict, float, float]:
        """The fine-tune's own first ``steps`` steps at peak rate ``lr`` (its schedule, data order and RNG), on a
        copy: (held-out loss before, after (inf when it diverged), the run's state at ``steps`` for the fine-tune
        to continue from, wall and CPU seconds of its steps: what the fine-tune does not run again)."""
        cpu, cuda = self.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        model, method = self._attached(total_steps)  # as the fine-tune attaches it
        before = self._loss(model, batch_stats=True)
        memory = _Memory()
        memory.stop = steps
        cfg = dataclasses.replace(self.fine_tune_cfg, lr=lr, checkpoint_dir=None, resume=False)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            fine_tune(model, self.teacher, method, self.task, self.train, cfg, self.device, total_steps, stop=steps,
                      checkpointer=memory)
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            loss = self._loss(model, batch_stats=True)
        except FloatingPointError:
            wall, cpu_s, loss = time.perf_counter() - t0, time.process_time() - c0, math.inf
        self.steps += steps
        after = loss if math.isfinite(loss) else math.inf
        return before, after, memory.state, wall, cpu_s

    @torch.no_grad()
    def _targets(self, n: int) -> torch.Tensor:
        """The targets of the first ``n`` held-out rows: their labels, or the teacher's outputs, computed for the
        rows the probe scores only (a transformer's outputs on all 418 held-out rows cost more than the rows the
        bounded scoring reads)."""
        if self.targets is None or len(self.targets) < n:
            n = min(len(self.held), max(n, *self.rows_per_rung, 0))  # every rung's rows at once
            if self.teacher is None:
                self.targets = to_tensors((self.held.y,), torch.device("cpu"))[0]
            else:
                self.targets = _outputs(self.teacher, self.held.subset(np.arange(n)), self.device).cpu()
        return self.targets

    @torch.no_grad()
    def _loss(self, model: nn.Module, chunk: int = 256, batch_stats: bool | None = None) -> float:
        """The task's loss on the held-out rows (means over chunks, weighted by their rows). ``batch_stats``:
        BatchNorm layers normalise by each chunk's statistics, not their running ones (a few steps at a high
        rate leave the running statistics behind the weights: on the digits CNN, 6.1 against 0.19 after seven
        dense steps at 1e-2); the running statistics are left as they were (the dense check's run is continued by
        the fine-tune). None: :attr:`LRProbeConfig.batch_stats` (how the candidates, and the range test's start,
        are scored)."""
        batch_stats = self.batch_stats if batch_stats is None else batch_stats
        model.eval()
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if batch_stats else []
        saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
        for m in norms:  # batch statistics, and the running ones left exactly as they were (momentum 0)
            m.train()
            m.momentum = 0.0
        total, n = 0.0, min(len(self.held), self.rows or len(self.held))
        if norms:  # chunks of equal size: each is normalised by its own statistics, which a tail of a few rows lacks
            chunk = math.ceil(n / math.ceil(n / chunk))
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            xs = to_tensors(tuple(x[i:j] for x in self.held.inputs), self.device)
            out = model(*xs).float()
            t = self._targets(n)[i:j].to(self.device)
            total += float(self.task.loss(out, t, self.train_cfg.distill_temperature)) * len(t)
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        return total / n


@torch.no_grad()
def constant_loss(task: Task, target: torch.Tensor, temperature: float = 1.0) -> float:
    """The task's loss of the best input-independent prediction on ``target`` (held-out labels, or the teacher's
    outputs): the class prior's cross-entropy, the base rate's log-loss, the targets' variance, the KL to the
    teacher's mean distribution. A candidate that does not beat it has learnt nothing the probe can rank."""
    t = target
    if task.name == "classification":
        labels = t.reshape(-1)
        labels = labels[labels != IGNORE_INDEX].long()
        if labels.numel() == 0:
            return math.inf
        prior = torch.bincount(labels, minlength=task.n_outputs).float() / labels.numel()
        out = prior.clamp_min(1e-12).log().expand(labels.numel(), -1)
        return float(task.loss(out, labels, temperature))
    if task.name == "binary":
        p = t.float().mean().clamp(1e-6, 1 - 1e-6)
        return float(task.loss(torch.full_like(t, float(torch.logit(p)), dtype=torch.float32), t, temperature))
    if task.name == "distill_classification":
        q = torch.softmax(t.float() / temperature, dim=-1).reshape(-1, t.shape[-1]).mean(0)
        return float(task.loss((temperature * q.clamp_min(1e-12).log()).expand_as(t), t, temperature))
    return float(task.loss(t.float().mean(0, keepdim=True).expand_as(t), t, temperature))


@torch.no_grad()
def _outputs(model: nn.Module, shard: Shard, device: torch.device, chunk: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(*to_tensors(tuple(x[i : i + chunk] for x in shard.inputs), device)).float()
                      for i in range(0, len(shard), chunk)])


# -------------------------------------------------------------------------------------------------- probe
def probe_split(train: Shard, cfg: LRProbeConfig, seed: int) -> tuple[Shard, Shard] | None:
    """(rows the candidates train on, rows they are scored on): ``held_out`` of the shard, at most
    ``max_rows``; None when the shard is too small to hold :data:`MIN_HELD` out."""
    n = len(train)
    k = min(int(round(cfg.held_out * n)), cfg.max_rows)
    if k < MIN_HELD or n - k < 1:
        return None
    return train.split(k / n, seed + 1)


def choose_lr(student: nn.Module, plans: list, teacher: nn.Module | None, task: Task, train: Shard,
              prune_cfg: PruneConfig, train_cfg: TrainConfig, device: torch.device, total_steps: int) -> ProbeResult:
    """The fine-tune's peak rate: ``train_cfg.lr`` when it is a number (source ``--lr``), else :func:`probe_lr`'s."""
    if train_cfg.lr != "auto":
        return ProbeResult(float(train_cfg.lr), "--lr", "")
    return probe_lr(student, plans, teacher, task, train, prune_cfg, train_cfg, device, total_steps)


def probe_lr(student: nn.Module, plans: list, teacher: nn.Module | None, task: Task, train: Shard,
             prune_cfg: PruneConfig, train_cfg: TrainConfig, device: torch.device, total_steps: int) -> ProbeResult:
    """Choose the peak learning rate of a fine-tune of ``total_steps`` steps (see the module's docstring).

    ``student`` and ``plans`` are the model and its planned layers (or families) before the method is attached;
    they are copied, never changed. The global RNG states are restored when it returns."""
    cfg = train_cfg.lr_probe
    # torch's first optimizer imports torch._dynamo (about 1.5 s, once per process), which the fine-tune would pay
    # otherwise: paid here, outside the probe's timing
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    t0, c0 = time.perf_counter(), time.process_time()
    cands = sorted(cfg.candidates)
    budget = int(cfg.budget * total_steps)
    sched = STRATEGIES[cfg.strategy].schedule(len(cands), budget, cfg.keep)
    split = probe_split(train, cfg, train_cfg.seed)
    if sched is None or split is None:
        why = (f"a fine-tune of {total_steps} steps leaves the probe {budget} steps ({cfg.budget:.0%}), too few for "
               f"{len(cands)} candidates" if sched is None
               else f"{len(train)} training rows are too few to hold {MIN_HELD} out ({cfg.held_out:.0%})")
        log.info("lr probe skipped: %s; lr %g", why, cfg.fallback)
        return ProbeResult(cfg.fallback, "fallback", cfg.strategy, reason=why)
    fit, held = split
    runner = _Runner(student, plans, teacher, task, fit, held, prune_cfg, train_cfg, device, sched.program,
                     int(round(cfg.prime * total_steps)), branches=sched.runs or len(cands))
    runner.rows_per_rung = scored_rows(sched, len(cands), cfg.scoring * budget * train_cfg.batch_size, len(held))
    runner.train = train
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
                      {"trained": len(fit), "scored": len(held), "scored_per_rung": list(runner.rows_per_rung)},
                      cpu_seconds=time.process_time() - c0, anneal=runner.anneal, batch_stats=runner.batch_stats,
                      constant_loss=floor, dense=check)
    log.info("lr probe: %g (%d steps, %.1fs)", best, runner.steps, res.seconds)
    return res


@dataclass
class DenseCheck:
    """The dense-phase check of the probe's winner (:attr:`LRProbeConfig.dense_check`): the held-out loss of
    the starting weights (``start``) and of each rate checked after the fine-tune's first ``steps`` steps at it,
    against ``bound`` and ``ratio`` times the next lower rate's (:func:`dense_check`). ``state`` is the chosen
    rate's run at ``steps``, which the fine-tune continues from (``resumed``), so a check that passes costs no
    steps: ``reused_seconds`` of the probe's time were the fine-tune's."""

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
        out = {"steps": self.steps, "start": _finite(self.start), "bound": _finite(self.bound), "ratio": self.ratio,
               "losses": {f"{lr:g}": _finite(v) for lr, v in self.losses.items()},
               "vetoed": [f"{lr:g}" for lr in self.vetoed], "resumed": self.resumed}
        if self.resumed:
            out["seconds_reused_by_fine_tune"] = round(self.reused_seconds[0], 3)
        return out


def dense_check(runner: _Runner, cands: list[float], best: float, total_steps: int, share: float,
                ratio: float) -> tuple[float, DenseCheck | None]:
    """Veto a winner that wrecks the method's dense phase; (the rate, the check), or (``best``, None) for a method
    that does not start dense.

    From ``best`` down the candidates, each rate runs the fine-tune's own first steps, its warm-up and one step at
    the peak (:meth:`_Runner.dense_run`). A rate whose held-out loss then stays within ``start + share *
    max(0, constant - start)`` is the fine-tune's, and the fine-tune continues from that run; one above it is
    vetoed only if it also ends above ``ratio`` times the next lower rate's loss: where every rate loses about as
    much, the loss is the task's noise at a hot rate, not a destroyed model (BENCHMARKS.md 15.5). The probe's
    candidates train in the final sparse phase, where a rate that destroys a trained model's dense function can
    still recover the pruned one fastest."""
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
    _check_same_scores(check.losses, -1)
    return check.chosen, check


def rung_cycle(start: int, stop: int, warmup: float) -> Callable[[int], float]:
    """The rate's multiple at each step of a rung run as its own cycle (``LRProbeConfig.anneal = "rung"``): warm-up
    and cosine from ``start`` to ``stop``, so the rung's last step runs at nearly zero."""
    return lambda step: cosine_lr((step - start) / max(1, stop - start), warmup)


def successive(runner: _Runner, cands: list[float], sched: Schedule) -> tuple[float, dict[float, list[float]]]:
    """Rung by rung: every survivor runs to the rung's step and is scored; the best ``keep`` go on."""
    scores: dict[float, list[float]] = {lr: [] for lr in cands}
    alive = list(cands)
    for rung, (stop, keep) in enumerate(zip(sched.stops, sched.keeps)):
        runner.rows = runner.rows_per_rung[rung]
        start = sched.stops[rung - 1] if rung else 0
        lr_at = rung_cycle(start, stop, runner.train_cfg.warmup) if runner.anneal == "rung" else None
        best: list[float] = []
        for lr in alive:
            scores[lr].append(runner.advance(lr, stop, lr_at))
            log.info("lr probe: rung %d, lr %g, step %d of %d: held-out loss %.5g", rung, lr, stop, sched.program,
                     scores[lr][-1])
            # the best `keep` so far (ties go to the lower rate); the others are dropped at once, so at most
            # keep + 1 candidates (each a copy of the model and its optimizer moments) are held, not all of them
            best = sorted([*best, lr], key=lambda r: (scores[r][-1], r))
            for out in best[keep:]:
                runner.drop(out)
            best = best[:keep]
        _check_same_scores({lr: scores[lr][-1] for lr in alive}, rung)
        alive = best
    return alive[0], scores


def range_test(runner: _Runner, cands: list[float], sched: Schedule) -> tuple[float, dict[float, list[float]]]:
    """One run up a staircase of the candidates, lowest first, ``sched.stops[i]`` the end of stair ``i``; the
    held-out loss after each stair; the winner is the stair that lowered it most (steepest descent)."""
    stops = sched.stops
    runner.rows = min(runner.rows_per_rung)  # every stair against the one before: the same rows throughout

    def stair(step: int) -> float:
        return cands[min(sum(step >= s for s in stops), len(cands) - 1)]

    losses, prev = {}, runner.start_loss()
    for i, (lr, stop) in enumerate(zip(cands, stops)):
        losses[lr] = [runner.advance(1.0, stop, stair)]
        if not math.isfinite(losses[lr][0]):
            break
    gains = {lr: (prev if i == 0 else losses[cands[i - 1]][0]) - v[0] for i, (lr, v) in enumerate(losses.items())}
    _check_same_scores({lr: v[0] for lr, v in losses.items()}, 0)
    best = max(gains, key=lambda lr: (gains[lr], -lr))
    return best, losses


@dataclass(frozen=True)
class Strategy:
    """How the probe spends its budget: ``schedule(candidates, budget steps, keep)`` (None: too short to probe)
    and ``run(runner, candidates, schedule) -> (winner, held-out losses per candidate)``."""

    schedule: Callable[[int, int, float], Schedule | None]
    run: Callable[[_Runner, list[float], Schedule], tuple[float, dict[float, list[float]]]]


#: the probe's strategies (``LRProbeConfig.strategy``); BENCHMARKS.md section 15 measures them
STRATEGIES: dict[str, Strategy] = {
    "halving": Strategy(halving, successive),
    "grid": Strategy(grid, successive),
    "range": Strategy(staircase, range_test),
}


def _check_same_scores(scores: dict[float, float], rung: int) -> None:
    """Raise if the ranks measured different scores (they would choose different rates)."""
    if not distributed.current().active:
        return
    digest = hashlib.sha256(json.dumps(sorted((lr, repr(v)) for lr, v in scores.items())).encode()).hexdigest()
    digests = distributed.gather_digests(digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"the lr probe's scores differ across ranks at rung {rung}: digests "
                           f"{[d[:12] for d in digests]}")


__all__ = ["MIN_HELD", "MIN_PROGRAM", "MIN_SCORED", "STRATEGIES", "DenseCheck", "ProbeResult", "Schedule", "Strategy",
           "choose_lr", "constant_loss", "dense_check", "grid", "halving", "probe_lr", "probe_split", "rung_cycle",
           "runs_whole_program", "scored_rows", "staircase"]
