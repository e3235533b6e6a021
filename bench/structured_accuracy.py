"""Accuracy of structured pruning on trained models: SA++ against the baselines on whole heads, neurons and
channels, the ONNX that is written, several seeds.

    python bench/structured_accuracy.py [--models text_bert,digits_cnn] [--methods sapp,magnitude]
        [--seeds 0,1,2] [--sparsity 0.5] [--resume]

Each run is the whole pipeline (``sapp_compress.pipeline.compress``) with ``--structure channels`` at the
given sparsity and the default budget and learning rate, on the model's shipped training shard, evaluated on
its held-out shard; the score is the written ONNX model's accuracy there. Models:

- ``text_bert``: the trained BERT text classifier shipped in ``examples/models`` (see its README), with the
  shards made from its corpus by ``sapp-compress-shard`` (``--text-train`` / ``--text-test``);
- ``digits_cnn``: the shipped digits CNN (a residual CNN) on ``calib_data/digits_img.npz`` (held-out 20 %).

Rows are appended to ``bench/results/structured_accuracy.jsonl`` as they finish (``--resume`` skips those
already there); the summary (mean and spread per model and method) goes to ``structured_accuracy.json``.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import RESULTS, append_row, machine, machine_line, parser, read_rows, write_results

from sapp_compress.config import PruneConfig, TrainConfig  # noqa: E402
from sapp_compress.pipeline import OutputConfig, compress  # noqa: E402

ROOT = harness.ROOT


def model_source(name: str, args) -> tuple[Path, Path, Path | None, dict]:
    """(model path, training shard, evaluation shard or None, extra options)."""
    if name == "digits_cnn":
        return ROOT / "examples" / "models" / "digits_cnn.pt", ROOT / "calib_data" / "digits_img.npz", None, {}
    if name == "text_bert":
        return Path(args.text_model), Path(args.text_train), Path(args.text_test), {}
    raise SystemExit(f"unknown model {name!r}")


def run(name: str, method: str, seed: int, sparsity: float, args, tmp: Path) -> dict:
    path, train, test, extra = model_source(name, args)
    prune_cfg = PruneConfig(block="8", sparsity=sparsity, method=method, structure="channels")
    train_cfg = TrainConfig(seed=seed, **({"steps": args.steps} if args.steps else {}))
    out = OutputConfig(output=tmp / "m.onnx", report=tmp / "r.json", threads=1, **extra)
    t0 = time.perf_counter()
    rep = compress(path, prune_cfg, train_cfg, out, data=train, eval_data=test)
    return {"model": name, "method": method, "seed": seed, "sparsity": sparsity, "dense": rep["accuracy"]["dense"],
            "pruned_torch": rep["accuracy"]["pruned_torch"], "onnx": rep["accuracy"]["onnx"],
            "drop": rep["accuracy"]["drop"], "steps": rep["steps"], "lr": rep["lr"],
            "parameters": rep["structure"]["parameters"], "seconds": round(time.perf_counter() - t0, 1)}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in sorted({(r["model"], r["sparsity"], r["method"]) for r in rows}):
        rs = [r for r in rows if (r["model"], r["sparsity"], r["method"]) == key]
        acc = [r["onnx"] for r in rs]
        out[f"{key[0]} s{key[1]} {key[2]}"] = {
            "dense": rs[0]["dense"], "onnx_mean": statistics.mean(acc), "onnx_min": min(acc), "onnx_max": max(acc),
            "seeds": [r["seed"] for r in rs], "onnx": acc, "params": rs[0]["parameters"]}
    return out


def main() -> None:
    ap = parser(__doc__, "structured_accuracy.json")
    ap.add_argument("--models", default="text_bert,digits_cnn", type=harness.names)
    ap.add_argument("--methods", default="sapp,magnitude", type=harness.names)
    ap.add_argument("--seeds", default="0,1,2", type=harness.ints)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=None, help="override the default budget (for a quick look)")
    ap.add_argument("--text-model", default=str(ROOT / "examples" / "models" / "stdlib_bert"))
    ap.add_argument("--text-train", default=str(RESULTS / "tmp" / "text_train.npz"))
    ap.add_argument("--text-test", default=str(RESULTS / "tmp" / "text_test.npz"))
    ap.add_argument("--rows", default=str(RESULTS / "structured_accuracy.jsonl"))
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(sys.argv[1:])
    print(f"machine: {machine_line()}", flush=True)
    done = {(r["model"], r["method"], r["seed"], r["sparsity"]) for r in read_rows(a.rows)} if a.resume else set()
    with tempfile.TemporaryDirectory(prefix="sapp_acc_") as d:
        for name in a.models:
            for seed in a.seeds:
                for method in a.methods:
                    if (name, method, seed, a.sparsity) in done:
                        continue
                    row = run(name, method, seed, a.sparsity, a, Path(d))
                    append_row(a.rows, row)
                    print(f"{name} {method} seed {seed}: dense {row['dense']:.4f} onnx {row['onnx']:.4f} "
                          f"({row['seconds']} s)", flush=True)
    rows = [r for r in read_rows(a.rows) if r["sparsity"] == a.sparsity]
    write_results(a.out, {"machine": machine(), "summary": summarise(rows)})
    for k, v in summarise(rows).items():
        print(f"{k}: dense {v['dense']:.4f}, onnx {v['onnx_mean']:.4f} [{v['onnx_min']:.4f}, {v['onnx_max']:.4f}]")


if __name__ == "__main__":
    main()
