"""Accuracy of structured pruning on trained models: SA++ against the baselines on whole heads, neurons and
channels, the ONNX that is written, several seeds.

    python bench/structured_accuracy.py [--models text_bert,digits_cnn] [--methods sapp,magnitude]
        [--seeds 0,1,2] [--sparsity 0.5] [--resume]

Each run is the whole pipeline (``sapp_compress.pipeline.compress``) with ``--structure channels`` at the
given sparsity and the default budget and learning rate, on the model's shipped training shard, evaluated on
its held-out shard; the score is the written ONNX model's accuracy there. Models:

- ``text_bert``: the trained BERT text classifier shipped in ``examples/models`` (see its README), with the
  shards made from its corpus by ``sapp-compress-shard`` (``--text-train`` / ``--text-test``);
- ``digits_cnn``: the shipped digits CNN (a residual CNN) on ``calib_data/digits_img.npz`` (held-out 20 %);
- ``digits_resnet18``: torchvision's resnet18 (its own constructor, 10 classes) trained here on the shipped
  digits images, upsampled (nearest) to 3x32x32, on a fixed 80 % split, evaluated on the other 20 % (360
  images). Made on first use by :func:`digits_resnet18` (about a minute on one core, deterministic) and cached
  under ``bench/results/models/`` and ``bench/results/tmp/``: no weights are shipped or downloaded.

Rows are appended to ``bench/results/structured_accuracy.jsonl`` as they finish (``--resume`` skips those
already there); the summary (mean and spread per model and method) goes to ``structured_accuracy.json``.

``--latency-aware``: for each seed, the uniform run's written model is timed against the dense one (serving
batch ``--batch``, 1 thread, interleaved) and the same method is run again with ``--target-speedup`` set to
that measured speed-up; both models' ONNX accuracy and measured speed-ups go to
``bench/results/latency_aware.jsonl`` (the latency-aware allocation against the uniform sparsity at the same
measured speed-up).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
from harness import RESULTS, append_row, machine, machine_line, parser, read_rows, write_results

from sapp_compress.config import (  # noqa: E402
    OutputConfig,  # noqa: E402
    PruneConfig,
    TrainConfig,
)
from sapp_compress.pipeline import compress

ROOT = harness.ROOT


def digits_resnet18(size: int = 32, epochs: int = 12) -> tuple[Path, Path, Path]:
    """torchvision resnet18 trained on the shipped digits (upsampled to 3 x size x size): (model, train,
    test)."""
    import torch
    import torch.nn.functional as F

    from sapp_compress.io.extras import require

    model_path = RESULTS / "models" / f"digits_resnet18_{size}.pt"
    train, test = RESULTS / "tmp" / f"digits{size}_train.npz", RESULTS / "tmp" / f"digits{size}_test.npz"
    if model_path.exists() and train.exists() and test.exists():
        return model_path, train, test
    d = np.load(ROOT / "calib_data" / "digits_img.npz")
    x = F.interpolate(torch.from_numpy(d["x"]), size=(size, size), mode="nearest").repeat(1, 3, 1, 1)
    x = ((x - 0.5) / 0.5).numpy().astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    np.savez(train, x=x[order[:cut]], y=d["y"][order[:cut]])
    np.savez(test, x=x[order[cut:]], y=d["y"][order[cut:]])
    tv = require("torchvision", "digits_resnet18")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    xt, yt = torch.from_numpy(x[order[:cut]]), torch.from_numpy(d["y"][order[:cut]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * ((cut + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(cut, generator=g).split(64):
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[order[cut:]])).argmax(1).numpy() == d["y"][order[cut:]]).mean()
    print(f"digits_resnet18: trained {epochs} epochs, held-out accuracy {acc:.4f}", flush=True)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, model_path)
    return model_path, train, test


def model_source(name: str, args) -> tuple[Path, Path, Path | None, dict]:
    """(model path, training shard, evaluation shard or None, extra options)."""
    if name == "digits_cnn":
        return (ROOT / "examples" / "models" / "digits_cnn.pt", ROOT / "calib_data" / "digits_img.npz", None,
                {})
    if name == "digits_resnet18":
        return (*digits_resnet18(), {})
    if name == "text_bert":
        return Path(args.text_model), Path(args.text_train), Path(args.text_test), {}
    raise SystemExit(f"unknown model {name!r}")


def run(name: str, method: str, seed: int, sparsity: float, args, tmp: Path, target: float | None = None,
        batch: int = 1) -> dict:
    path, train, test, extra = model_source(name, args)
    prune_cfg = PruneConfig(block="8", sparsity=sparsity, method=method, structure="channels",
                            target_speedup=target)
    train_cfg = TrainConfig(seed=seed, **({"steps": args.steps} if args.steps else {}))
    out = OutputConfig(output=tmp / "m.onnx", report=tmp / "r.json", threads=1, export_batch_size=batch,
                       accept_missed_target=True, **extra)
    t0 = time.perf_counter()
    rep = compress(path, prune_cfg, train_cfg, out, data=train, eval_data=test, trust_model=True)
    return {"model": name, "method": method, "seed": seed, "sparsity": sparsity,
            "dense": rep["accuracy"]["dense"], "pruned_torch": rep["accuracy"]["pruned_torch"],
            "onnx": rep["accuracy"]["onnx"], "drop": rep["accuracy"]["drop"], "steps": rep["steps"],
            "lr": rep["lr"], "parameters": rep["structure"]["parameters"],
            "seconds": round(time.perf_counter() - t0, 1),
            "widths": {row["name"]: row["kept_units"] for row in rep["layers"]},
            "target_speedup": rep.get("target_speedup", {}).get("measured") if target else None}


def measured_speedup(name: str, onnx_path: Path, args) -> float:
    """The written model against the dense export, at the serving batch, 1 thread, interleaved."""
    import copy

    import onnx

    from calib_data.shards import load_shard
    from converters.latency import model_ms
    from sapp_compress.io import adapters
    from sapp_compress.io.export import export_model
    from sapp_compress.io.loading import load_model

    path, train, _, _ = model_source(name, args)
    shard = load_shard(train)
    dense, _, _ = adapters.adapt(copy.deepcopy(load_model(path, trust=True)).eval(), shard)
    feed = {n: np.ascontiguousarray(np.asarray(x[:args.batch])).astype(
        np.float32 if np.issubdtype(np.asarray(x[:1]).dtype, np.floating) else np.int64)
        for n, x in zip(shard.names, shard.inputs)}
    ms = model_ms({"dense": export_model(dense, shard), "pruned": onnx.load(str(onnx_path))}, feed, threads=1)
    return ms["dense"] / ms["pruned"]


def latency_aware(args, tmp: Path) -> None:
    rows_path = RESULTS / "latency_aware.jsonl"
    for name in args.models:
        for seed in args.seeds:
            for method in args.methods:
                uni = run(name, method, seed, args.sparsity, args, tmp, batch=args.batch)
                if not any((r["model"], r["method"], r["seed"], r["sparsity"]) ==
                           (name, method, seed, args.sparsity) for r in read_rows(args.rows)):
                    append_row(args.rows, uni)  # the uniform run is also a row of the accuracy table
                y = measured_speedup(name, tmp / "m.onnx", args)
                lat = run(name, method, seed, args.sparsity, args, tmp, target=round(y, 3), batch=args.batch)
                row = {"model": name, "method": method, "seed": seed, "batch": args.batch,
                       "sparsity": args.sparsity, "dense": uni["dense"],
                       "uniform": {"onnx": uni["onnx"], "speedup": y, "widths": uni["widths"]},
                       "latency_aware": {"onnx": lat["onnx"], "speedup": lat["target_speedup"],
                                         "widths": lat["widths"], "target": round(y, 3)}}
                append_row(rows_path, row)
                print(f"{name} {method} seed {seed}: uniform {uni['onnx']:.4f} at {y:.2f}x; latency-aware "
                      f"{lat['onnx']:.4f} at {lat['target_speedup']:.2f}x", flush=True)


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in sorted({(r["model"], r["sparsity"], r["method"]) for r in rows}):
        rs = [r for r in rows if (r["model"], r["sparsity"], r["method"]) == key]
        acc = [r["onnx"] for r in rs]
        out[f"{key[0]} s{key[1]} {key[2]}"] = {
            "dense": rs[0]["dense"], "onnx_mean": statistics.mean(acc), "onnx_min": min(acc),
            "onnx_max": max(acc), "seeds": [r["seed"] for r in rs], "onnx": acc,
            "params": rs[0]["parameters"]}
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
    ap.add_argument("--rows", default=str(RESULTS / "structured_accuracy.jsonl"),
                    help="one JSON line per run; with --rows elsewhere and no --out, the summary goes beside "
                         "it")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--latency-aware", action="store_true")
    ap.add_argument("--batch", type=int, default=8, help="the serving batch of --latency-aware")
    a = ap.parse_args(sys.argv[1:])
    own_out = any(v.split("=")[0] == "--out" for v in sys.argv[1:])
    if not own_out and Path(a.rows) != RESULTS / "structured_accuracy.jsonl":
        a.out = str(Path(a.rows).with_suffix(".json"))  # never overwrite the default summary with other rows
    print(f"machine: {machine_line()}", flush=True)
    if a.latency_aware:
        with tempfile.TemporaryDirectory(prefix="sapp_lat_") as d:
            latency_aware(a, Path(d))
        return
    done = {(r["model"], r["method"], r["seed"], r["sparsity"])
            for r in read_rows(a.rows)} if a.resume else set()
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
        print(f"{k}: dense {v['dense']:.4f}, onnx {v['onnx_mean']:.4f} [{v['onnx_min']:.4f}, "
              f"{v['onnx_max']:.4f}]")


if __name__ == "__main__":
    main()
