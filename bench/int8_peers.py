"""This tool's fp32 and int8 outputs against ONNX Runtime's own int8 of the dense model, on three models.

    python bench/int8_peers.py [--models mlp,resnet18,encoder] [--rounds 9] [--passes 2]

Models (random weights from their constructors, random balanced block masks B = 16, s = 0.8 through the
engine's plan / attach / fold path, no fine-tuning), each timed at the issue's two batches:

- ``mlp``: MLP 1024-4096-4096-1024 with ReLU (``zoo.mlp``), batch 1 and 32;
- ``resnet18``: torchvision resnet18, 224x224, every conv with 16-divisible channels pruned, batch 1 and 8;
- ``encoder``: the BERT-base-shaped encoder of ``bench/encoder_speed.py`` (4 layers, 768 / 3072, all six
  projections per layer pruned), sequences of 128, batch 1 and 8;
- ``mobilenet_v3_small``, ``efficientnet_b0`` (not run by default): as resnet18 (torchvision / timm, 224x224).

Columns, all from the same dense fp32 export (its pruned blocks zero, so the same runtime as dense), timed in
one process, interleaved, 1 ORT thread, medians of ``--rounds`` rounds, ``--passes`` passes with fresh
sessions:

- ``dense``: the fp32 export;
- ``ort_dyn_s8`` / ``ort_dyn_u8``: ``quantize_dynamic`` with QInt8 / QUInt8 weights, per channel;
- ``ort_static``: ``quantize_static``, QDQ, per channel, uint8 activations / int8 weights (7-bit without
  VNNI), MinMax on the calibration rows below;
- ``tool_fp32``: ``converters.convert(fmt="auto")`` timed at the larger batch (what the CLI writes);
- ``tool_int8``: the same with ``quantize="int8"`` and ``calibration_inputs`` (64 random rows, the same rows
  ORT's static quantization calibrates on).

"ORT best" is the fastest ORT int8 model at that batch among those within 5e-2 (max |out - fp32| / max |fp32|)
of the fp32 model: a saturating kernel is not a peer. Raw results: bench/results/int8_peers.json.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time

import harness
import numpy as np
import onnx
import onnxruntime as ort
import torch
from int8_speed import build_pair
from onnxruntime.quantization import QuantFormat, QuantType

from converters import convert, export_onnx, run_onnx
from converters.int8 import default_weight_bits

ERR_OK = 5e-2
CALIB_ROWS = 64
ORT_NAMES = ("ort_dyn_s8", "ort_dyn_u8", "ort_static")


def _mlp():
    _, pruned, manifest = build_pair(16, 0.8)
    rows = lambda n, seed=0: {"x": np.random.default_rng(seed).standard_normal((n, 1024)).astype(np.float32)}  # noqa: E731
    x = rows(2)
    dense = export_onnx(pruned, (torch.from_numpy(x["x"]),), input_names=["x"])
    return dense, manifest, rows, (1, 32), "MLP 1024-4096-4096-1024"


def _convnet(builder: str):
    import real_models_speed as rms

    from sapp_compress.io import adapters
    from sapp_compress.io.export import export_model

    torch.manual_seed(0)
    model, shard, config = getattr(rms, builder)()
    model.eval()
    wrapped, _, _ = adapters.adapt(model, shard)
    _, _, manifest = harness.random_masks(adapters.unwrap(wrapped), rms.BLOCK, rms.SPARSITY, seed=0)
    dense = export_model(wrapped, shard)
    rows = lambda n, seed=0: {  # noqa: E731
        "x": np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)}
    return dense, manifest, rows, (1, 8), config


def _encoder():
    from encoder_speed import build, inputs, prune

    model = build()
    manifest = prune(model, 16, 0.8)
    ex = inputs(2, 128, 1000)
    dense = export_onnx(model, tuple(torch.from_numpy(v) for v in ex.values()), input_names=list(ex),
                        output_names=["last_hidden_state"])
    rows = lambda n, seed=0: inputs(n, 128, 1000, seed=seed)  # noqa: E731
    return dense, manifest, rows, (1, 8), "BERT-base-shaped encoder, 4 layers, sequence 128"


MODELS = {"mlp": _mlp, "resnet18": lambda: _convnet("resnet18"), "encoder": _encoder,
          "mobilenet_v3_small": lambda: _convnet("mobilenet_v3_small"),
          "efficientnet_b0": lambda: _convnet("efficientnet_b0")}


def ort_int8(dense: bytes, kind: str, calib: list[dict]) -> bytes:
    if kind == "ort_static":
        return harness.ort_static(dense, calib, quant_format=QuantFormat.QDQ, per_channel=True,
                                  reduce_range=default_weight_bits() == 7, activation_type=QuantType.QUInt8,
                                  weight_type=QuantType.QInt8)
    return harness.ort_dynamic(dense, per_channel=True,
                               weight_type=QuantType.QInt8 if kind == "ort_dyn_s8" else QuantType.QUInt8)


def run_model(name: str, rounds: int, passes: int, log) -> dict:
    dense, manifest, rows, batches, config = MODELS[name]()
    dense_b = dense.SerializeToString()
    calib_rows = rows(CALIB_ROWS, seed=3)
    calib = [{k: v[i : i + 16] for k, v in calib_rows.items()} for i in range(0, CALIB_ROWS, 16)]
    timing = rows(max(batches), seed=2)
    models, stage_s = {"dense": dense_b}, {}
    for k in ORT_NAMES:
        t = time.time()
        models[k] = ort_int8(dense_b, k, calib)
        stage_s[k] = round(time.time() - t, 1)
    t = time.time()
    fp32 = convert(dense, manifest, fmt="auto", timing_inputs=timing, threads=1)
    models["tool_fp32"], stage_s["tool_fp32"] = fp32.model.SerializeToString(), round(time.time() - t, 1)
    t = time.time()
    i8 = convert(dense, manifest, fmt="auto", quantize="int8", timing_inputs=timing,
                 calibration_inputs=calib_rows, threads=1)
    models["tool_int8"], stage_s["tool_int8"] = i8.model.SerializeToString(), round(time.time() - t, 1)
    formats = {k: {f: sum(lo.fmt == f for lo in r.layers) for f in {lo.fmt for lo in r.layers}}
               for k, r in (("tool_fp32", fp32), ("tool_int8", i8))}
    log(name, "converted:", stage_s, formats)
    check = rows(4, seed=5)
    ref = run_onnx(dense_b, check, threads=1)[0].astype(np.float64)
    err = {k: float(np.abs(run_onnx(v, check, threads=1)[0] - ref).max() / np.abs(ref).max())
           for k, v in models.items()}
    sizes = {k: len(v) for k, v in models.items()}
    res = {"config": config, "batches": list(batches), "bytes": sizes,
           "size_ratio": {k: v / sizes["dense"] for k, v in sizes.items()}, "max_rel_err": err,
           "convert_s": stage_s, "formats": formats, "layers_int8": [lo.to_json() for lo in i8.layers],
           "passes": []}
    for p in range(passes):
        sess = harness.sessions(models, threads=1)
        out = {}
        for n in batches:
            med = harness.medians(harness.time_sessions(sess, rows(n, seed=7), rounds))
            peers = [k for k in ORT_NAMES if err[k] <= ERR_OK]
            best = min(peers, key=lambda k: med[k]) if peers else None
            out[n] = {"median_ms": med, "speedup": {k: med["dense"] / v for k, v in med.items()},
                      "ort_best": best, "int8_vs_ort_best": med[best] / med["tool_int8"] if best else None,
                      "int8_vs_tool_fp32": med["tool_fp32"] / med["tool_int8"]}
            log(name, f"pass {p} batch {n}:", ", ".join(f"{k} {med['dense'] / v:.2f}x"
                                                        for k, v in med.items()),
                f"| int8 vs ORT best ({best}) " + (f"{out[n]['int8_vs_ort_best']:.2f}x" if best else "-"))
        res["passes"].append(out)
        del sess
    return res


def table(results: dict) -> list[str]:
    cols = ["dense", *ORT_NAMES, "tool_fp32", "tool_int8"]
    lines = ["| model | batch | dense ms | " + " | ".join(cols[1:]) +
             " | tool int8 vs ORT best | tool int8 vs tool fp32 |",
             "|---|---|---|" + "---|" * (len(cols) - 1) + "---|---|"]
    for name, r in results.items():
        for n in r["batches"]:
            ps = [p[str(n)] if str(n) in p else p[n] for p in r["passes"]]

            def rng(f):
                vals = [f(p) for p in ps if f(p) is not None]
                if not vals:
                    return "-"
                lo, hi = min(vals), max(vals)
                return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"
            dense_ms = statistics.median(p["median_ms"]["dense"] for p in ps)
            lines.append(f"| {name} | {n} | {dense_ms:.1f} | "
                         + " | ".join(rng(lambda p, k=k: p["speedup"][k]) for k in cols[1:])
                         + f" | {rng(lambda p: p['int8_vs_ort_best'])} "
                           f"({ps[0]['ort_best'] or 'no ORT int8 within 5e-2'}) | "
                         + f"{rng(lambda p: p['int8_vs_tool_fp32'])} |")
        lines.append(f"| {name} | file | | " + " | ".join(f"{r['size_ratio'][k]:.3f}"
                                                          for k in cols[1:]) + " | | |")
        lines.append(f"| {name} | err | | " + " | ".join(f"{r['max_rel_err'][k]:.1e}"
                                                         for k in cols[1:]) + " | | |")
    return lines


def main() -> None:
    ap = harness.parser(__doc__, out="int8_peers.json")
    ap.add_argument("--models", default="mlp,resnet18,encoder")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    clock = harness.Clock()
    log = clock.log
    cpu = harness.cpu_info()
    log("CPU", harness.machine_line())
    results = {}
    for name in harness.names(args.models):
        results[name] = run_model(name, args.rounds, args.passes, log)
        harness.write_results(args.out, {"cpu": cpu, "results": results})  # kept after each model
    lines = table(results)
    print("\n".join(lines))
    meta = {"cpu": cpu, "ort": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": 1, "rounds": args.rounds, "passes": args.passes,
            "utc_end": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "wall_s": clock.elapsed(),
            "command": "python bench/int8_peers.py " + " ".join(sys.argv[1:])}
    harness.write_results(args.out, {"meta": meta, "results": results, "table": lines})
    log("wrote", args.out)


if __name__ == "__main__":
    main()
