"""A BERT-base-shaped encoder, block-pruned, in stock ONNX Runtime: dense vs blocked vs auto, whole model.

The model: ``transformers.BertModel`` (hidden 768, intermediate 3072, 12 heads, 4 layers, vocab 1000), random
weights, eval mode, wrapped so that it maps ``(input_ids, attention_mask)`` to ``last_hidden_state``. All six
linear projections of every layer (query, key, value, attention output, intermediate, output) get a random
balanced block mask (B x B blocks, the same number kept in every block-row, sparsity s); the dropped blocks
are zeroed in the torch weights; biases and LayerNorm parameters are random too (BERT's initialisation makes
them all equal, and the exporter would share one tensor among them). Export: ``converters.export_onnx`` (batch
and sequence axes dynamic), conversion: ``converters.convert`` with ``fmt="blocked"`` and ``fmt="auto"``,
the latter once per thread count, with timing inputs of the largest batch (auto times at that batch and at
batch 1).

For every batch size (sequence ``--seq``) and thread count the dense, blocked and auto models run interleaved
in one process (rounds of dense, blocked, auto, ...; median of the rounds); the speedups are ratios of
medians. Printed with every table: the CPU model and flags, the FLOP limit (linear layers' multiply-adds only:
an upper bound), the encoder layers' weight bytes dense vs blocked and the whole file-size ratio, and the node
types in the graphs ONNX Runtime actually runs (``SessionOptions.optimized_model_filepath``).

    python bench/encoder_speed.py [--threads 1,2] [--batches 1,8] [--seq 128] [--rounds 15] [--repeat 2]
                                  [--block 16] [--sparsity 0.8] [--layers 4] [--compare NAME=PATH.onnx]
                                  [--out ...]
"""
from __future__ import annotations

import os
import platform
import time
from collections import Counter
from pathlib import Path

import harness
import numpy as np
import torch
from torch import nn

from converters import LayerBlocks, convert, export_onnx
from converters.runtime import run_onnx

PROJECTIONS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense")


class Encoder(nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state`` of the wrapped ``BertModel``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build(hidden=768, intermediate=3072, heads=12, layers=4, vocab=1000, seed=0) -> Encoder:
    from sapp_compress.io.extras import import_torchvision, require

    import_torchvision()  # transformers imports torchvision, whose compiled ops may not load on a CPU torch
    tf = require("transformers", "the encoder benchmark")
    BertConfig, BertModel = tf.BertConfig, tf.BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                     num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=512)
    model = Encoder(BertModel(cfg, add_pooling_layer=False)).eval()
    with torch.no_grad():  # BERT initialises every bias to 0 and LayerNorm to (1, 0): make them distinct
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.02 + (1.0 if "LayerNorm.weight" in name else 0.0))
    return model


