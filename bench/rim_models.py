"""More library models through the whole CLI: do they go through, and is ONNX Runtime's output the pruned
model's?

Each model is a small configuration of a library's own class with random weights from its constructor (Hugging
Face models saved with ``save_pretrained``, torchvision / timm modules with ``torch.save`` and
``--trust-model``), on a random shard of its inputs, through ``sapp-compress`` as a user runs it: 4
fine-tuning steps of SA++, B = 16, s = 0.8, ``--min-blocks 1``, ``--onnx-format blocked``, and again with
``--structure channels`` (``--sparsity`` 0.5 where 0.8 would keep none of a layer's 2 heads, which the CLI
refuses before the fine-tune). Correctness, not accuracy (4 steps on random data) nor speed: exit code, ORT
against the pruned PyTorch model, ONNX size against the dense export. The matrix of section 8 (tests/models)
holds the models the tests run; these are the rest.

    python bench/rim_models.py                       # every model, blocks and channels
    python bench/rim_models.py --models llama_causal,swin_hf --structures channels
    python bench/rim_models.py --quantize int8 --models llama_cls,tv_densenet121
    python bench/rim_models.py --table
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from harness import append_row, machine_line, names, read_rows

import sapp_compress  # noqa: F401 -- torchvision's import hook
from sapp_compress.io.extras import require

VOCAB, SEQ, N = 96, 16, 48


def tokens(labels=3):
    """Random token ids and a mask with padded tails on half the rows (and labels)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(N, SEQ)).astype(np.int64)
    mask = np.ones((N, SEQ), dtype=np.int64)
    mask[: N // 2, SEQ - 4:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["y"] = rng.integers(0, labels, size=N).astype(np.int64)
    return out


def bart_tokens():
    """BART classifies at its <eos> token: one per row, at the end."""
    out = tokens()
    ids = out["input_ids"]
    ids[ids <= 2] = 3
    ids[:, -1] = 2
    out["attention_mask"][:] = 1
    return out


def images(size=32, name="x", labels=None, ch=3):
    """Random images (and labels)."""
    rng = np.random.default_rng(0)
    out = {name: rng.standard_normal((N, ch, size, size)).astype(np.float32)}
    if labels:
        out["y"] = rng.integers(0, labels, size=N).astype(np.int64)
    return out


def hf():
    return require("transformers", "the Hugging Face models")


def tv():
    return require("torchvision", "the torchvision models")


def timm():
    return require("timm", "the timm models")


#: a small decoder / encoder configuration shared by the Hugging Face text models
L = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
         max_position_embeddings=64)

