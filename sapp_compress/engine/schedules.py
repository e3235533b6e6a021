"""Pure schedule functions of progress ``t`` in [0, 1].

Sparsity schedules map progress through a pruning phase to the fraction of the *target* sparsity reached
(0 at ``t = 0``, exactly 1 at ``t = 1``); the learning-rate schedule maps progress through the whole budget
to a multiplier of the base LR.
"""
from __future__ import annotations

import math
from typing import Callable

SparsitySchedule = Callable[[float], float]


def exponential(t: float, c: float = 4.0) -> float:
    """SA++'s sparsification schedule: ``(1 - exp(-c t)) / (1 - exp(-c))``.

    Prunes aggressively early and carefully near the target. ``c = 4`` is the paper's choice.
    """
    t = min(max(t, 0.0), 1.0)
    return (1.0 - math.exp(-c * t)) / (1.0 - math.exp(-c))


def cubic(t: float) -> float:
    """Zhu & Gupta's gradual magnitude pruning: ``1 - (1 - t)^3``."""
    t = min(max(t, 0.0), 1.0)
    return 1.0 - (1.0 - t) ** 3


def one_shot(t: float) -> float:
    """Everything at once: 1 for every ``t``."""
    return 1.0


def linear(t: float) -> float:
    """``t``."""
    return min(max(t, 0.0), 1.0)


#: name -> schedule. Methods name their schedule; options can override it.
SCHEDULES: dict[str, SparsitySchedule] = {
    "exponential": exponential,
    "cubic": cubic,
    "one_shot": one_shot,
    "linear": linear,
}


def cosine_lr(t: float, warmup: float = 0.05, floor: float = 0.0) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine decay to ``floor``:
    ``floor + (1 - floor) * 0.5 * (1 + cos(pi * (t - warmup) / (1 - warmup)))``."""
    t = min(max(t, 0.0), 1.0)
    if warmup > 0 and t < warmup:
        return (t + 1e-12) / warmup
    u = (t - warmup) / max(1e-12, 1.0 - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * u))
