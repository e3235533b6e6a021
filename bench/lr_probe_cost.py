"""What ``--lr auto`` costs a user: the wall time of a whole ``prune()`` with the probe against the same run
at the probe's choice fixed (``--lr X``), each in a fresh process, interleaved, medians of ``--repeats``.

bench/lr_probe.py's ``fraction_of_fine_tune`` divides the probe's seconds by the fine-tune's, both measured in
one process where the probe runs first: whatever the first steps of a process pay once (memory the process
touches for the first time, lazy initialisation of kernels) is charged to the probe, and a fine-tune run
without it pays that itself. The *marginal* cost, ``median(auto) - median(fixed)`` over whole runs in fresh
processes, is what the user waits for the probe; it is reported as a fraction of the fixed run's fine-tune
(median), next to the in-process fraction of the same auto runs.

    python bench/lr_probe_cost.py --tasks ctr_trained,planted --methods sapp,magnitude --seeds 0,1,2
                                  --repeats 3

One JSON line per (task, method, seed) in bench/results/lr_probe_cost.jsonl; then the table.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve()


def child(task: str, method: str, seed: int, lr: str) -> None:
    """One whole prune() in this process; prints its timings as one JSON line."""
    import argparse

    import torch

    torch.set_num_threads(1)
    import lr_probe

    from sapp_compress import prune

    args = argparse.Namespace(block=16, sparsity=0.8, probe="{}", train="{}")
    case, cfg, tc, _ = lr_probe.setup(task, method, seed, "auto" if lr == "auto" else "fixed",
                                      "auto" if lr == "auto" else float(lr), args)
    # torch's first optimizer imports torch._dynamo (once)
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    t0 = time.perf_counter()
    res = prune(case.model, case.train, cfg, tc, eval_shard=case.eval)
    wall = time.perf_counter() - t0
    choice = res.lr_choice
    print(json.dumps({"prune_seconds": wall, "fine_tune_seconds": choice.fine_tune_seconds, "lr": res.lr,
                      "probe": choice.to_json().get("probe", {})}))


def _spawn(task: str, method: str, seed: int, lr: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE), "--child", task, method, str(seed), lr],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(task: str, method: str, seed: int, repeats: int) -> dict:
    first = _spawn(task, method, seed, "auto")  # the choice (and a warm-up of the disk cache)
    lr = f"{first['lr']!r}"
    auto, fixed = [], []
    for r in range(repeats):  # interleaved, the order alternating
        for kind in (("auto", "fixed") if r % 2 == 0 else ("fixed", "auto")):
            row = _spawn(task, method, seed, "auto" if kind == "auto" else lr)
            (auto if kind == "auto" else fixed).append(row)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    marginal = med(auto, "prune_seconds") - med(fixed, "prune_seconds")
    return {"task": task, "method": method, "seed": seed, "lr": first["lr"], "repeats": repeats,
            "auto_prune_seconds": [r["prune_seconds"] for r in auto],
            "fixed_prune_seconds": [r["prune_seconds"] for r in fixed],
            "fixed_fine_tune_seconds": [r["fine_tune_seconds"] for r in fixed],
            "in_process_fraction": [r["probe"].get("fraction_of_fine_tune") for r in auto],
            "marginal_seconds": marginal,
            "marginal_fraction": marginal / med(fixed, "fine_tune_seconds")}


def table(rows: list[dict]) -> None:
    print("| task | method | seed | lr | fixed run's fine-tune (s) | auto - fixed, whole run (s) | marginal "
          "/ fine-tune | in-process probe / fine-tune |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        inproc = [f for f in r["in_process_fraction"] if f is not None]
        print(f"| {r['task']} | {r['method']} | {r['seed']} | {r['lr']:g} | "
              f"{statistics.median(r['fixed_fine_tune_seconds']):.2f} | {r['marginal_seconds']:+.3f} | "
              f"{r['marginal_fraction']:.3f} | {statistics.median(inproc):.3f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    ap = harness.parser(__doc__, out="lr_probe_cost.jsonl")
    ap.add_argument("--tasks", default="ctr_trained,planted")
    ap.add_argument("--methods", default="sapp,magnitude")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--table", action="store_true", help="only print the table from the results file")
    args = ap.parse_args()
    if not args.table:
        print(f"machine: {harness.machine_line()}", flush=True)
        for task in harness.names(args.tasks):
            for method in harness.names(args.methods):
                for seed in harness.ints(args.seeds):
                    row = measure(task, method, seed, args.repeats)
                    row["machine"] = harness.machine_line()
                    harness.append_row(args.out, row)
                    print(f"{task} {method} seed {seed}: marginal {row['marginal_seconds']:+.3f} s, "
                          f"{row['marginal_fraction']:.3f} of the fine-tune", flush=True)
    table(harness.read_rows(args.out))


if __name__ == "__main__":
    main()
