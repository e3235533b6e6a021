"""resnet18's structured int8 against ORT's static QDQ int8 of the dense model, and whether leaving the stem
conv (3 input channels, 7x7) in fp32 helps either.

    python bench/resnet18_int8_stem.py [--rounds 15]

torchvision resnet18 (random weights), 224x224; the tool's ``--structure channels --sparsity 0.5`` path
(families discovered, a random half of each removed); both graphs quantized by ``converters.qdq.quantize_qdq``
(static QDQ, per channel, calibrated on 32 random rows) with every conv, and with every conv but the stem.
Timed interleaved in one process, 1 ORT thread, medians. Results: bench/results/resnet18_int8_stem.json;
BENCHMARKS.md 16.2.
"""
from __future__ import annotations

import copy
import sys

import numpy as np
import structured_speed as S
import torch
from harness import machine, machine_line, parser, write_results

from converters.qdq import QDQ_OPS, calibration_batches, quantize_qdq  # noqa: E402
from converters.runtime import session, time_interleaved  # noqa: E402
from sapp_compress.structure import discover  # noqa: E402
from sapp_compress.structure.remove import random_keep, remove  # noqa: E402


def main() -> None:
    ap = parser(__doc__, "resnet18_int8_stem.json")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(sys.argv[1:])
    torch.set_num_threads(1)
    print(f"machine: {machine_line()}; ONNX Runtime 1 thread", flush=True)
    torch.manual_seed(0)
    model, rows, _ = S.resnet18()
    ex = rows(2)
    plan = discover(model, tuple(torch.from_numpy(v) for v in ex.values()), names_from=model)
    small = copy.deepcopy(model)
    remove(small, plan, random_keep(plan.families, {f.name: f.kept_units(0.5) for f in plan.families},
                                    seed=0))
    calib = calibration_batches({"x": np.concatenate([rows(8, seed=s)["x"] for s in range(4)])})
    graphs = {}
    for name, m in (("dense", model), ("small", small)):
        p = S._export(m, ex)
        nodes = [n.name for n in p.graph.node if n.op_type in QDQ_OPS]
        stem = next(n.name for n in p.graph.node if n.op_type == "Conv")
        graphs[f"{name}_fp32"] = p
        graphs[f"{name}_int8"] = quantize_qdq(p, calib, nodes, weight_bits=8)
        graphs[f"{name}_int8_fp32_stem"] = quantize_qdq(p, calib, [n for n in nodes if n != stem],
                                                        weight_bits=8)
    sess = {k: session(v, threads=1, spin=False) for k, v in graphs.items()}
    res = {"machine": machine(), "rounds": a.rounds, "batches": {}}
    for b in (1, 8):
        ms = time_interleaved(sess, rows(b, seed=3), min_rounds=a.rounds, max_rounds=a.rounds, budget_s=0.0)
        row = {"ms": {k: round(v, 3) for k, v in ms.items()},
               "int8_vs_ort_int8": ms["dense_int8"] / ms["small_int8"],
               "fp32_stem_vs_int8_stem": {k: ms[f"{k}_int8"] / ms[f"{k}_int8_fp32_stem"]
                                          for k in ("dense", "small")}}
        res["batches"][str(b)] = row
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
        print(f"   structured int8 vs ORT's static int8 of the dense model: {row['int8_vs_ort_int8']:.2f}x; "
              f"stem left fp32 (speed vs all int8): dense {row['fp32_stem_vs_int8_stem']['dense']:.2f}x, "
              f"small {row['fp32_stem_vs_int8_stem']['small']:.2f}x", flush=True)
    write_results(a.out, res)


if __name__ == "__main__":
    main()
