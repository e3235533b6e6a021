"""A batch run in parts (``TrainConfig.micro_batch``): the same gradients as the whole batch, the part size
chosen from the activations measured on two rows against ``activation_budget_mb``, and never for a model with
BatchNorm (a part's batch statistics would differ from the batch's)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from calib_data.shards import Shard
from sapp_compress.config import TrainConfig
from sapp_compress.engine.training import _accumulate, activation_bytes, choose_micro_batch, micro_batches
from sapp_compress.io.tasks import Task


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 4))


def _shard(n: int = 48) -> Shard:
    rng = np.random.default_rng(0)
    return Shard((rng.normal(size=(n, 16)).astype(np.float32),), rng.integers(0, 4, n).astype(np.int64), "t")


def _grads(micro: int | None) -> list[torch.Tensor]:
    model, shard = _model(), _shard()
    cfg = TrainConfig(steps=1, batch_size=48, micro_batch=micro)
    loss = _accumulate(model, None, Task("classification", 4), shard, np.arange(48), cfg,
                       torch.device("cpu"), contextlib.nullcontext(), None, False)
    return [loss] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro", [7, 16, 48])
def test_parts_add_up_to_the_batch(micro):
    whole, parts = _grads(None), _grads(micro)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_parts_are_even_and_cover_the_batch():
    idx = np.arange(50)
    parts = micro_batches(idx, 16)
    assert [len(p) for p in parts] == [13, 13, 12, 12] and np.array_equal(np.concatenate(parts), idx)
    assert micro_batches(idx, None) == [idx] and micro_batches(idx, 64)[0] is idx


def test_the_part_size_follows_the_budget_and_never_splits_batchnorm():
    model, shard, task = _model(), _shard(), Task("classification", 4)
    cpu = torch.device("cpu")
    per_row = activation_bytes(model, None, task, shard, TrainConfig(), cpu) // 2
    # 3 hidden activations of 256 floats and their GELUs, the logits: about 5 KB a row, weights not counted
    assert 4 * 256 * 4 <= per_row <= 4 * 256 * 4 * 3
    budget = 10 * per_row / 2**20
    cfg = TrainConfig(batch_size=48, activation_budget_mb=budget)
    rows, measured = choose_micro_batch(model, None, task, shard, cfg, cpu)
    assert rows == 10 and measured == per_row
    cfg = TrainConfig(batch_size=8, activation_budget_mb=budget)
    assert choose_micro_batch(model, None, task, shard, cfg, cpu)[0] is None  # the whole batch fits
    assert choose_micro_batch(model, None, task, shard, TrainConfig(micro_batch=5), cpu) == (5, None)
    bn = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    cfg = TrainConfig(activation_budget_mb=1e-6)
    assert choose_micro_batch(bn, None, task, shard, cfg, cpu) == (None, None)
    rng = torch.get_rng_state()
    activation_bytes(nn.Sequential(nn.Dropout(0.5), model), None, task, shard, TrainConfig(), cpu)
    assert torch.equal(rng, torch.get_rng_state())  # the fine-tune's draws are left as they were
