"""The copies the probe trains: :class:`Runner` fine-tunes copies of the model at a candidate rate over the
compressed program, to a given step, from in-memory checkpoints (:class:`Memory`), and scores them on the
held-out rows of the training shard (the task's loss, lower is better; :func:`constant_loss` is the floor a
candidate must beat to have learnt anything the probe can rank)."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from calib_data.shards import IGNORE_INDEX, Shard

from ...config import PruneConfig, TrainConfig
from ...io.feeds import to_tensors
from ...io.tasks import Task
from ..methods import METHODS
from ..schedules import cosine_lr
from ..training import fine_tune


def runs_whole_program(phases: list, phase: str) -> bool:
    """Whether a probe candidate in ``phase`` runs a method's whole program (``phases``): phase ``sparse`` and
    a program that prunes once at step 0 and then trains sparse to the end (magnitude), so a candidate is the
    fine-tune in miniature, and every rung anneals as the fine-tune does (``anneal="auto"``)."""
    *before, last = phases
    return phase == "sparse" and last.kind == "sparse" and all(p.end == 0.0 for p in before)


class Memory:
    """:func:`~sapp_compress.engine.training.fine_tune`'s checkpointer interface, in memory: keeps the run's
    state once it reaches ``stop`` (the last step of that call, so nothing changes it afterwards), and resumes
    from it on the next call (the resume path of the checkpoints: optimizer, method phase, RNG, step)."""

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


class Runner:
    """Fine-tunes copies of the unparametrized ``student`` (with its ``plan``) at a candidate rate over the
    compressed program, to a given step, and scores them on the held-out rows."""

    def __init__(self, student: nn.Module, plan, teacher: nn.Module | None, task: Task, fit: Shard,
                 held: Shard, prune_cfg: PruneConfig, train_cfg: TrainConfig, device: torch.device,
                 program: int, prime: int = 0, branches: int = 2) -> None:
        self.student, self.plan, self.teacher, self.task = student, plan, teacher, task
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
        self.live: dict[float, tuple[nn.Module, object, Memory]] = {}
        self.steps = 0
        self.rows: int | None = None  # held-out rows scored now (the first ones; None: all); set per rung
        self.rows_per_rung: tuple[int, ...] = ()
        # of the first held-out rows scored so far (:meth:`_targets`)
        self.targets: torch.Tensor | None = None
        self.progress: Callable[[dict], None] | None = None  # told the probe's steps so far (:meth:`tick`)
        self.expected = 0  # the steps the probe is expected to run

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
            memory = Memory()
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
            fine_tune(model, self.teacher, method, self.task, self.fit, cfg, self.device,
                      self.prime + self.program, stop=self.prime + stop, checkpointer=memory,
                      lr_at=lambda step: 0.0 if step < self.shared else rate(step - self.prime))
            loss = self._loss(model)
        except FloatingPointError:
            loss = math.inf
        self.steps += self.prime + stop - done
        self.tick()
        return loss if math.isfinite(loss) else math.inf

    def tick(self) -> None:
        """A progress event: the probe's steps so far, of those it is expected to run."""
        if self.progress is not None:
            self.progress({"event": "step", "stage": "lr probe", "step": self.steps,
                           "total": max(self.expected, self.steps)})

    def _fresh(self) -> tuple[nn.Module, object]:
        """A copy of the starting weights with the method attached (pruned at once in phase ``sparse``): a
        copy of one such model built once (a structured method's ``finish`` scores every unit of every family,
        which on a resnet18 cost more than the copy)."""
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
        """:attr:`LRProbeConfig.anneal` resolved: ``auto`` is ``rung`` for a whole program, else
        ``program``."""
        if self.anneal_cfg != "auto":
            return self.anneal_cfg
        return "rung" if self.whole_program else "program"

    def _attached(self, total_steps: int) -> tuple[nn.Module, object]:
        """A copy of the starting weights on the device, with the method attached for ``total_steps``
        steps."""
        # one memo: the units name the copy's modules
        model, units = copy.deepcopy((self.student, self.plan.units))
        plan = self.plan.rebind(units)
        return model.to(self.device), METHODS[self.prune_cfg.method](self.prune_cfg, plan, total_steps)

    def _primed(self) -> tuple[nn.Module, object, dict]:
        """The state every candidate starts from with ``prime`` steps: ``prime`` steps at rate zero from the
        starting weights, which fill the optimizer's moments (and BatchNorm's statistics) and move no weight;
        run once, shared. Without them a candidate's first steps are Adam's first steps, whose second moment
        rests on one or two gradients: about ``lr`` on every weight, a shock that the fine-tune's warm-up (a
        few steps at a low rate) never gives it, and that ranks every rate above ~3e-4 last on a trained
        transformer (BENCHMARKS.md section 15).

        The priming also runs the program's first step (``shared = prime + 1``) when the candidates' warm-up
        starts from rate zero: that step is the same for every candidate (the same state, batch and RNG, no
        weight moved), so running it once instead of once per candidate saves ``n - 1`` steps of a probe of a
        few tens (on CTR's 300-step fine-tune, 6 of 32: 2 % of the fine-tune)."""
        if self.primed is None:
            model, method = self._fresh()
            memory = Memory()
            memory.stop = self.shared
            torch.manual_seed(self.train_cfg.seed)
            fine_tune(model, self.teacher, method, self.task, self.fit,
                      dataclasses.replace(self.train_cfg, lr=1.0), self.device, self.prime + self.program,
                      stop=self.shared, checkpointer=memory,
                      lr_at=lambda step: 0.0)
            self.primed = (model, method, memory.state)
            self.steps += self.shared
        return self.primed

    def _branch(self) -> tuple[nn.Module, object, dict]:
        """A candidate at the primed state: a copy of the primed model and method, and a resume state whose
        optimizer moments are its own (the weights, BatchNorm's statistics and masks come with the copy)."""
        model, method, state = self._primed()
        model, method = copy.deepcopy((model, method))
        return model, method, {**state, "model": model.state_dict(),
                               "optimizer": copy.deepcopy(state["optimizer"]),
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
        """The fine-tune's own first ``steps`` steps at peak rate ``lr`` (its schedule, data order and RNG),
        on a copy: (held-out loss before, after (inf when it diverged), the run's state at ``steps`` for the
        fine-tune to continue from, wall and CPU seconds of its steps: what the fine-tune does not run
        again)."""
        cpu, cuda = self.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        model, method = self._attached(total_steps)  # as the fine-tune attaches it
        before = self._loss(model, batch_stats=True)
        memory = Memory()
        memory.stop = steps
        cfg = dataclasses.replace(self.fine_tune_cfg, lr=lr, checkpoint_dir=None, resume=False)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            fine_tune(model, self.teacher, method, self.task, self.train, cfg, self.device, total_steps,
                      stop=steps, checkpointer=memory)
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            loss = self._loss(model, batch_stats=True)
        except FloatingPointError:
            wall, cpu_s, loss = time.perf_counter() - t0, time.process_time() - c0, math.inf
        self.steps += steps
        self.expected += steps
        self.tick()
        after = loss if math.isfinite(loss) else math.inf
        return before, after, memory.state, wall, cpu_s

    @torch.no_grad()
    def _targets(self, n: int) -> torch.Tensor:
        """The targets of the first ``n`` held-out rows: their labels, or the teacher's outputs, computed for
        the rows the probe scores only (a transformer's outputs on all 418 held-out rows cost more than the
        rows the bounded scoring reads)."""
        if self.targets is None or len(self.targets) < n:
            n = min(len(self.held), max(n, *self.rows_per_rung, 0))  # every rung's rows at once
            if not self.task.distill:  # labels (a teacher may be there for layer-wise distillation alone)
                self.targets = to_tensors((self.held.y,), torch.device("cpu"))[0]
            else:
                self.targets = _outputs(self.teacher, self.held.subset(np.arange(n)), self.device).cpu()
        return self.targets

    @torch.no_grad()
    def _loss(self, model: nn.Module, chunk: int = 256, batch_stats: bool | None = None) -> float:
        """The task's loss on the held-out rows (means over chunks, weighted by their rows). ``batch_stats``:
        BatchNorm layers normalise by each chunk's statistics, not their running ones (a few steps at a high
        rate leave the running statistics behind the weights: on the digits CNN, 6.1 against 0.19 after seven
        dense steps at 1e-2); the running statistics are left as they were (the dense check's run is continued
        by the fine-tune). None: :attr:`LRProbeConfig.batch_stats` (how the candidates, and the range test's
        start, are scored)."""
        batch_stats = self.batch_stats if batch_stats is None else batch_stats
        model.eval()
        norms = ([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                 if batch_stats else [])
        saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                 for m in norms]
        for m in norms:  # batch statistics, and the running ones left exactly as they were (momentum 0)
            m.train()
            m.momentum = 0.0
        total, n = 0.0, min(len(self.held), self.rows or len(self.held))
        if norms:
            # chunks of equal size: each is normalised by its own statistics, which a tail of a few rows lacks
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
    """The task's loss of the best input-independent prediction on ``target`` (held-out labels, or the
    teacher's outputs): the class prior's cross-entropy, the base rate's log-loss, the targets' variance, the
    KL to the teacher's mean distribution. A candidate that does not beat it has learnt nothing the probe can
    rank."""
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
        return float(task.loss(torch.full_like(t, float(torch.logit(p)), dtype=torch.float32), t,
                               temperature))
    if task.name == "distill_classification":
        q = torch.softmax(t.float() / temperature, dim=-1).reshape(-1, t.shape[-1]).mean(0)
        return float(task.loss((temperature * q.clamp_min(1e-12).log()).expand_as(t), t, temperature))
    return float(task.loss(t.float().mean(0, keepdim=True).expand_as(t), t, temperature))


@torch.no_grad()
def _outputs(model: nn.Module, shard: Shard, device: torch.device, chunk: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(*to_tensors(tuple(x[i : i + chunk] for x in shard.inputs), device)).float()
                      for i in range(0, len(shard), chunk)])


__all__ = ["Memory", "Runner", "constant_loss", "runs_whole_program"]
