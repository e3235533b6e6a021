"""Block-sparse ONNX vs dense ONNX in ONNX Runtime on this machine.

Models (balanced masks: every block-row keeps k = round((1 - s) * C) blocks, chosen at random; the
unbalanced rows draw each block-row's count at random with the same mean):

- ``mlp_b32``: MLP 1024-4096-4096-1024 (ReLU), B = 32, s = 0.9, N = 256   (target >= 5x, FLOP limit 10x)
- ``mlp_b16``: the same MLP, B = 16, s = 0.8, N = 32                     (target >= 2.5x, limit 5x)
- ``cnn_b16``: 4 x Conv3x3(256 -> 256, pad 1) + ReLU on 14 x 14, B = 16, s = 0.8, N = 1 (target >= 2.5x)

Each model goes through the real path: ``export_onnx`` (dense) -> ``convert`` with ``blocked`` and with
``auto`` (timed per layer at the benchmark's N and thread count). The dense, blocked and auto sessions are
timed interleaved in one process (rounds of dense, blocked, auto, ...), median of the rounds, for 1 and 2
intra-op threads; ratios are dense / compressed. For ``auto`` every layer's own measured latency is checked
against its dense form (no layer more than 5 % slower). The Transpose count of ORT's optimized graph shows
whether the Transpose pairs between consecutive sparse layers were cancelled.

    python bench/onnx_speed.py [--budget 6] [--quick]

Writes bench/results/onnx_speed.json and bench/README_onnx.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from converters import convert, export_onnx, measure_sparsity  # noqa: E402
from converters.manifest import LayerBlocks, element_mask  # noqa: E402
from converters.runtime import session, time_interleaved  # noqa: E402
from sapp_compress import zoo  # noqa: E402

CASES = {
    "mlp_b32": dict(kind="mlp", block=32, sparsity=0.9, n=256, target=5.0),
    "mlp_b16": dict(kind="mlp", block=16, sparsity=0.8, n=32, target=2.5),
    "cnn_b16": dict(kind="cnn", block=16, sparsity=0.8, n=1, target=2.5),
}


def build(kind: str) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    if kind == "mlp":
        return zoo.mlp([1024, 4096, 4096, 1024]).eval(), lambda n: torch.randn(n, 1024)
    layers = []
    for _ in range(4):
        layers += [nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers).eval(), lambda n: torch.randn(n, 256, 14, 14)


def prune(model: nn.Module, b: int, s: float, balanced: bool, seed: int = 0) -> list[LayerBlocks]:
    rng = np.random.default_rng(seed)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w = m.weight.detach()
        R, C = w.shape[0] // b, w.shape[1] // b
        k = max(1, round((1 - s) * C))
        kept = np.zeros((R, C), dtype=bool)
        for r in range(R):
            kr = k if balanced else int(rng.integers(max(1, k // 2), min(C, 2 * k - k // 2) + 1))
            kept[r, rng.choice(C, kr, replace=False)] = True
        layout = "linear" if isinstance(m, nn.Linear) else "conv_channel"
        lb = LayerBlocks(f"{name}.weight", layout, tuple(w.shape), (b, b), kept)
        with torch.no_grad():
            m.weight.mul_(torch.from_numpy(element_mask(lb)))
        out.append(LayerBlocks(lb.name, layout, lb.weight_shape, lb.block, kept, weight=m.weight.detach().numpy().copy()))
    return out


def optimized_transposes(model: onnx.ModelProto, threads: int) -> int:
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    return sum(n.op_type == "Transpose" for n in opt.graph.node)


def run_case(name: str, spec: dict, balanced: bool, budget: float) -> dict:
    model, make_x = build(spec["kind"])
    layers = prune(model, spec["block"], spec["sparsity"], balanced)
    x = make_x(spec["n"])
    dense = export_onnx(model, (x,))
    feed = {"x": x.numpy()}
    with torch.no_grad():
        ref = model(x).numpy()
    row = {"case": name, "balanced": balanced, "block": spec["block"], "target_sparsity": spec["sparsity"],
           "batch": spec["n"], "target_speedup": spec["target"] if balanced else None,
           "achieved_sparsity": round(1 - sum(lb.n_kept for lb in layers) / sum(lb.n_blocks for lb in layers), 4),
           "threads": {}}
    blocked = convert(dense, layers, fmt="blocked").model
    row["bytes"] = {"dense": dense.ByteSize(), "blocked": blocked.ByteSize()}
    row["measured_sparsity"] = round(measure_sparsity(blocked, layers).overall, 4)
    for threads in (1, 2):
        t0 = time.perf_counter()
        auto = convert(dense, layers, fmt="auto", timing_inputs=feed, threads=threads)
        t_auto = time.perf_counter() - t0
        models = {"dense": dense, "blocked": blocked, "auto": auto.model}
        sessions = {k: session(m, threads=threads) for k, m in models.items()}
        for k, s in sessions.items():
            err = float(np.max(np.abs(s.run(None, feed)[0] - ref)) / np.max(np.abs(ref)))
            if err > 1e-4:
                raise RuntimeError(f"{name} {k}: relative error {err:.3g} against PyTorch")
        lat = time_interleaved(sessions, feed, budget_s=budget, min_rounds=9, max_rounds=200)
        per_layer = [{"layer": lo.name, "fmt": lo.fmt, "latencies_ms": lo.latencies_ms,
                      "vs_dense": round(lo.latencies_ms[lo.fmt] / lo.latencies_ms["dense"], 3)}
                     for lo in auto.layers if lo.latencies_ms]
        row["threads"][str(threads)] = {
            "median_ms": {k: round(v, 4) for k, v in lat.items()},
            "speedup_blocked": round(lat["dense"] / lat["blocked"], 2),
            "speedup_auto": round(lat["dense"] / lat["auto"], 2),
            "auto_convert_s": round(t_auto, 2),
            "auto_layers": per_layer,
            "auto_worst_layer_vs_dense": max((p["vs_dense"] for p in per_layer), default=None),
            "optimized_transposes": {k: optimized_transposes(m, threads) for k, m in models.items()},
        }
        print(name, "balanced" if balanced else "unbalanced", f"{threads}T",
              json.dumps(row["threads"][str(threads)]["median_ms"]),
              "blocked", row["threads"][str(threads)]["speedup_blocked"], "x  auto",
              row["threads"][str(threads)]["speedup_auto"], "x", flush=True)
    return row


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = "?"
    import os
    return {"cpu": model, "cores": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# ONNX speed: block-sparse vs dense in ONNX Runtime",
        "",
        f"Machine: {m['cpu']} ({m['arch']}, {m['cores']} cores), onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, "
        f"torch {m['torch']}; fp32, CPUExecutionProvider. Measured {res['date']}.",
        "",
        f"Command: `{res['command']}`. Dense, blocked and auto models of each case are timed interleaved in one "
        "process (median of rounds); speedup = dense median / compressed median. Masks are balanced (k blocks "
        "per block-row) unless marked unbalanced (random count per block-row, same mean: bucketed graph). "
        "`auto` picks per layer from latencies measured in ORT at the benchmark's batch and threads.",
        "",
        "| case | masks | B | sparsity | N | threads | dense ms | blocked ms | blocked x | auto x | target | "
        "worst auto layer / dense | Transposes after ORT opt (blocked) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        for t, d in r["threads"].items():
            lines.append(
                f"| {r['case']} | {'balanced' if r['balanced'] else 'unbalanced'} | {r['block']} | "
                f"{r['achieved_sparsity']:.3f} | {r['batch']} | {t} | {d['median_ms']['dense']:.3f} | "
                f"{d['median_ms']['blocked']:.3f} | {d['speedup_blocked']:.2f} | {d['speedup_auto']:.2f} | "
                f"{'>= %gx' % r['target_speedup'] if r['target_speedup'] else '-'} | "
                f"{d['auto_worst_layer_vs_dense']} | {d['optimized_transposes']['blocked']} |")
    lines += ["", "File sizes (bytes, dense -> blocked): " + "; ".join(
        f"{r['case']} {'bal' if r['balanced'] else 'unbal'} {r['bytes']['dense']} -> {r['bytes']['blocked']}"
        for r in res["rows"]), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of interleaved timing per case and thread count")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-unbalanced", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx_speed.json"))
    ap.add_argument("--readme", default=str(ROOT / "bench" / "README_onnx.md"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in a.cases.split(","):
        for balanced in (True,) if a.no_unbalanced else (True, False):
            rows.append(run_case(name, CASES[name], balanced, a.budget))
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python bench/onnx_speed.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    Path(a.readme).write_text(markdown(res))


if __name__ == "__main__":
    main()
