"""The lr probe alone, two designs interleaved in one process: its seconds and steps per design (A/B timing).

bench/lr_probe.py's ``digits_resnet18`` task (bench/structured_accuracy.py's resnet18, ``--structure channels
--sparsity 0.5``), stopped after the probe (bench/lr_probe.py's ``_probe_only``), with the candidates' first
program step shared (``shared``, the default since 2026-12-04) and run by every candidate (``own``); the order
alternates.

    python bench/lr_probe_ab.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics

import harness
import lr_probe as bench_probe
import torch

from sapp_compress.engine.lr_probe import runner as lr_probe


def probe_once(design: str, method: str, seed: int) -> dict:
    args = argparse.Namespace(block=8, sparsity=0.5, probe="{}", train="{}")
    case, cfg, tc, _ = bench_probe.setup("digits_resnet18", method, seed, "probe", "auto", args)
    real_warm = lr_probe.Runner.warm_start
    if design == "own":
        lr_probe.Runner.warm_start = lambda self: False
    try:
        res = bench_probe._probe_only(case, cfg, tc)
    finally:
        lr_probe.Runner.warm_start = real_warm
    return {"design": design, "lr": res.value, "steps": res.steps, "seconds": res.seconds,
            "digest": res.digest()}


def main() -> None:
    ap = harness.parser(__doc__, out="lr_probe_ab.jsonl")
    ap.add_argument("--method", default="sapp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {harness.machine_line()}", flush=True)
    rows = []
    for r in range(args.repeats):
        for design in (("shared", "own") if r % 2 == 0 else ("own", "shared")):
            rows.append(probe_once(design, args.method, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    out = {"model": "digits_resnet18", "method": args.method, "seed": args.seed,
           "machine": harness.machine_line(), "runs": rows}
    for d in ("shared", "own"):
        mine = [r for r in rows if r["design"] == d]
        out[d] = {"median_seconds": statistics.median(r["seconds"] for r in mine), "steps": mine[0]["steps"],
                  "lr": mine[0]["lr"]}
    harness.append_row(args.out, out)
    print(json.dumps({d: out[d] for d in ("shared", "own")}))


if __name__ == "__main__":
    main()