#: name -> () -> (how it is saved: "hf" or "torch", the model, the shard's arrays)
MODELS = {
 "llama_causal": lambda: ("hf", hf().LlamaForCausalLM(hf().LlamaConfig(**L, num_key_value_heads=2)),
                          tokens(None)),
 "llama_cls": lambda: ("hf", hf().LlamaForSequenceClassification(hf().LlamaConfig(**L, num_key_value_heads=2,
                                                                                   num_labels=3,
                                                                                   pad_token_id=0)),
                       tokens()),
 "qwen2_causal": lambda: ("hf", hf().Qwen2ForCausalLM(hf().Qwen2Config(**L, num_key_value_heads=2)),
                          tokens(None)),
 "mistral_cls": lambda: ("hf", hf().MistralForSequenceClassification(
     hf().MistralConfig(**L, num_key_value_heads=2, num_labels=3, pad_token_id=0)), tokens()),
 "phi_causal": lambda: ("hf", hf().PhiForCausalLM(hf().PhiConfig(**L)), tokens(None)),
 "albert_cls": lambda: ("hf", hf().AlbertForSequenceClassification(
     hf().AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=3)), tokens()),
 "deberta_v2_cls": lambda: ("hf", hf().DebertaV2ForSequenceClassification(
     hf().DebertaV2Config(**L, num_labels=3)), tokens()),
 "electra_cls": lambda: ("hf", hf().ElectraForSequenceClassification(
     hf().ElectraConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=3)), tokens()),
 "bart_cls": lambda: ("hf", hf().BartForSequenceClassification(
     hf().BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, max_position_embeddings=64, num_labels=3, eos_token_id=2,
                     pad_token_id=1, bos_token_id=0)),
     bart_tokens()),
 "t5_encoder": lambda: ("hf", hf().T5EncoderModel(hf().T5Config(vocab_size=VOCAB, d_model=64, d_kv=16,
                                                                d_ff=128, num_layers=2, num_heads=4)),
                        tokens(None)),
 "swin_hf": lambda: ("hf", hf().SwinForImageClassification(
     hf().SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                     window_size=4, num_labels=3)), images(name="pixel_values", labels=3)),
 "convnext_hf": lambda: ("hf", hf().ConvNextForImageClassification(
     hf().ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], num_labels=3,
                         image_size=32)), images(name="pixel_values", labels=3)),
 "resnet_hf": lambda: ("hf", hf().ResNetForImageClassification(
     hf().ResNetConfig(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], num_labels=3)),
     images(name="pixel_values", labels=3)),
 "wav2vec2_cls": lambda: ("hf", hf().Wav2Vec2ForSequenceClassification(
     hf().Wav2Vec2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=3)),
     {"input_values": np.random.default_rng(0).standard_normal((N, 1600)).astype(np.float32),
      "y": np.random.default_rng(1).integers(0, 3, N)}),
 "tv_densenet121": lambda: ("torch", tv().models.densenet121(num_classes=10), images()),
 "tv_regnet_y_400mf": lambda: ("torch", tv().models.regnet_y_400mf(num_classes=10), images()),
 "tv_mobilenet_v2": lambda: ("torch", tv().models.mobilenet_v2(num_classes=10), images()),
 "tv_resnext50": lambda: ("torch", tv().models.resnext50_32x4d(num_classes=10), images()),
 "tv_swin_t": lambda: ("torch", tv().models.swin_t(num_classes=10), images(size=64)),
 "tv_convnext_tiny": lambda: ("torch", tv().models.convnext_tiny(num_classes=10), images()),
 "tv_efficientnet_b0": lambda: ("torch", tv().models.efficientnet_b0(num_classes=10), images()),
 "tv_squeezenet": lambda: ("torch", tv().models.squeezenet1_1(num_classes=10), images(size=64)),
 "tv_googlenet": lambda: ("torch", tv().models.googlenet(num_classes=10, aux_logits=False, init_weights=True),
                          images(size=64)),
 "tv_mnasnet": lambda: ("torch", tv().models.mnasnet0_5(num_classes=10), images()),
 "timm_mobilevit": lambda: ("torch", timm().create_model("mobilevit_xxs", num_classes=10), images(size=64)),
 "timm_vit_tiny": lambda: ("torch", timm().create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                                        num_classes=10), images()),
 "timm_resnet50d": lambda: ("torch", timm().create_model("resnet50d", num_classes=10), images()),
 "timm_regnety": lambda: ("torch", timm().create_model("regnety_002", num_classes=10), images()),
 "timm_ghostnet": lambda: ("torch", timm().create_model("ghostnet_050", num_classes=10), images()),
 "timm_deit": lambda: ("torch", timm().create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
                                                    num_classes=10), images()),
 # added 2026-12-04 (BENCHMARKS 8.2)
 "opt_causal": lambda: ("hf", hf().OPTForCausalLM(hf().OPTConfig(vocab_size=VOCAB, hidden_size=64,
                                                                 num_hidden_layers=2, ffn_dim=128,
                                                                 num_attention_heads=4,
                                                                 max_position_embeddings=64,
                                                                 word_embed_proj_dim=64)), tokens(None)),
 "gpt_neox_causal": lambda: ("hf", hf().GPTNeoXForCausalLM(hf().GPTNeoXConfig(**L)), tokens(None)),
 "bloom_cls": lambda: ("hf", hf().BloomForSequenceClassification(
     hf().BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, num_labels=3, pad_token_id=0)),
     tokens()),
 "mobilebert_cls": lambda: ("hf", hf().MobileBertForSequenceClassification(
     hf().MobileBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, embedding_size=32, intra_bottleneck_size=32,
                           true_hidden_size=32, num_feedforward_networks=2, max_position_embeddings=64,
                           num_labels=3)), tokens()),
 "beit_cls": lambda: ("hf", hf().BeitForImageClassification(
     hf().BeitConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, use_relative_position_bias=True, num_labels=3)),
     images(name="pixel_values", labels=3)),
 "tv_mobilenet_v3_large": lambda: ("torch", tv().models.mobilenet_v3_large(num_classes=10), images()),
 "tv_regnet_x_400mf": lambda: ("torch", tv().models.regnet_x_400mf(num_classes=10), images()),
 "timm_levit": lambda: ("torch", timm().create_model("levit_128s", img_size=64, num_classes=10),
                        images(size=64)),
 "timm_poolformer": lambda: ("torch", timm().create_model("poolformer_s12", num_classes=10), images()),
 "timm_edgenext": lambda: ("torch", timm().create_model("edgenext_xx_small", num_classes=10),
                           images(size=64)),
 "timm_mixer": lambda: ("torch", timm().create_model("mixer_s16_224", img_size=64, num_classes=10),
                        images(size=64)),
}

