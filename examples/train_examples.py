"""Train the example models from the shipped shards (CPU, fixed seed, about a minute) and save each with
``torch.save(module)`` into examples/models/, with a README of their held-out metrics.

    python examples/train_examples.py

Each model trains on the same 80 % of its shard that ``sapp-compress`` trains on by default
(``Shard.split(0.2, seed=0)``), so the held-out 20 % the tool evaluates on was never seen in training.
All are built from torch.nn layers (and sapp_compress.zoo's classes of them), so the tool loads them with
torch's weights-only unpickler and no --trust-model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from calib_data.shards import load_shard, shipped_shard  # noqa: E402
from sapp_compress import zoo  # noqa: E402
from sapp_compress.engine.training import train_dense  # noqa: E402
from sapp_compress.io.feeds import predict  # noqa: E402
from sapp_compress.io.tasks import infer_task  # noqa: E402

OUT = ROOT / "examples" / "models"

EXAMPLES = {
    # file: (shard, builder, training options)
    "digits_mlp.pt": ("digits", lambda: zoo.mlp([64, 256, 256, 10]),
                      dict(steps=2000, batch_size=64, lr=1e-3)),
    "digits_cnn.pt": ("digits_img", lambda: zoo.ResCNN(1, 64, 2, 10),
                      dict(steps=1500, batch_size=64, lr=2e-3)),
    "ctr_mlp.pt": ("ctr", lambda: zoo.CTRNet(), dict(steps=400, batch_size=256, lr=2e-3)),
    "diabetes_mlp.pt": ("diabetes", lambda: zoo.mlp([10, 64, 64, 1]),
                        dict(steps=1500, batch_size=32, lr=1e-3)),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["# Example models", "",
             "Made by `python examples/train_examples.py` (CPU, seed 0). Metrics are on the held-out 20 % "
             "(`Shard.split(0.2, seed=0)`), which the training never saw.", "",
             "| file | shard | architecture | parameters | held-out metrics |", "|---|---|---|---|---|"]
    cpu = torch.device("cpu")
    for name, (shard_name, build, opts) in EXAMPLES.items():
        train, held = load_shard(shipped_shard(shard_name)).split(0.2, 0)
        torch.manual_seed(0)
        model = build()
        task = infer_task(train.y, predict(model, train.subset(range(2)), cpu))
        train_dense(model, train, task, seed=0, **opts)
        metrics = task.metrics(predict(model, held, cpu), held.y)
        torch.save(model, OUT / name)
        n_params = sum(p.numel() for p in model.parameters())
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "score")
        arch = type(model).__name__ if not isinstance(model, torch.nn.Sequential) else \
            "Sequential MLP " + "-".join(str(m.in_features) for m in model
                                         if isinstance(m, torch.nn.Linear)) + f"-{model[-1].out_features}"
        lines.append(f"| `{name}` | `{shard_name}` | {arch} | {n_params:,} | {shown} |")
        print(f"{name}: {shown}", flush=True)
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
