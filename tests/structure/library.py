"""Small configurations of library architectures (random weights from their own constructors) for the
structured-pruning tests: each builder returns the model and example inputs, and the families the discovery
must find (name suffix -> (kind, units)), so the tests assert counts, not just "something was found"."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sapp_compress.io.extras import require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from real_models import EncoderClassifier  # noqa: E402

VOCAB, SEQ = 96, 8


class Out(nn.Module):
    """``f(*tensors) -> tensor`` around a library model (keyword inputs, ``ModelOutput``), as the tool's
    adapter makes it; the library model is ``inner``, whose parameter names the families use."""

    def __init__(self, inner: nn.Module, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.inner, self.keys = inner, keys

    def forward(self, *xs):
        out = self.inner(**dict(zip(self.keys, xs))) if self.keys else self.inner(*xs)
        for k in ("logits", "last_hidden_state"):
            if hasattr(out, k):
                return getattr(out, k)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class Built:
    model: nn.Module  # the wrapper
    inputs: tuple[torch.Tensor, ...]
    #: family name -> (kind, units, unit size on the first producer)
    families: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def inner(self) -> nn.Module:
        return self.model.inner if isinstance(self.model, Out) else self.model


def _no_zero_weights(m: nn.Module) -> nn.Module:
    """Give weights that a library initialises to zero (zero-init classifier heads) random values, so a
    change in the model shows in its output."""
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return m


def _ids() -> tuple[torch.Tensor]:
    return (torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0)),)


def _img(size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _layers(template: dict[str, tuple[str, int, int]], n: int) -> dict[str, tuple[str, int, int]]:
    return {k.format(i=i): v for i in range(n) for k, v in template.items()}


def bert():
    t = require("transformers", "the tests")
    m = t.BertForSequenceClassification(t.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128,
                                                     num_labels=3))
    fams = _layers({"bert.encoder.layer.{i}.attention (heads)": ("heads", 4, 16),
                    "bert.encoder.layer.{i} (neurons)": ("neurons", 128, 1)}, 2)
    fams["bert.pooler.dense (neurons)"] = ("neurons", 64, 1)
    return Built(Out(m.eval(), ("input_ids",)), _ids(), fams)


def bert_features():
    """``BertModel`` itself, for feature extraction: the pooler is not used by ``last_hidden_state``."""
    t = require("transformers", "the tests")
    m = t.BertModel(t.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128))
    return Built(Out(m.eval(), ("input_ids",)), _ids(),
                 _layers({"encoder.layer.{i}.attention (heads)": ("heads", 4, 16),
                          "encoder.layer.{i} (neurons)": ("neurons", 128, 1)}, 2))


def distilbert():
    t = require("transformers", "the tests")
    m = t.DistilBertForSequenceClassification(t.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2,
                                                                 n_heads=4, hidden_dim=128, num_labels=3))
    fams = _layers({"distilbert.transformer.layer.{i}.attention (heads)": ("heads", 4, 16),
                    "distilbert.transformer.layer.{i}.ffn (neurons)": ("neurons", 128, 1)}, 2)
    fams["pre_classifier (neurons)"] = ("neurons", 64, 1)  # pre_classifier -> classifier
    return Built(Out(m.eval(), ("input_ids",)), _ids(), fams)


def roberta():
    t = require("transformers", "the tests")
    m = t.RobertaForSequenceClassification(t.RobertaConfig(vocab_size=VOCAB, hidden_size=64,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=128, num_labels=3,
                                                           pad_token_id=0))
    fams = _layers({"roberta.encoder.layer.{i}.attention (heads)": ("heads", 4, 16),
                    "roberta.encoder.layer.{i} (neurons)": ("neurons", 128, 1)}, 2)
    fams["classifier (neurons)"] = ("neurons", 64, 1)
    return Built(Out(m.eval(), ("input_ids",)), _ids(), fams)


def gpt2():
    t = require("transformers", "the tests")
    m = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB + 1, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    # c_attn's fused q/k/v, split by head: 16 rows of each of q, k and v per head (its bias first: 48)
    return Built(Out(m.eval(), ("input_ids",)), _ids(),
                 _layers({"transformer.h.{i}.attn (heads)": ("heads", 4, 48),
                          "transformer.h.{i}.mlp (neurons)": ("neurons", 256, 1)}, 2))


def llama_gqa():
    """Grouped-query attention (8 query heads, 2 kv heads) and a SwiGLU MLP: a unit is a kv head with its 4
    query heads (8 rows of k: the first producer), a neuron is a row of gate and up and a column of down."""
    t = require("transformers", "the tests")
    m = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                         head_dim=8))
    return Built(Out(m.eval(), ("input_ids",)), _ids(),
                 _layers({"model.layers.{i}.self_attn (heads)": ("heads", 2, 8),
                          "model.layers.{i}.mlp (neurons)": ("neurons", 96, 1)}, 2))


def vit():
    t = require("transformers", "the tests")
    m = t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, num_labels=5))
    return Built(Out(m.eval(), ("pixel_values",)), _img(),
                 _layers({"vit.layers.{i}.attention (heads)": ("heads", 4, 16),
                          "vit.layers.{i}.mlp (neurons)": ("neurons", 128, 1)}, 2))


def swin():
    """Window attention with a relative position bias (a table of positions x heads, added to the scores as
    the attention mask; the shifted windows add a data mask to it): a head is its rows of q, k and v, its
    columns of o and its column of the bias table."""
    t = require("transformers", "the tests")
    m = t.SwinForImageClassification(t.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                                                  num_heads=[2, 4], window_size=4, num_labels=3))
    fams = {}
    for s, (heads, width) in enumerate(((2, 128), (4, 256))):
        fams.update(_layers({
            f"swin.encoder.layers.{s}.blocks.{{i}}.attention (heads)": ("heads", heads, 16),
            f"swin.encoder.layers.{s}.blocks.{{i}}.mlp (neurons)": ("neurons", width, 1)}, 2))
    return Built(Out(_no_zero_weights(m).eval(), ("pixel_values",)), _img(), fams)


def t5_encoder():
    """T5's relative attention bias (an embedding of position buckets x heads) is computed in the first block
    and added to every block's scores: a head index is one unit across all blocks, with its bias column."""
    t = require("transformers", "the tests")
    m = t.T5EncoderModel(t.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                    num_heads=4))
    fams = {"encoder.block (heads)": ("heads", 4, 16)}
    fams.update(_layers({"encoder.block.{i}.layer.1.DenseReluDense (neurons)": ("neurons", 128, 1)}, 2))
    return Built(Out(m.eval(), ("input_ids",)), _ids(), fams)


