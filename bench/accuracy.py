"""Accuracy benchmark: every method x block x sparsity x seed on shipped data, same budget, same seeds.

Each cell fine-tunes the same pretrained dense model (trained once per task by ``pretrain``, cached under
bench/results/models/) with one method and writes one JSON line to bench/results/accuracy.jsonl. Cells already
in the file are skipped, so the suite runs in pieces and resumes after an interruption.

    python bench/accuracy.py --tasks digits_mlp --methods sapp,acdc --blocks 8 --sparsities 0.8 --seeds 0,1,2
    python bench/accuracy.py --all          # the full grid (hours on 2 cores)

Tasks (shipped data only):
- ``digits_cnn``: ResCNN (width 64, 2 residual blocks, BatchNorm) on 8x8 handwritten digits.
- ``digits_mlp``: MLP 64-512-512-10 on handwritten digits (a wider MLP than the shipped example).
- ``ctr``: CTRNet (26 categorical fields x 8-d embeddings + 13 dense -> 256 -> 128 -> 1) on the synthetic CTR
  shard, pruning only the first dense layer (``mlp.0``, 256 x 221, padded) as the paper did on Criteo;
  metrics log-loss and AUC.
- ``ctr_trained``: the same, with the dense model pretrained to its best validation log-loss (300 steps at
  3e-2, bench/ctr_pretrain.py) instead of ``ctr``'s 400 steps at 2e-3, which a pruned fine-tune improves on.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time

import harness
import numpy as np
import torch
from harness import RESULTS

from calib_data.shards import load_shard, shipped_shard
from sapp_compress import PruneConfig, TrainConfig, prune, zoo
from sapp_compress.engine.methods import METHODS
from sapp_compress.engine.training import train_dense
from sapp_compress.io.feeds import predict
from sapp_compress.io.tasks import infer_task

TASKS = {
    # name: (shard, builder, pretrain TrainConfig, fine-tune TrainConfig, PruneConfig extras)
    "digits_cnn": ("digits_img", lambda: zoo.ResCNN(1, 64, 2, 10),
                   dict(steps=1500, batch_size=64, lr=2e-3), dict(steps=400, batch_size=64, lr=1e-3), {}),
    "digits_mlp": ("digits", lambda: zoo.mlp([64, 512, 512, 10]),
                   dict(steps=2000, batch_size=64, lr=1e-3), dict(steps=600, batch_size=64, lr=1e-3), {}),
    "ctr": ("ctr", lambda: zoo.CTRNet(),
            dict(steps=400, batch_size=256, lr=2e-3), dict(steps=300, batch_size=256, lr=5e-4),
            {"include": ("mlp.0.weight",), "indivisible": "pad"}),
    # the same CTR model trained to its best held-out log-loss: 300 steps at 3e-2, chosen on a validation
    # slice of the training rows (bench/ctr_pretrain.py); the 400 steps at 2e-3 above leave it far from that
    # (a pruned fine-tune at 1e-2 beat it by 0.04 log-loss: BENCHMARKS.md section 15.7)
    "ctr_trained": ("ctr", lambda: zoo.CTRNet(),
                    dict(steps=300, batch_size=256, lr=3e-2), dict(steps=300, batch_size=256, lr=5e-4),
                    {"include": ("mlp.0.weight",), "indivisible": "pad"}),
}


def pretrain(task: str) -> torch.nn.Module:
    """Train the dense model once (seed 0) on the training split and cache it."""
    path = RESULTS / "models" / f"{task}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    shard_name, build, pre, _, _ = TASKS[task]
    train, _ = load_shard(shipped_shard(shard_name)).split(0.2, 0)
    torch.manual_seed(0)
    model = build()
    out = predict(model, train.subset(np.arange(2)), torch.device("cpu"))
    t = infer_task(train.y, out)
    train_dense(model, train, t, **pre)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return model


def model_digest(model: torch.nn.Module) -> str:
    """A short sha256 of the pretrained weights: rows are comparable only when they fine-tuned the same
    dense model (pretraining is re-run on a machine without the cache, and other CPUs round differently)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def run_cell(task: str, method: str, block: int, sparsity: float, seed: int, options: dict,
             balanced: bool = False, lr_scale: float = 1.0, lr: str | None = None) -> dict:
    shard_name, _, _, ft, extra = TASKS[task]
    ft = {**ft, "lr": lr or ft["lr"] * lr_scale}
    model = pretrain(task)
    shard = load_shard(shipped_shard(shard_name))
    cfg = PruneConfig(block=str(block), sparsity=sparsity, method=method, method_options=options,
                      balanced=balanced, **extra)
    t0 = time.perf_counter()
    res = prune(model, shard, cfg, TrainConfig(**ft, seed=seed, log_every=10**9))
    return {
        "task": task, "dense_model": model_digest(model), "method": method, "block": block,
        "sparsity": sparsity, "seed": seed, "options": {**options, **({"balanced": True} if balanced else {}),
                    **({"lr_scale": lr_scale} if lr_scale != 1.0 else {})}, "dense": res.metrics["dense"],
                    "pruned": res.metrics["pruned_torch"],
        "achieved_block_sparsity": res.achieved_block_sparsity, "layers": len(res.layers),
        "seconds": time.perf_counter() - t0, "lr": res.lr, "lr_source": res.lr_source,
    }


def key(r: dict) -> tuple:
    return (r["task"], r.get("dense_model"), r["method"], r["block"], r["sparsity"], r["seed"],
            json.dumps(r.get("options", {}), sort_keys=True))


def main() -> None:
    ap = harness.parser(__doc__, out="accuracy.jsonl")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(sorted(METHODS)))
    ap.add_argument("--blocks", default="4,8,16")
    ap.add_argument("--sparsities", default="0.7,0.8,0.9,0.95")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--options", default="{}", help="JSON method options (ablations)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--balanced", action="store_true", help="balanced (per block-row) selection")
    ap.add_argument("--lr-scale", type=float, default=1.0,
                    help="multiply the task's fine-tuning learning rate")
    ap.add_argument("--lr", choices=["auto"], help="auto: the tool's default (the probe) instead of the "
                    "task's rate (use another --out: the rows' options do not say it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def done() -> set:
        # re-read before every cell, and claimed (harness.claim): several processes may share one results file
        return {key(r) for r in harness.read_rows(args.out)}

    options = json.loads(args.options)
    key_options = {**options, **({"balanced": True} if args.balanced else {}),
                   **({"lr_scale": args.lr_scale} if args.lr_scale != 1.0 else {})}
    grid = itertools.product(harness.names(args.tasks), harness.names(args.methods),
                             harness.ints(args.blocks), harness.floats(args.sparsities),
                             harness.ints(args.seeds))
    digests = {t: model_digest(pretrain(t)) for t in harness.names(args.tasks)}
    for task, method, block, sparsity, seed in grid:
        k = (task, digests[task], method, block, sparsity, seed, json.dumps(key_options, sort_keys=True))
        if not harness.claim(args.out, k):  # another process runs it
            continue
        try:
            if k in done():  # written already (a resumed sweep, or another process before the claim)
                continue
            row = run_cell(task, method, block, sparsity, seed, options, args.balanced, args.lr_scale,
                           args.lr)
            harness.append_row(args.out, row)
        finally:
            harness.release(args.out, k)
        print(f"{task:10s} {method:9s} B={block:<2d} s={sparsity:.2f} seed={seed} "
              f"score {row['pruned']['score']:.4f} (dense {row['dense']['score']:.4f}) lr {row['lr']:g} "
              f"{row['seconds']:.1f}s",
              flush=True)


if __name__ == "__main__":
    main()
