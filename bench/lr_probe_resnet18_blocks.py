"""``--lr auto`` on a trained torchvision resnet18 at block sparsity: BatchNorm's running statistics against
batch statistics for scoring the probe's candidates (BENCHMARKS.md section 15.11).

bench/structured_accuracy.py's resnet18 trained on the digits (3 x 32 x 32, its 20 % test split), pruned to
``--sparsity`` of its ``--block`` x ``--block`` blocks by ``--method`` through :func:`sapp_compress.prune`
(what the CLI runs), the default budget (300 steps of 32), ``lr="auto"`` with ``LRProbeConfig.batch_stats``
false (the running statistics) and true (batch statistics). One JSON line per (seed, setting): the probe's
choice, whether it beat a constant prediction, its scores, its share of the fine-tune, and the test accuracy.
Runs already in the results file are skipped.

    python bench/lr_probe_resnet18_blocks.py --seeds 0,1,2 --batch-stats false,true
"""
from __future__ import annotations

import time

import harness
import torch

from calib_data.shards import load_shard
from sapp_compress import PruneConfig, TrainConfig, prune
from sapp_compress.config import LRProbeConfig


def main() -> None:
    ap = harness.parser(__doc__, out="lr_probe_resnet18_blocks.jsonl")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch-stats", default="false,true",
                    help="comma-separated: false (running), true (batch)")
    ap.add_argument("--method", default="sapp")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import structured_accuracy

    path, train_path, test_path = structured_accuracy.digits_resnet18()
    train, test = load_shard(train_path), load_shard(test_path)
    done = {(r["method"], r["block"], r["sparsity"], r["seed"], r["batch_stats"])
            for r in harness.read_rows(args.out)}
    for seed in harness.ints(args.seeds):
        for bs in (x.strip().lower() == "true" for x in args.batch_stats.split(",")):
            if (args.method, args.block, args.sparsity, seed, bs) in done:
                continue
            model = torch.load(path, weights_only=False)
            tc = TrainConfig(seed=seed, lr="auto", log_every=10**9, lr_probe=LRProbeConfig(batch_stats=bs))
            t0 = time.time()
            res = prune(model, train, PruneConfig(block=str(args.block), sparsity=args.sparsity,
                                                  method=args.method),
                        tc, eval_shard=test)
            p = res.lr_choice.to_json()
            row = {"model": path.stem, "method": args.method, "block": args.block, "sparsity": args.sparsity,
                   "seed": seed, "batch_stats": bs, "lr": res.lr,
                   "accuracy": res.metrics["pruned_torch"]["score"],
                   "informative": p["probe"].get("informative"),
                   "fraction": p["probe"].get("fraction_of_fine_tune"), "scores": p["scores"],
                   "seconds": round(time.time() - t0, 1), "machine": harness.machine_line()}
            print(f"seed {seed} batch_stats {bs}: lr {res.lr:g}, accuracy {row['accuracy']:.4f}, "
                  f"informative {row['informative']}", flush=True)
            harness.append_row(args.out, row)


if __name__ == "__main__":
    main()
