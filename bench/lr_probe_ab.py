"""The lr probe alone, two designs interleaved in one process: its seconds and steps per design (A/B timing).

A structured run of bench/structured_accuracy.py's digits resnet18 (``--structure channels``) through
``compress``, stopped after the probe (:func:`lr_probe._probe_only`'s trick), with the candidates' first program
step shared (``shared``, the default since 2026-12-04) and run by every candidate (``own``); the order alternates.

    python bench/lr_probe_ab.py --repeats 3
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import harness

sys.path.insert(0, str(harness.ROOT / "tests" / "engine"))
import sapp_compress.api as api  # noqa: E402
from sapp_compress import lr_probe  # noqa: E402
from sapp_compress.config import PruneConfig, TrainConfig  # noqa: E402
from sapp_compress.pipeline import OutputConfig, compress  # noqa: E402


class _Stop(Exception):
    pass


def probe_once(design: str, method: str, seed: int, tmp: Path) -> dict:
    import structured_accuracy

    path, train, test = structured_accuracy.digits_resnet18()
    seen = {}
    real_choose, real_fine_tune, real_warm = api.choose_lr, api.fine_tune, lr_probe._Runner.__dict__["warm_start"]

    def choose(*a, **k):
        seen["lr"] = real_choose(*a, **k)
        raise _Stop

    api.choose_lr = choose
    if design == "own":
        lr_probe._Runner.warm_start = staticmethod(lambda cfg: False)
    try:
        compress(path, PruneConfig(block="8", sparsity=0.5, method=method, structure="channels"),
                 TrainConfig(seed=seed), OutputConfig(output=tmp / "m.onnx", report=tmp / "r.json", threads=1),
                 data=train, eval_data=test, trust_model=True)
    except _Stop:
        pass
    finally:
        api.choose_lr, api.fine_tune, lr_probe._Runner.warm_start = real_choose, real_fine_tune, real_warm
    res = seen["lr"]
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
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for design in (("shared", "own") if r % 2 == 0 else ("own", "shared")):
                row = probe_once(design, args.method, args.seed, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"model": "digits_resnet18", "method": args.method, "seed": args.seed, "machine": harness.machine_line(),
           "runs": rows}
    for d in ("shared", "own"):
        mine = [r for r in rows if r["design"] == d]
        out[d] = {"median_seconds": statistics.median(r["seconds"] for r in mine), "steps": mine[0]["steps"],
                  "lr": mine[0]["lr"]}
    harness.append_row(args.out, out)
    print(json.dumps({d: out[d] for d in ("shared", "own")}))


if __name__ == "__main__":
    main()