def prune(model: Encoder, block: int, sparsity: float, seed: int = 0) -> list[LayerBlocks]:
    """Zero the dropped blocks of every projection in place; the manifest entries of the pruned weights."""
    rng = np.random.default_rng(seed)
    out = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) and name.endswith(PROJECTIONS)):
            continue
        O, I = mod.weight.shape
        kept = harness.balanced_kept(rng, O // block, I // block, sparsity)
        mask = np.kron(kept, np.ones((block, block), dtype=bool))
        with torch.no_grad():
            mod.weight.mul_(torch.from_numpy(mask.astype(np.float32)))
        w = mod.weight.detach().numpy().astype(np.float32).copy()
        out.append(LayerBlocks(f"{name}.weight", "linear", (O, I), (block, block), kept, weight=w))
    return out


def inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq - seq // 4:] = 0  # some padding, so the mask matters
    return {"input_ids": ids, "attention_mask": mask}


def main() -> None:
    ap = harness.parser(__doc__, out="encoder_speed.json")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=1, help="measure every table this many times")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                    help="also time a saved ONNX model of the same encoder "
                         "(e.g. an earlier converter's output)")
    args = ap.parse_args()
    clock = harness.Clock()
    cpu = harness.machine_line()
    model = build(layers=args.layers)
    manifest = prune(model, args.block, args.sparsity)
    vocab = 1000
    ex = inputs(2, args.seq, vocab)
    dense = export_onnx(model, tuple(torch.from_numpy(v) for v in ex.values()),
                        input_names=list(ex), output_names=["last_hidden_state"])
    batches = harness.ints(args.batches)
    thread_counts = harness.ints(args.threads)
    timing = inputs(max(batches), args.seq, vocab)  # auto times at this batch and at batch 1
    t = time.perf_counter()
    blocked = convert(dense, manifest, fmt="blocked")
    t_blocked = time.perf_counter() - t
    autos, t_auto = {}, {}
    for threads in thread_counts:  # auto measures on the thread count it will run with
        t = time.perf_counter()
        autos[threads] = convert(dense, manifest, fmt="auto", timing_inputs=timing, threads=threads)
        t_auto[threads] = time.perf_counter() - t
    models = {"dense": dense.SerializeToString(), "blocked": blocked.model.SerializeToString(),
              **{f"auto{t}": a.model.SerializeToString() for t, a in autos.items()}}
    extra = dict(c.split("=", 1) for c in args.compare)
    models.update({k: Path(v).read_bytes() for k, v in extra.items()})
    enc_dense = sum(lb.weight.nbytes for lb in manifest)
    enc = {"blocked": sum(o.stored_bytes for o in blocked.layers),
           **{f"auto{t}": sum(o.stored_bytes for o in a.layers) for t, a in autos.items()}}
    limit = harness.flop_limit(model, tuple(torch.from_numpy(v) for v in ex.values()),
                               {lb.name for lb in manifest}, args.sparsity)
    # correctness against the pruned torch model at every measured batch size
    worst = 0.0
    for n in batches:
        feed = inputs(n, args.seq, vocab, seed=1)
        with torch.no_grad():
            ref = model(*(torch.from_numpy(v) for v in feed.values())).numpy()
        for k in models:
            if k != "dense":
                out = run_onnx(models[k], feed, threads=2)[0]
                worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    sizes = {k: len(v) for k, v in models.items()}
    header = [f"CPU: {cpu}",
              f"encoder: BERT-base shape, {args.layers} layers, seq {args.seq}, B = {args.block}, s = "
              f"{args.sparsity}, balanced random masks; FLOP limit (linears) {limit:.2f}x; max |onnx - "
              f"torch| / max|torch| = {worst:.2e}",
              f"encoder layers' weights: dense {enc_dense / 2**20:.1f} MiB, blocked "
              f"{enc['blocked'] / 2**20:.1f} MiB ({enc['blocked'] / enc_dense:.3f}x); whole file vs dense: "
              + ", ".join(f"{k} {sizes[k] / sizes['dense']:.3f}x" for k in models if k != "dense")
              + f"; convert: blocked {t_blocked:.1f} s, "
              + ", ".join(f"auto ({t} thread(s)) {v:.1f} s" for t, v in t_auto.items())]
    for t, a in autos.items():
        header.append(f"auto timed at {max(batches)}x{args.seq} and 1x{args.seq}, {t} thread(s): "
                      f"{dict(Counter(o.fmt for o in a.layers))}")
    print("\n".join(header), flush=True)
    rows = []
    ops = {t: {k: harness.optimized_ops(v, t) for k, v in models.items()
               if k in ("dense", "blocked", f"auto{t}", *extra)}
           for t in thread_counts}
    for rep in range(args.repeat):
        load = os.getloadavg()[0]
        print(f"\nrun {rep + 1} of {args.repeat}, {time.strftime('%H:%M', time.gmtime())} UTC, load average "
              f"{load:.1f}; {cpu}\n"
              "| batch | rows M | threads | dense ms | blocked ms | auto ms | blocked | auto | "
              + "".join(f"{k} ms | {k} | " for k in extra) + "FLOP limit |\n"
              "|---|---|---|---|---|---|---|---|" + "---|---|" * len(extra) + "---|", flush=True)
        for threads in thread_counts:
            for n in batches:
                feed = inputs(n, args.seq, vocab)
                sessions = harness.sessions({k: models[k]
                                             for k in ("dense", "blocked", f"auto{threads}", *extra)},
                                            threads=threads)
                smp = harness.time_sessions(sessions, feed, args.rounds, pause_s=0.02)
                med = {k.rstrip("0123456789") if k.startswith("auto") else k: v
                       for k, v in harness.medians(smp).items()}
                row = {"run": rep, "batch": n, "seq": args.seq, "rows": n * args.seq, "threads": threads,
                       **{f"{k}_ms": med[k] for k in med},
                       "speedup_blocked": med["dense"] / med["blocked"],
                       "speedup_auto": med["dense"] / med["auto"],
                       **{f"speedup_{k}": med["dense"] / med[k] for k in extra}, "load_average": load,
                       "samples_ms": smp}
                rows.append(row)
                print(f"| {n} | {n * args.seq} | {threads} | {med['dense']:.2f} | {med['blocked']:.2f} | "
                      f"{med['auto']:.2f} | {row['speedup_blocked']:.2f}x | {row['speedup_auto']:.2f}x | "
                      + "".join(f"{med[k]:.2f} | {med['dense'] / med[k]:.2f}x | " for k in extra)
                      + f"{limit:.2f}x |", flush=True)
    for threads, per in ops.items():
        for k, c in per.items():
            print(f"ORT-optimized graph, {threads} thread(s), {k}: {sum(c.values())} nodes: "
                  + ", ".join(f"{op} {n}" for op, n in c.items()), flush=True)
    meta = {"cpu": cpu, "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__, "args": vars(args), "utc": clock.span(),
            "flop_limit": limit, "encoder_weight_bytes": {"dense": enc_dense, **enc}, "file_bytes": sizes,
            "max_rel_err": worst, "ort_ops": ops, "auto_layers": {t: [o.to_json() for o in a.layers]
                                                                  for t, a in autos.items()}}
    harness.write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
