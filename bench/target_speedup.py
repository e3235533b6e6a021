"""``--target-speedup X`` on realistic shapes: does the measured speed-up land in [X, 1.25 X]?

    python bench/target_speedup.py [--models encoder,resnet18] [--targets 2,3] [--batch 8] [--steps 30]
        [--quantize int8 --out bench/results/target_speedup_int8.json]

Each run is the whole pipeline (``sapp_compress.pipeline.compress``: latency table, allocation at the first
and last sparsify phase, fine-tune, export, the measured check and its corrective round), fp32, 1 ONNX Runtime
thread, at the serving batch ``--batch``, on random weights (the speed does not depend on the values) with a
random shard, distilled from the dense model for ``--steps`` steps:

- ``encoder``: transformers' ``BertModel``, BERT-base-shaped (hidden 768, 12 heads, FFN 3072), 4 layers,
  sequence 128;
- ``resnet18``: torchvision resnet18 at 224x224.

Each row: target, predicted and measured speed-up, the rounds (a corrective round is the second), the widths,
and the time the latency table and the allocations took. Results: bench/results/target_speedup.json.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import harness
import numpy as np
import torch
from harness import machine, machine_line, parser, write_results

from sapp_compress.config import (  # noqa: E402
    OutputConfig,  # noqa: E402
    PruneConfig,
    TrainConfig,
)
from sapp_compress.io.extras import require  # noqa: E402
from sapp_compress.pipeline import compress


def encoder(tmp: Path) -> tuple[Path, dict, bool]:
    t = require("transformers", "the encoder")
    cfg = t.BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=4,
                       vocab_size=30522, max_position_embeddings=512)
    torch.manual_seed(0)
    t.BertModel(cfg).eval().save_pretrained(tmp / "encoder")
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(1, 30000, size=(96, 128)).astype(np.int64),
            "attention_mask": np.ones((96, 128), dtype=np.int64)}
    return tmp / "encoder", data, False


def resnet18(tmp: Path) -> tuple[Path, dict, bool]:
    tv = require("torchvision", "resnet18")
    torch.manual_seed(0)
    torch.save(tv.models.resnet18(num_classes=1000).eval(), tmp / "resnet18.pt")
    data = {"x": np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)}
    return tmp / "resnet18.pt", data, True


MODELS = {"encoder": encoder, "resnet18": resnet18}


def run(name: str, target: float, batch: int, steps: int, tmp: Path, quantize: str = "none") -> dict:
    path, data, trust = MODELS[name](tmp)
    np.savez(tmp / f"{name}.npz", **data)
    prune_cfg = PruneConfig(block="8", sparsity=0.5, structure="channels", target_speedup=target)
    train_cfg = TrainConfig(steps=steps, batch_size=8)
    out = OutputConfig(output=tmp / f"{name}.onnx", report=tmp / f"{name}.json", export_batch_size=batch,
                       threads=1, accept_missed_target=True, quantize=quantize)
    rep = compress(path, prune_cfg, train_cfg, out, data=tmp / f"{name}.npz", trust_model=trust)
    t = rep["target_speedup"]
    row = {"model": name, "target": target, "batch": batch, "quantize": quantize, "predicted": t["predicted"],
           "measured": t["measured"], "vs_ort_int8": t.get("vs_ort_int8"),
           "in_range": target <= t["measured"] <= 1.25 * target,
           "rounds": [{k: r[k] for k in ("round", "measured", "predicted", "ms", "widths")}
                      for r in t["rounds"]],
           "allocations": t["allocations"],
           "table_seconds": rep["timings"].get("latency_table"),
           "allocation_seconds": rep["timings"].get("allocation"),
           "parameters": rep["structure"]["parameters"]}
    vs = f", {t['vs_ort_int8']:.2f}x ORT's int8" if t.get("vs_ort_int8") else ""
    print(f"{name} X={target:g} {quantize} batch {batch}: predicted {t['predicted']:.2f}x, "
          f"measured {t['measured']:.2f}x{vs} ({len(t['rounds'])} round(s)); table {row['table_seconds']}s, "
          f"allocations {row['allocation_seconds']}s", flush=True)
    return row


def main() -> None:
    ap = parser(__doc__, "target_speedup.json")
    ap.add_argument("--models", default="encoder,resnet18", type=harness.names)
    ap.add_argument("--targets", default="2,3", type=harness.floats)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quantize", default="none", choices=("none", "int8"),
                    help="int8: the table and X are for the int8 graph against dense fp32; the row also "
                         "gives the speed-up against ONNX Runtime's own int8 of the dense model")
    a = ap.parse_args(sys.argv[1:])
    print(f"machine: {machine_line()}; ONNX Runtime 1 thread", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sapp_target_") as d:
        for name in a.models:
            for target in a.targets:
                rows.append(run(name, target, a.batch, a.steps, Path(d), a.quantize))
    write_results(a.out, {"machine": machine(), "rows": rows})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
