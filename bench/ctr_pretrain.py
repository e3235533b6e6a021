"""How long and at what rate to pretrain bench/accuracy.py's CTR model: dense training from the same seed at
each (steps, peak rate) of a small grid, scored by log-loss on a validation slice (10 %) of the training rows;
the evaluation rows (the 20 % held out by seed 0) are printed for reference, never used to choose.

    python bench/ctr_pretrain.py            # the grid of BENCHMARKS.md section 15.7
    python bench/ctr_pretrain.py --grid 400:2e-3,300:3e-2

The ``ctr`` task's dense model (400 steps at 2e-3) overfits the training rows quickly at more steps and is far
from the best held-out log-loss a higher rate reaches; ``ctr_trained`` uses the grid's best (300 steps at
3e-2).
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from calib_data.shards import load_shard, shipped_shard
from sapp_compress import zoo
from sapp_compress.engine.training import train_dense
from sapp_compress.io.feeds import predict
from sapp_compress.io.tasks import infer_task

GRID = ("200:2e-3,400:2e-3,800:2e-3,1500:2e-3,3000:2e-3,300:1e-2,500:1e-2,800:1e-2,3000:1e-2,"
        "150:3e-2,200:3e-2,300:3e-2,400:3e-2,600:3e-2,200:1e-1,300:1e-1")


def log_loss(model: torch.nn.Module, task, shard) -> float:
    """The task's own log-loss (``Task.metrics``), as the benchmarks report it."""
    return task.metrics(predict(model, shard, torch.device("cpu")), shard.y)["log_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default=GRID, help="steps:rate pairs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, ev = load_shard(shipped_shard("ctr")).split(0.2, 0)  # bench/accuracy.py's pretraining split
    fit, val = train.split(0.1, 7)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| steps | peak rate | validation log-loss | training log-loss (8000 rows) | evaluation log-loss | "
          "seconds |")
    print("|---|---|---|---|---|---|")
    for pair in args.grid.split(","):
        steps, lr = int(pair.split(":")[0]), float(pair.split(":")[1])
        torch.manual_seed(0)
        model = zoo.CTRNet()
        task = infer_task(train.y, predict(model, train.subset(np.arange(2)), torch.device("cpu")))
        t0 = time.perf_counter()
        train_dense(model, fit, task, steps=steps, batch_size=256, lr=lr)
        print(f"| {steps} | {lr:g} | {log_loss(model, task, val):.4f} "
              f"| {log_loss(model, task, fit.subset(np.arange(8000))):.4f} | {log_loss(model, task, ev):.4f} "
              f"| {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