#: the models with 2 heads (or 2 conv groups) in a layer: --structure channels at s = 0.8 keeps none (exit 2
#: by design), so they run at s = 0.5
TWO_HEADS = {"llama_causal", "llama_cls", "qwen2_causal", "mistral_cls", "swin_hf", "tv_regnet_x_400mf"}


def run(name: str, structure: str, tmp: Path, quantize: str = "none") -> dict:
    torch.manual_seed(0)  # the constructors' random weights, the same on every run
    kind, model, arrays = MODELS[name]()
    model.eval()
    if kind == "hf":
        model.save_pretrained(tmp / "model")
        path, extra = tmp / "model", []
    else:
        torch.save(model, tmp / "model.pt")
        path, extra = tmp / "model.pt", ["--trust-model"]
    np.savez(tmp / "shard.npz", **arrays)
    sparsity = "0.5" if structure == "channels" and name in TWO_HEADS else "0.8"
    cmd = ["sapp-compress", str(path), "--data", str(tmp / "shard.npz"), "-o", str(tmp / "m.onnx"),
           "--report", str(tmp / "report.json"), "--block", "16", "--sparsity", sparsity, "--steps", "4",
           "--batch-size", "16", "--min-blocks", "1", "--onnx-format", "blocked", "--structure", structure,
           "--quantize", quantize, *extra]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    rep = json.loads((tmp / "report.json").read_text()) if (tmp / "report.json").exists() else {}
    ver = rep.get("verification") or {}
    left_whole = sorted({line.split(" left whole:")[0].split(": ")[-1] for line in res.stderr.splitlines()
                         if " left whole: " in line})
    return {"model": name, "structure": structure, "quantize": quantize, "sparsity": float(sparsity),
            "exit": res.returncode, "seconds": round(time.perf_counter() - t, 1), "error": rep.get("error"),
            "pruned": len(rep.get("layers") or []), "max_abs_diff": ver.get("max_abs_diff"),
            "passed": ver.get("passed"), "size": (rep["onnx_bytes"] / rep["dense_onnx_bytes"])
            if rep.get("onnx_bytes") else None, "warnings": rep.get("warnings", []), "left_whole": left_whole,
            "machine": machine_line()}


def table(rows: list[dict]) -> None:
    last = {(r["model"], r["structure"], r.get("quantize", "none")): r for r in rows}
    print("| model | structure | exit | pruned layers / families | max abs diff ORT vs torch | size vs dense "
          "| notes |")
    print("|---|---|---|---|---|---|---|")
    for (m, s, q), r in last.items():
        note = "; ".join(w.split(";")[0] for w in r["warnings"] if "collapsed" not in w) or ""
        if r["left_whole"]:
            note = (note + "; " if note else "") + f"{len(r['left_whole'])} families left whole"
        diff = f"{r['max_abs_diff']:.1e}" if r["max_abs_diff"] is not None else "-"
        size = f"{r['size']:.3f}" if r["size"] else "-"
        print(f"| {m} | {s}{' int8' if q == 'int8' else ''}"
              f"{' s=' + str(r['sparsity']) if r['sparsity'] != 0.8 else ''} | {r['exit']} | "
              f"{r['pruned']} | {diff} | {size} | {note or (r['error'] or '')[:80]} |")


def main() -> None:
    ap = harness.parser(__doc__, "rim_models.jsonl")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--structures", default="blocks,channels")
    ap.add_argument("--quantize", default="none", choices=("none", "int8"))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        table(read_rows(args.out))
        return
    for s in names(args.structures):
        for m in names(args.models):
            with tempfile.TemporaryDirectory() as tmp:
                row = run(m, s, Path(tmp), args.quantize)
            append_row(args.out, row)
            print(f"{m} {s}: exit {row['exit']}, {row['pruned']} pruned, diff {row['max_abs_diff']}, "
                  f"size {row['size']}", flush=True)


if __name__ == "__main__":
    main()
