"""SA++ training-step overhead over a plain training step of the same model.

Both loops share the data path, optimizer (Adam), loss and gradient clipping; the SA++ loop is the real
``sapp_compress.training.fine_tune`` (mask parametrizations, attention softmax, coupled decay, pruning
events). Runs are interleaved (plain, sapp, plain, sapp, ...) in one process and the ratio of medians of
per-step times is reported, since timings on shared machines drift.

    python bench/step_overhead.py [--device cpu|cuda] [--repeats 7] [--steps 40]
"""
from __future__ import annotations

import copy
import statistics
import time

import harness
import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard
from sapp_compress import PruneConfig, TrainConfig, zoo
from sapp_compress.blocks.geometry import plan_layers
from sapp_compress.engine.methods import METHODS
from sapp_compress.engine.training import BatchPlan, fine_tune
from sapp_compress.granularity import BLOCKS, Plan
from sapp_compress.io.feeds import to_tensors
from sapp_compress.io.tasks import Task


def plain_steps(model, task, shard, cfg, device, steps):
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr or 1e-3)
    batches = BatchPlan(len(shard), cfg.batch_size, cfg.seed)
    model.train()
    for step in range(steps):
        idx = batches(step)
        xs = to_tensors(tuple(x[idx] for x in shard.inputs), device)
        y = to_tensors((shard.y[idx],), device)[0]
        loss = task.loss(model(*xs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def sapp_steps(model, task, shard, cfg, device, steps, block):
    pcfg = PruneConfig(block=block, sparsity=0.8)
    plans, _ = plan_layers(model, pcfg)
    # A long budget and an early stop: the timed steps are steady-state steps (phase boundaries, which
    # reset the optimizer, come every ~10 % of a real budget, not every other step).
    method = METHODS["sapp"](pcfg, Plan(BLOCKS, plans), 100 * steps)
    model.to(device)
    fine_tune(model, None, method, task, shard, cfg, device, 100 * steps, stop=steps)
    if device.type == "cuda":
        torch.cuda.synchronize()


CASES = {
    # name: (model builder, input shape, classes, batch, block)
    "mlp-64-256-256-10 (digits size)": (lambda: zoo.mlp([64, 256, 256, 10]), (64,), 10, 64, "8"),
    "mlp-1024-4096-4096-1024": (lambda: zoo.mlp([1024, 4096, 4096, 1024]), (1024,), 1024, 256, "32"),
    "rescnn-w64 8x8 images": (lambda: zoo.ResCNN(1, 64, 2, 10), (1, 8, 8), 10, 64, "8"),
}


def main() -> None:
    ap = harness.parser(__doc__, out="step_overhead.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, (build, shape, classes, batch, block) in CASES.items():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch * 4, *shape)).astype(np.float32)
        y = rng.integers(0, classes, size=batch * 4).astype(np.int64)
        shard = Shard(inputs=(x,), y=y, source="random")
        task = Task("classification", classes)
        cfg = TrainConfig(steps=args.steps, batch_size=batch, lr=1e-4, log_every=10**9)
        torch.manual_seed(0)
        base = build()
        t_plain, t_sapp = [], []
        for r in range(args.repeats + 1):  # the first round warms up
            m = copy.deepcopy(base).to(device)
            t0 = time.perf_counter()
            plain_steps(m, task, shard, cfg, device, args.steps)
            tp = (time.perf_counter() - t0) / args.steps
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            sapp_steps(m, task, shard, cfg, device, args.steps, block)
            ts = (time.perf_counter() - t0) / args.steps
            if r:
                t_plain.append(tp)
                t_sapp.append(ts)
        mp, ms = statistics.median(t_plain), statistics.median(t_sapp)
        ratios = [s / p for s, p in zip(t_sapp, t_plain)]
        row = {"case": name, "batch": batch, "block": block, "plain_ms": mp * 1e3, "sapp_ms": ms * 1e3,
               "ratio_of_medians": ms / mp, "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows.append(row)
        print(f"{name:34s} plain {mp*1e3:8.2f} ms  sapp {ms*1e3:8.2f} ms  ratio {ms/mp:.3f} "
              f"(per-round {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": harness.machine()["cpu"], "repeats": args.repeats, "steps": args.steps}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    harness.write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
