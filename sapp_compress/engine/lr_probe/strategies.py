"""How the probe spends its budget: a :data:`STRATEGIES` entry is a pure function of (candidates, budget)
giving the program length and the *rungs* (:class:`Schedule`), and the loop that runs them on a runner
(:class:`~.runner.Runner`).

- ``halving`` (successive halving, the default): every candidate runs the first ``r`` steps of the program and
  is scored; the best ``ceil(keep * n)`` continue (from where they stopped: in-memory checkpoints) to
  ``r / keep`` steps, and so on until one is left. With 7 candidates and ``keep = 1/3`` the cost is
  ``7 r + 3 (3 r - r) = 13 r`` steps and the last rung scores 3 candidates at a horizon of ``3 r``, against
  ``budget / 7`` for a grid;
- ``grid``: every candidate runs the whole program of ``budget / n`` steps;
- ``range`` (an LR range test): one copy climbs a staircase of the candidates, lowest first, ``budget / n``
  steps each; the stair that lowered the held-out loss most wins.

Under ``torchrun`` the ranks' scores are compared after each rung (:func:`check_same_scores`), as the masks
are.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Callable

from .. import distributed
from ..schedules import cosine_lr

log = logging.getLogger(__name__)

MIN_SCORED = 32


#: cannot give the last rung this many steps falls back to ``LRProbeConfig.fallback``
MIN_PROGRAM = 4



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
    """Held-out rows scored at each rung of ``sched`` with ``n`` candidates, ``allowed`` rows in all: half to
    the last rung's evaluations, the other half shared by the earlier ones (one rung: all of it), at least
    :data:`MIN_SCORED` and at most ``held`` an evaluation. Every candidate of a rung is scored on the same
    rows."""
    evals = [sched.runs or n] + list(sched.keeps[:-1])
    clamp = lambda r: int(min(held, max(MIN_SCORED, r)))  # noqa: E731
    if len(evals) == 1:
        return (clamp(allowed / evals[0]),)
    early = clamp(allowed / 2 / sum(evals[:-1]))
    return (early,) * (len(evals) - 1) + (clamp(allowed / 2 / evals[-1]),)


def rung_cycle(start: int, stop: int, warmup: float) -> Callable[[int], float]:
    """The rate's multiple at each step of a rung run as its own cycle (``LRProbeConfig.anneal = "rung"``):
    warm-up and cosine from ``start`` to ``stop``, so the rung's last step runs at nearly zero."""
    return lambda step: cosine_lr((step - start) / max(1, stop - start), warmup)


def successive(runner, cands: list[float], sched: Schedule) -> tuple[float, dict[float, list[float]]]:
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
            log.info("lr probe: rung %d, lr %g, step %d of %d: held-out loss %.5g", rung, lr, stop,
                     sched.program, scores[lr][-1])
            # the best `keep` so far (ties go to the lower rate); the others are dropped at once, so at most
            # keep + 1 candidates (each a copy of the model and its optimizer moments) are held, not all of
            # them
            best = sorted([*best, lr], key=lambda r: (scores[r][-1], r))
            for out in best[keep:]:
                runner.drop(out)
            best = best[:keep]
        check_same_scores({lr: scores[lr][-1] for lr in alive}, rung)
        alive = best
    return alive[0], scores


def range_test(runner, cands: list[float], sched: Schedule) -> tuple[float, dict[float, list[float]]]:
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
    gains = {lr: (prev if i == 0 else losses[cands[i - 1]][0]) - v[0]
             for i, (lr, v) in enumerate(losses.items())}
    check_same_scores({lr: v[0] for lr, v in losses.items()}, 0)
    best = max(gains, key=lambda lr: (gains[lr], -lr))
    return best, losses


@dataclass(frozen=True)
class Strategy:
    """How the probe spends its budget: ``schedule(candidates, budget steps, keep)`` (None: too short to
    probe) and ``run(runner, candidates, schedule) -> (winner, held-out losses per candidate)``."""

    schedule: Callable[[int, int, float], Schedule | None]
    run: Callable[[object, list[float], Schedule], tuple[float, dict[float, list[float]]]]


#: the probe's strategies (``LRProbeConfig.strategy``); BENCHMARKS.md section 15 measures them
STRATEGIES: dict[str, Strategy] = {
    "halving": Strategy(halving, successive),
    "grid": Strategy(grid, successive),
    "range": Strategy(staircase, range_test),
}


def check_same_scores(scores: dict[float, float], rung: int) -> None:
    """Raise if the ranks measured different scores (they would choose different rates)."""
    if not distributed.current().active:
        return
    digest = hashlib.sha256(
        json.dumps(sorted((lr, repr(v)) for lr, v in scores.items())).encode()).hexdigest()
    digests = distributed.gather_digests(digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"the lr probe's scores differ across ranks at rung {rung}: digests "
                           f"{[d[:12] for d in digests]}")


__all__ = ["MIN_PROGRAM", "MIN_SCORED", "STRATEGIES", "Schedule", "Strategy", "check_same_scores", "grid",
           "halving", "range_test", "rung_cycle", "scored_rows", "staircase", "successive"]
