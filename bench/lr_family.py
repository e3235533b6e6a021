"""Learning rate by model family: what the attention-family default (1e-4, was 1e-3) does to accuracy.

Runs :func:`sapp_compress.pipeline.compress` (the CLI's path: fine-tune, export, convert, verify in ONNX
Runtime, evaluate the ONNX graph) on the shipped Hugging Face example, ``examples/models/tiny_bert`` (a small
pretrained BertForSequenceClassification) with ``calib_data/text/stdlib_docs.jsonl`` tokenized by
``calib_data.text.text_shard``, at several learning rates with the same data, budget, block, sparsity and
seeds. One JSON line per (lr, seed) goes to bench/results/lr_family.jsonl; rows already there are skipped, so
the run resumes after an interruption. Then it prints mean +- spread per rate. (The family rule it measured,
``default_lr``, was replaced by ``--lr auto``: bench/lr_probe.py.)

    python bench/lr_family.py                                   # 4 rates x 3 seeds, 150 steps each
    python bench/lr_family.py --lrs 1e-3,1e-4 --seeds 0 --steps 50
    python bench/lr_family.py --seeds 0-9                       # more seeds (the table: those seeds)
    python bench/lr_family.py --table                           # only print the table from the results

Data split: the held-out 20 % is the one ``examples/hf/make_tiny_bert.py`` held out when it trained the model
(``numpy.random.default_rng(20261201).permutation``, the first 132 of 660 rows), so the evaluation rows were
never seen by the model's pretraining nor by its tokenizer's vocabulary. The other 528 rows, the fine-tuning
shard here, are the very rows the model was pretrained on.
"""
from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from harness import ROOT

from calib_data.text import text_shard
from sapp_compress.blocks.geometry import plan_layers
from sapp_compress.config import OutputConfig, PruneConfig, TrainConfig
from sapp_compress.io.loading import load_model
from sapp_compress.pipeline import compress

MODEL = ROOT / "examples" / "models" / "tiny_bert"
TEXT = ROOT / "calib_data" / "text" / "stdlib_docs.jsonl"
SPLIT_SEED, HELD_OUT = 20261201, 0.2  # examples/hf/make_tiny_bert.py's SEED and HELD_OUT


def model_digest(path: Path) -> str:
    """A short sha256 of the model's weight file: rows are comparable only for the same pretrained model."""
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:12]


def make_shards(tmp: Path, max_length: int) -> tuple[Path, Path, dict]:
    """Tokenize the whole file once, then write make_tiny_bert.py's split as (train, held-out) shards."""
    full = text_shard(MODEL, TEXT, tmp / "all.npz", label_field="label", max_length=max_length)
    arrays = dict(np.load(full.path))
    n = len(arrays["y"])
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    k = int(round(HELD_OUT * n))
    held, train = np.sort(perm[:k]), np.sort(perm[k:])
    paths = []
    for name, idx in (("train", train), ("eval", held)):
        p = tmp / f"{name}.npz"
        np.savez(p, **{a: v[idx] for a, v in arrays.items()})
        paths.append(p)
    split = {"rows": n, "train": len(train), "eval": len(held), "seed": SPLIT_SEED, "max_length": max_length,
             "eval_sha": hashlib.sha256(held.tobytes()).hexdigest()[:12]}
    return paths[0], paths[1], split


def key(r: dict) -> tuple:
    return (r["dense_model"], r["block"], r["sparsity"], r["steps"], r["batch_size"], r["max_length"],
            r["lr"], r["seed"])


def run_one(train: Path, ev: Path, split: dict, args, lr: float, seed: int, digest: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="lr_family_out_") as out_dir:
        t0 = time.perf_counter()
        rep = compress(
            str(MODEL),
            PruneConfig(block="16", sparsity=args.sparsity),
            TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=seed, device="cpu",
                        log_every=10**9),
            OutputConfig(output=Path(out_dir) / "model.onnx", onnx_format="blocked", threads=args.threads),
            data=train, eval_data=ev,
        )
        seconds = time.perf_counter() - t0
    acc = rep["accuracy"]
    return {
        "model": "tiny_bert", "dense_model": digest, "block": 16, "sparsity": args.sparsity,
        "steps": rep["steps"], "batch_size": args.batch_size, "max_length": split["max_length"],
        "lr": lr, "seed": seed, "split": split,
        "dense": acc["dense"], "pruned_torch": acc["pruned_torch"], "onnx": acc["onnx"],
        "drop": acc["drop"], "drop_torch": acc["dense"] - acc["pruned_torch"],
        "achieved_sparsity": rep["achieved_sparsity"], "warnings": rep["warnings"],
        "lr_source": rep["lr"]["source"], "seconds": round(seconds, 1),
    }


