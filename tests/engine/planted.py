"""The planted block-sparse teacher shared by the recovery test and the benchmark."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard


def planted_problem(seed: int, n_in: int = 256, n_out: int = 128, block: int = 8, frac: float = 0.2,
                    n: int = 4096, noise: float = 1.0):
    """A linear teacher whose weight has ``frac`` of its ``block x block`` blocks non-zero, inputs of very
    different scales (so magnitude is a poor guide to importance), and a student = teacher + dense noise.

    Returns (student, shard, planted bool grid [R, C]).
    """
    rng = np.random.default_rng(seed)
    R, C = n_out // block, n_in // block
    planted = np.zeros(R * C, dtype=bool)
    planted[rng.choice(R * C, int(round(frac * R * C)), replace=False)] = True
    planted = planted.reshape(R, C)
    w = rng.normal(size=(n_out, n_in)).astype(np.float32) * np.kron(planted, np.ones((block, block)))
    scales = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=n_in)).astype(np.float32)
    x = (rng.normal(size=(n, n_in)) * scales).astype(np.float32)
    w_t = w / scales[None, :]  # every planted block matters about equally at the output
    y = (x @ w_t.T).astype(np.float32)
    y /= y.std()
    w_t /= (x @ w_t.T).std()
    student = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.from_numpy(
            w_t + noise * np.abs(w_t).mean() * rng.normal(size=w_t.shape).astype(np.float32)))
    return student, Shard(inputs=(x,), y=y, source=f"planted(seed={seed})"), planted


def recovery(kept: np.ndarray, planted: np.ndarray) -> float:
    return float((kept & planted).sum() / planted.sum())
