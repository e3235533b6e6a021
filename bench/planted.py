"""Planted support recovery (the problem of tests/engine/planted.py: a linear teacher 256 -> 128 with 20 % of
its 8x8 blocks non-zero, a student = teacher + dense noise of ``--noise`` x the mean |teacher weight|,
s = 0.8, 560 Adam steps, lr 1e-2, coupled l2 1e-2), for SA++ variants and for the other methods. One JSON
line per method, variant and seed in bench/results/planted.jsonl: the share of the planted blocks among the
kept ones. tests/engine/test_planted.py asserts SA++'s (defaults, noise 30); the rest is measured here
(BENCHMARKS.md section 3).

    python bench/planted.py                      # the default SA++ variants, seeds 0-2, noise 30
    python bench/planted.py --options '{"cycles": 0}' --noise 10
    python bench/planted.py --methods baselines  # every other method at its defaults, seeds 0-2, noise 30
"""
from __future__ import annotations

import json
import sys

import harness
import torch
from harness import ROOT

sys.path.insert(0, str(ROOT / "tests" / "engine"))
from planted import planted_problem, recovery  # noqa: E402 -- tests/engine/planted.py: the recovery test's problem

from sapp_compress import PruneConfig, TrainConfig, prune  # noqa: E402
from sapp_compress.engine.methods import METHODS  # noqa: E402

VARIANTS = ['{}', '{"cycles": 0}', '{"cycles": 1}', '{"cycles": 3}', '{"sparsification": false}',
            '{"revive": "keep"}', '{"score": "effective"}', '{"logit_norm": "element"}',
            '{"logit_norm": "element", "logit_travel": 16.0}', '{"logit_travel": 16.0}']


def run(options: dict, seed: int, noise: float, method: str = "sapp") -> float:
    torch.manual_seed(seed)
    student, shard, planted = planted_problem(seed, noise=noise)
    res = prune(student, shard, PruneConfig(block="8", sparsity=0.8, method=method, min_blocks=1,
                                            method_options=options),
                TrainConfig(steps=560, batch_size=128, lr=1e-2, weight_decay=1e-2, seed=seed, grad_clip=None,
                            log_every=10**9))
    return recovery(res.layers[0].kept, planted)


def main() -> None:
    ap = harness.parser(__doc__, out="planted.jsonl")
    ap.add_argument("--methods", default="sapp",
                    help="comma-separated methods (default: sapp); baselines: every method but sapp")
    ap.add_argument("--options", action="append",
                    help="JSON method options (repeatable; default: VARIANTS for sapp, {} for the others)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--noise", type=float, default=30.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = sorted(set(METHODS) - {"sapp"}) if args.methods == "baselines" else harness.names(args.methods)
    # rows written before --methods are SA++'s
    done = {(r.get("method", "sapp"), r["options"], r["seed"], r["noise"])
            for r in harness.read_rows(args.out)}
    for method in methods:
        for o in args.options or (VARIANTS if method == "sapp" else ["{}"]):
            key_o = json.dumps(json.loads(o), sort_keys=True)
            for seed in harness.ints(args.seeds):
                if (method, key_o, seed, args.noise) in done:
                    continue
                rec = run(json.loads(o), seed, args.noise, method)
                harness.append_row(args.out, {"method": method, "options": key_o, "seed": seed,
                                              "noise": args.noise, "recovered": rec})
                print(f"{method:10s} {key_o:50s} seed {seed} noise {args.noise:g}: {rec:.2f}", flush=True)


if __name__ == "__main__":
    main()