def whisper_encoder():
    t = require("transformers", "the tests")
    cfg = t.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=1,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    m = t.WhisperForAudioClassification(cfg)
    fams = _layers({"encoder.layers.{i}.self_attn (heads)": ("heads", 4, 16),
                    "encoder.layers.{i} (neurons)": ("neurons", 128, 1)}, 2)
    fams["encoder (channels)"] = ("channels", 64, 1)  # conv1 -> GELU -> conv2 of the audio front end
    fams["projector (neurons)"] = ("neurons", 256, 1)  # projector -> classifier
    gen = torch.Generator().manual_seed(0)
    return Built(Out(m.eval(), ("input_features",)), (torch.randn(2, 16, 64, generator=gen),), fams)


def resnet18():
    tv = require("torchvision", "the tests")
    fams = {f"layer{s}.{b} (channels)": ("channels", w, 1) for s, w in zip((1, 2, 3, 4), (64, 128, 256, 512))
            for b in (0, 1)}
    return Built(tv.models.resnet18(num_classes=10).eval(), _img(), fams)


def mobilenet_v3_small():
    tv = require("torchvision", "the tests")
    return Built(tv.models.mobilenet_v3_small(num_classes=10).eval(), _img(), {})


def torchvision_vit():
    tv = require("torchvision", "the tests")
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                    mlp_dim=128, num_classes=10)
    return Built(_no_zero_weights(m).eval(), _img(),
                 _layers({"encoder.layers.encoder_layer_{i}.self_attention (heads)": ("heads", 4, 48),
                          "encoder.layers.encoder_layer_{i}.mlp (neurons)": ("neurons", 128, 1)}, 2))


def deit():
    timm = require("timm", "the tests")
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
    return Built(m.eval(), _img(), _layers({"blocks.{i}.attn (heads)": ("heads", 3, 192),
                                            "blocks.{i}.mlp (neurons)": ("neurons", 768, 1)}, 2))


def convnext():
    timm = require("timm", "the tests")
    m = _no_zero_weights(timm.create_model("convnext_atto", num_classes=10))
    with torch.no_grad():  # its layer scales start at 1e-6, which hides what the blocks do from the output
        for n, p in m.named_parameters():
            if n.endswith("gamma"):
                p.fill_(1.0)
    return Built(m.eval(), _img(), {})


def efficientnet():
    timm = require("timm", "the tests")
    return Built(timm.create_model("efficientnet_b0", num_classes=10).eval(), _img(), {})


def transformer_encoder():
    return Built(EncoderClassifier().eval(), _ids(),
                 _layers({"encoder.layers.{i}.self_attn (heads)": ("heads", 4, 48),
                          "encoder.layers.{i} (neurons)": ("neurons", 128, 1)}, 2))


def mlp():
    m = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 3))
    return Built(m.eval(), (torch.randn(2, 12, generator=torch.Generator().manual_seed(0)),),
                 {"0 (neurons)": ("neurons", 32, 1), "2 (neurons)": ("neurons", 16, 1)})


#: name -> (builder, the optional library it needs, the number of families it must have)
MODELS: dict[str, tuple[Callable[[], Built], str | None, int]] = {
    "bert": (bert, "transformers", 5), "bert_features": (bert_features, "transformers", 4),
    "distilbert": (distilbert, "transformers", 5), "roberta": (roberta, "transformers", 5),
    "gpt2": (gpt2, "transformers", 4), "llama_gqa": (llama_gqa, "transformers", 4),
    "vit": (vit, "transformers", 4), "whisper_encoder": (whisper_encoder, "transformers", 6),
    "swin": (swin, "transformers", 8), "t5_encoder": (t5_encoder, "transformers", 3),
    "resnet18": (resnet18, "torchvision", 8),
    # mobilenet_v3_small: 11 inverted-residual expansions, 9 squeeze-excite bottlenecks, its stem (no residual
    # after it), its last conv's channels and the classifier's hidden layer
    "mobilenet_v3_small": (mobilenet_v3_small, "torchvision", 23),
    "torchvision_vit": (torchvision_vit, "torchvision", 4), "deit": (deit, "timm", 4),
    # one MLP per block (2 + 2 + 6 + 2); its depthwise convs are residual
    "convnext_atto": (convnext, "timm", 12),
    "efficientnet_b0": (efficientnet, "timm", 35),
    "transformer_encoder": (transformer_encoder, None, 4), "mlp": (mlp, None, 2),
}
