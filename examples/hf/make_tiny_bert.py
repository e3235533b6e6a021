"""Make examples/models/tiny_bert: a small, real (weak) BERT text classifier saved with save_pretrained.

    python examples/hf/make_tiny_bert.py            # one to two minutes on a CPU; needs transformers

It learns a BERT WordPiece tokenizer (the tokenizers library's normaliser and pre-tokeniser, a vocabulary of
1500 learned by frequency merges with a fixed tie-break) from calib_data/text/stdlib_docs.jsonl (first
paragraphs of Python standard-library docstrings, labelled by module family: see calib_data/README.md),
builds a BertForSequenceClassification (hidden 64, 2 layers, 4 heads, intermediate 128, 128 positions, one
class per label, id2label/label2id set), trains it briefly on 80 % of the rows, reports accuracy on the other
20 %, and saves model (safetensors) and tokenizer to examples/models/tiny_bert/. Seeds are fixed and the
algorithms deterministic: a rerun on the same machine writes the same bytes (float sums may differ in the last
bits across CPUs and thread counts).
"""
from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "calib_data" / "text" / "stdlib_docs.jsonl"
OUT = ROOT / "examples" / "models" / "tiny_bert"
SEED = 20261201
VOCAB = 1500
MAX_LENGTH = 64  # training length; the model has 128 positions and the docstrings are short
EPOCHS, BATCH, LR = 20, 32, 2e-3
HELD_OUT = 0.2
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def hide_broken_torchvision() -> None:
    """transformers imports torchvision whenever it is installed; one built for another torch fails to import
    and takes every transformers model down with it. BERT needs no torchvision, so a broken one is hidden."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 -- any failure: RuntimeError (missing C ops), ImportError, OSError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # find_spec -> None: transformers sees it as absent


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def read_rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def learn_vocab(words: Counter, size: int) -> list[str]:
    """A WordPiece vocabulary of ``size`` tokens learned by frequency merges, as tokenizers' WordPieceTrainer
    learns it, but with ties broken by the pair's text (that trainer breaks them in hash-map order, so its
    vocabulary changes from run to run).

    Words start as characters (``w``, ``##o``, ``##r``, ``##d``); each step merges the most frequent adjacent
    pair (``w`` + ``##o`` -> ``wo``, ``##o`` + ``##r`` -> ``##or``) until the vocabulary has ``size`` tokens.
    """
    split = {w: tuple([w[0]] + ["##" + c for c in w[1:]]) for w in words}
    vocab = {sym for syms in split.values() for sym in syms}
    while len(vocab) + len(SPECIAL) < size:
        pairs: Counter = Counter()
        for w, syms in split.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b[2:]
        vocab.add(merged)
        for w, syms in split.items():
            if a in syms:
                split[w] = _merge(syms, a, b, merged)
    return SPECIAL + sorted(vocab)


def _merge(syms: tuple[str, ...], a: str, b: str, merged: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(syms):
        if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(syms[i])
            i += 1
    return tuple(out)


def train_tokenizer(texts: list[str], size: int = VOCAB):
    """A lower-casing BERT WordPiece tokenizer with a vocabulary of ``size`` learned from ``texts`` (split
    into words by the tokenizers library's BERT normaliser and pre-tokeniser, the ones the tokenizer itself
    uses)."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    vocab = learn_vocab(words, size)
    return BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True,
                         model_max_length=128)


SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def bert_config(vocab_size: int, labels: list[str], pad_id: int, sizes: dict | None = None):
    """A BertConfig with 128 positions, one class per label (id2label/label2id set) and ``sizes`` (hidden,
    layers, heads, intermediate: tiny_bert's by default)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, **(sizes or SIZES), max_position_embeddings=128,
                      type_vocab_size=2, pad_token_id=pad_id, num_labels=len(labels),
                      id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})


def build_model(vocab_size: int, labels: list[str], pad_id: int, sizes: dict | None = None):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(bert_config(vocab_size, labels, pad_id, sizes))


def encode(tok, rows: list[dict], label2id: dict[str, int]) -> dict[str, torch.Tensor]:
    enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=MAX_LENGTH,
              return_tensors="pt")
    return {**enc, "labels": torch.tensor([label2id[r["label"]] for r in rows])}


@torch.no_grad()
def accuracy(model, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return float((logits.argmax(-1) == batch["labels"]).float().mean())


def train(model, data: dict[str, torch.Tensor]) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    n = len(data["labels"])
    steps = EPOCHS * ((n + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(BATCH):
            loss = model(**{k: v[idx] for k, v in data.items()}).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1}/{EPOCHS}: train loss {total / n:.3f}", flush=True)


def main() -> None:
    hide_broken_torchvision()
    seed_everything(SEED)
    t0 = time.time()
    rows = read_rows()
    perm = np.random.default_rng(SEED).permutation(len(rows))
    k = int(round(HELD_OUT * len(rows)))
    train_rows, held_rows = [rows[i] for i in perm[k:]], [rows[i] for i in perm[:k]]
    labels = sorted({r["label"] for r in rows})
    tok = train_tokenizer([r["text"] for r in train_rows])
    model = build_model(len(tok), labels, tok.pad_token_id)
    label2id = model.config.label2id
    train_data, held_data = encode(tok, train_rows, label2id), encode(tok, held_rows, label2id)
    train(model, train_data)
    acc_train, acc_held = accuracy(model, train_data), accuracy(model, held_data)
    print(f"accuracy: train {acc_train:.3f}, held-out {acc_held:.3f} ({len(held_rows)} rows, "
          f"chance {1 / len(labels):.3f}); {time.time() - t0:.0f} s")
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)  # model.safetensors + config.json
    tok.save_pretrained(OUT)
    params = sum(p.numel() for p in model.parameters())
    (OUT / "README.md").write_text(
        "# tiny_bert\n\n"
        "A small BERT text classifier for sapp-compress's examples and tests, made by "
        "`examples/hf/make_tiny_bert.py` (a `save_pretrained` directory: `config.json`, `model.safetensors`, "
        "`tokenizer.json`, `tokenizer_config.json`).\n\n"
        f"- BertForSequenceClassification: hidden 64, 2 layers, 4 heads, intermediate 128, 128 positions, "
        f"vocabulary {len(tok)} (WordPiece, lower-cased, trained on the same text), {params:,} parameters.\n"
        f"- Task: which family of Python standard-library modules a docstring's first paragraph comes from "
        f"({', '.join(labels)}); data `calib_data/text/stdlib_docs.jsonl` (PSF License).\n"
        f"- Trained {EPOCHS} epochs on {len(train_rows)} rows; accuracy {acc_train:.3f} on them and "
        f"{acc_held:.3f} on {len(held_rows)} held-out rows (chance {1 / len(labels):.3f}): a real but weak "
        "classifier, meant for trying the tool, not for use.\n"
        "- Licence: Apache-2.0 (this project's); the training text is under the PSF License.\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
