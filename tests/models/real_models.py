"""Small configurations of real library architectures (random weights from their own constructors), and
shards that fit them: the matrix the real-models tests run through the whole pipeline.

Each builder returns a :class:`Case`: the model source (a ``save_pretrained`` directory for Hugging Face, a
``torch.save(module)`` file, with ``--trust-model``, for the others), the shard's arrays, extra CLI arguments,
and the model object itself (for the tests' own count of what should be pruned).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

VOCAB, SEQ, N = 96, 16, 48


@dataclass
class Case:
    path: Path
    arrays: dict[str, np.ndarray]
    args: list[str] = field(default_factory=list)
    model: nn.Module | None = None


def _tokens(seed: int = 0, labels: int | None = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(N, SEQ)).astype(np.int64)
    mask = np.ones((N, SEQ), dtype=np.int64)
    mask[: N // 2, SEQ - 4:] = 0  # padded tails on half the rows
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["y"] = rng.integers(0, labels, size=N).astype(np.int64)
    return out


def _images(seed: int = 0, size: int = 32, name: str = "x",
            labels: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {name: rng.standard_normal((N, 3, size, size)).astype(np.float32)}
    if labels:
        out["y"] = rng.integers(0, labels, size=N).astype(np.int64)
    return out


def _transformers():
    from sapp_compress.io.extras import require

    return require("transformers", "the Hugging Face cases")


def _hf(tmp: Path, name: str, model, arrays, args=()) -> Case:
    model.eval()
    model.save_pretrained(tmp / name)
    return Case(tmp / name, arrays, list(args), model)


def _torch(tmp: Path, name: str, model: nn.Module, arrays, args=()) -> Case:
    torch.save(model.eval(), tmp / f"{name}.pt")
    return Case(tmp / f"{name}.pt", arrays, ["--trust-model", *args], model)


def bert(tmp):
    t = _transformers()
    BertConfig, BertForSequenceClassification = t.BertConfig, t.BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return _hf(tmp, "bert", BertForSequenceClassification(cfg), _tokens())


def distilbert(tmp):
    t = _transformers()
    DistilBertConfig, DistilBertForSequenceClassification = \
        t.DistilBertConfig, t.DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                           max_position_embeddings=64, num_labels=3)
    return _hf(tmp, "distilbert", DistilBertForSequenceClassification(cfg), _tokens())


def roberta(tmp):
    t = _transformers()
    RobertaConfig, RobertaForSequenceClassification = t.RobertaConfig, t.RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    return _hf(tmp, "roberta", RobertaForSequenceClassification(cfg), _tokens())


def gpt2(tmp):
    t = _transformers()
    GPT2Config, GPT2LMHeadModel = t.GPT2Config, t.GPT2LMHeadModel

    # 97 rows: indivisible
    cfg = GPT2Config(vocab_size=VOCAB + 1, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return _hf(tmp, "gpt2", GPT2LMHeadModel(cfg), _tokens(labels=None))


def vit(tmp):
    t = _transformers()
    ViTConfig, ViTForImageClassification = t.ViTConfig, t.ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=5)
    return _hf(tmp, "vit", ViTForImageClassification(cfg), _images(name="pixel_values", labels=5))


def resnet18(tmp):
    from sapp_compress.io.extras import require

    tv = require("torchvision", "the resnet18 case")
    return _torch(tmp, "resnet18", tv.models.resnet18(num_classes=10), _images(labels=10))


def mobilenet_v3_small(tmp):
    from sapp_compress.io.extras import require

    tv = require("torchvision", "the mobilenet case")
    m = tv.models.mobilenet_v3_small(num_classes=10)
    return _torch(tmp, "mobilenet_v3_small", m, _images(labels=10), ["--balanced"])


def torchvision_vit(tmp):
    """torchvision's VisionTransformer: nn.MultiheadAttention (fused in_proj_weight) inside a real library."""
    from sapp_compress.io.extras import require

    tv = require("torchvision", "the torchvision ViT case")
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                    mlp_dim=128, num_classes=10)
    return _torch(tmp, "tv_vit", m, _images(labels=10))


def convnext(tmp):
    from sapp_compress.io.extras import require

    timm = require("timm", "the convnext case")
    m = timm.create_model("convnext_atto", num_classes=10)
    return _torch(tmp, "convnext", m, _images(labels=10))


def efficientnet(tmp):
    from sapp_compress.io.extras import require

    timm = require("timm", "the efficientnet case")
    m = timm.create_model("efficientnet_b0", num_classes=10)
    # balanced: an output channel whose whole block-row is pruned has zero variance under the next
    # BatchNorm in training mode, whose 1/sqrt(eps) then blows the gradient up (random weights, few steps)
    return _torch(tmp, "efficientnet", m, _images(labels=10), ["--balanced"])


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder(batch_first=True)`` over embedded tokens, mean-pooled, a linear head."""

    def __init__(self, vocab: int = VOCAB, d: int = 64, heads: int = 4, ff: int = 128, layers: int = 2,
                 classes: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.tok(x)).mean(1))


def transformer_encoder(tmp):
    t = _tokens()
    return _torch(tmp, "encoder", EncoderClassifier(), {"x": t["input_ids"], "y": t["y"]})


#: name -> builder(tmp_path) -> Case
MODELS = {f.__name__: f for f in (bert, distilbert, roberta, gpt2, vit, resnet18, mobilenet_v3_small,
                                  convnext, efficientnet, transformer_encoder, torchvision_vit)}