def seeds_of(text: str) -> list[int]:
    """``0,1,2`` or ``0-9`` (or a mix: ``0-2,5``)."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def table(rows: list[dict], args, digest: str) -> None:
    seeds = set(seeds_of(args.seeds))
    rows = [r for r in rows if r["dense_model"] == digest and r["steps"] == args.steps
            and r["batch_size"] == args.batch_size and r["sparsity"] == args.sparsity
            and r["max_length"] == args.max_length and r["seed"] in seeds]
    if not rows:
        print("no results yet")
        return
    by_lr: dict[float, dict[int, dict]] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], {})[r["seed"]] = r
    ref = by_lr.get(1e-3, {})
    dense = sorted({round(r["dense"], 6) for r in rows})
    print(f"\ntiny_bert, B=16, s={args.sparsity}, {args.steps} steps x batch {args.batch_size}, max_length "
          f"{args.max_length}; held-out accuracy ({rows[0]['split']['eval']} rows), dense {dense}")
    print("mean +- sample std over seeds [min..max]; paired: onnx accuracy minus lr 1e-3's, same seed")
    print("| lr | seeds | pruned (torch) | onnx | drop (dense - onnx) | paired vs 1e-3 | s/run |")
    print("|---|---|---|---|---|---|---|")

    def ms(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.4f} +- {sd:.4f} [{min(v):.4f}..{max(v):.4f}]"

    for lr in sorted(by_lr, reverse=True):
        rs = [by_lr[lr][s] for s in sorted(by_lr[lr])]
        paired = [by_lr[lr][s]["onnx"] - ref[s]["onnx"] for s in sorted(by_lr[lr]) if s in ref]
        pd = "-" if lr == 1e-3 or not paired else (
            f"{statistics.mean(paired):+.4f} (ahead {sum(p > 0 for p in paired)}, level "
            f"{sum(p == 0 for p in paired)}, behind {sum(p < 0 for p in paired)} of {len(paired)})")
        print(f"| {lr:g} | {len(rs)} | {ms([r['pruned_torch'] for r in rs])} | "
              f"{ms([r['onnx'] for r in rs])} | {ms([r['drop'] for r in rs])} | {pd} | "
              f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    warned = [(r["lr"], r["seed"]) for r in rows if r["warnings"]]
    if warned:
        print(f"runs with warnings (lr, seed): {warned}")


@torch.no_grad()
def without_fine_tune(ev: Path, sparsity: float) -> None:
    """How much the pruned layers matter to this model: held-out accuracy of the pretrained model with the
    layers compress() prunes (B = 16) block-pruned by magnitude (the top blocks by L2 norm kept, as many per
    layer as the runs keep), and with those layers zeroed, both with no fine-tune at all."""
    arrays = dict(np.load(ev))
    y = arrays.pop("y")
    feed = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def acc(model) -> float:
        return float((model.eval()(**feed).logits.argmax(-1).numpy() == y).mean())

    dense = load_model(MODEL)
    plans, _ = plan_layers(dense, PruneConfig(block="16", sparsity=sparsity))
    print(f"\nwithout fine-tuning ({len(plans)} layers pruned: {', '.join(p.name for p in plans)}):")
    print(f"  dense                         {acc(dense):.4f}")
    for how in ("magnitude blocks", "zeroed"):
        model = load_model(MODEL)
        kept = dropped = 0
        for p in plans:
            w = model.get_parameter(p.name)
            o, i = w.shape
            blocks = w.reshape(o // 16, 16, i // 16, 16).permute(0, 2, 1, 3)  # [rows, cols, 16, 16] view
            norms = blocks.pow(2).sum((-1, -2)).flatten()
            keep = int(round((1 - sparsity) * norms.numel())) if how == "magnitude blocks" else 0
            mask = torch.zeros_like(norms, dtype=torch.bool)
            mask[norms.argsort(descending=True)[:keep]] = True
            blocks.mul_(mask.reshape(o // 16, i // 16, 1, 1))
            kept, dropped = kept + keep, dropped + norms.numel() - keep
        print(f"  {how:29s} {acc(model):.4f}  ({dropped} of {kept + dropped} blocks dropped)")


def main() -> None:
    ap = harness.parser(__doc__, out="lr_family.jsonl")
    ap.add_argument("--lrs", default="1e-3,3e-4,1e-4,3e-5")
    ap.add_argument("--seeds", default="0,1,2", help="0,1,2 or 0-9; the table shows these seeds only")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="no new runs: the no-fine-tune check and the table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    digest = model_digest(MODEL)
    with tempfile.TemporaryDirectory(prefix="lr_family_") as tmp:
        train, ev, split = make_shards(Path(tmp), args.max_length)
        print(f"split: {split}", flush=True)
        without_fine_tune(ev, args.sparsity)
        for lr in harness.floats(args.lrs):
            for seed in seeds_of(args.seeds):
                k = (digest, 16, args.sparsity, args.steps, args.batch_size, args.max_length, lr, seed)
                if args.table or k in {key(r) for r in harness.read_rows(args.out)}:
                    continue
                row = run_one(train, ev, split, args, lr, seed, digest)
                harness.append_row(args.out, row)
                print(f"lr {lr:g} seed {seed}: dense {row['dense']:.4f} torch {row['pruned_torch']:.4f} "
                      f"onnx {row['onnx']:.4f} drop {row['drop']:+.4f} ({row['seconds']:.0f} s)"
                      f"{' WARN ' + '; '.join(row['warnings']) if row['warnings'] else ''}", flush=True)
    table(harness.read_rows(args.out), args, digest)


if __name__ == "__main__":
    main()
