"""int8 on the BERT-base-shaped encoder: this tool's block-sparse int8 against ONNX Runtime's own int8.

The encoder, masks and inputs of ``bench/encoder_speed.py`` (BertModel, hidden 768, intermediate 3072, 12
heads, 4 layers, sequence 128, all six projections per layer pruned with random balanced masks, B = 16,
s = 0.8). Compared in one process, interleaved, 1 ORT thread, medians: the dense fp32 export; ORT's
``quantize_dynamic`` of it (QInt8 and QUInt8 weights, per channel: the user's alternative); this tool's fp32
``blocked`` output; this tool's ``blocked`` with ``quantize="int8"`` (the pruned projections in int8, the rest
fp32). Prints the CPU line, speed-ups over dense fp32 and over ORT's best int8, file sizes, and each model's
max |out - torch| / max |torch| on the same inputs.

    python bench/encoder_int8.py [--batches 1,8] [--rounds 11] [--layers 4]
                                 [--out bench/results/encoder_int8.json]
"""
from __future__ import annotations

import harness
import numpy as np
import torch
from encoder_speed import build, inputs, prune
from onnxruntime.quantization import QuantType

from converters import convert, export_onnx, run_onnx


def main() -> None:
    ap = harness.parser(__doc__, out="encoder_int8.json")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--layers", type=int, default=4, help="encoder layers (4: the study's)")
    args = ap.parse_args()
    clock = harness.Clock()
    cpu = harness.machine_line()
    model = build(layers=args.layers)
    manifest = prune(model, 16, 0.8)
    ex = inputs(2, args.seq, 1000)
    dense = export_onnx(model, tuple(torch.from_numpy(v) for v in ex.values()), input_names=list(ex),
                        output_names=["last_hidden_state"])
    dense_bytes = dense.SerializeToString()
    models = {
        "dense": dense_bytes,
        "ort_int8_s8": harness.ort_dynamic(dense_bytes, weight_type=QuantType.QInt8, per_channel=True),
        "ort_int8_u8": harness.ort_dynamic(dense_bytes, weight_type=QuantType.QUInt8, per_channel=True),
        "blocked": convert(dense, manifest, fmt="blocked").model.SerializeToString(),
        "blocked_int8": convert(dense, manifest, fmt="blocked", quantize="int8").model.SerializeToString(),
    }
    sizes = {k: len(v) for k, v in models.items()}
    feed = inputs(3, args.seq, 1000, seed=1)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(v) for v in feed.values())).numpy()
    err = {k: float(np.abs(run_onnx(v, feed, threads=1)[0] - ref).max() / np.abs(ref).max())
           for k, v in models.items()}
    print(f"CPU: {cpu}\nfile vs dense: " + ", ".join(f"{k} {sizes[k] / sizes['dense']:.3f}x" for k in models)
          + "\nmax |out - torch| / max |torch| (batch 3): " + ", ".join(f"{k} {e:.1e}"
                                                                        for k, e in err.items()))
    rows = []
    print("| batch | dense ms | " + " | ".join(f"{k}" for k in models if k != "dense")
          + " | blocked_int8 vs ORT's best int8 |\n|---|---|" + "---|" * (len(models) - 1) + "---|")
    for n in harness.ints(args.batches):
        f = inputs(n, args.seq, 1000)
        med = harness.medians(harness.time_sessions(harness.sessions(models, threads=1), f, args.rounds,
                                                    pause_s=0.02))
        best_ort = min(med["ort_int8_s8"], med["ort_int8_u8"])
        rows.append({"batch": n, "ms": med, "vs_best_ort_int8": best_ort / med["blocked_int8"]})
        print(f"| {n} | {med['dense']:.1f} | " + " | ".join(f"{med['dense'] / med[k]:.2f}x" for k in models
                                                         if k != "dense")
              + f" | {best_ort / med['blocked_int8']:.2f}x |", flush=True)
    meta = {"cpu": cpu, "utc": clock.span(), "args": vars(args), "file_bytes": sizes, "max_rel_err": err}
    harness.write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
