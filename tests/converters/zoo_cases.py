"""The converter zoo: six architectures with block-pruned weights, built without training.

Masks are random per layer (balanced: k blocks in every block-row; free: k blocks anywhere), applied through
the engine's own plan/attach/fold path so the manifest is the one the CLI would produce.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sapp_compress import PruneConfig, zoo
from sapp_compress.blocks.geometry import plan_layers
from sapp_compress.blocks.masks import attach, fold
from sapp_compress.engine.methods import select_top_k


def _randomise_bn(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, so that folding BN into a conv really rescales its weight."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


CASES = {
    # name: (builder, example inputs builder, PruneConfig extras)
    "mlp": (lambda: zoo.mlp([64, 128, 128, 10]), lambda n, g: (torch.randn(n, 64, generator=g),), {}),
    "rescnn_bn": (lambda: zoo.ResCNN(3, 32, 2, 10),
                  lambda n, g: (torch.randn(n, 3, 12, 12, generator=g),), {}),
    "dscnn": (lambda: zoo.DSCNN(3, (32, 64, 64), 10),
              lambda n, g: (torch.randn(n, 3, 12, 12, generator=g),), {}),
    "ctr": (lambda: zoo.CTRNet(n_cat=26, vocab_per_field=20, n_dense=14, emb_dim=8, hidden=(64, 32)),
            lambda n, g: (torch.randint(0, 20, (n, 26), generator=g), torch.randn(n, 14, generator=g)), {}),
    "transformer": (lambda: zoo.TransformerClassifier(vocab=64, d_model=64, n_heads=4, dim_ff=128,
                                                      n_layers=2),
                    lambda n, g: (torch.randint(0, 64, (n, 16), generator=g),), {}),
    "cnn1d": (lambda: zoo.CNN1d(8, (32, 64, 64), 5), lambda n, g: (torch.randn(n, 8, 40, generator=g),), {}),
    "mlp_rect": (lambda: zoo.mlp([64, 128, 128, 10]), lambda n, g: (torch.randn(n, 64, generator=g),),
                 {"block": "4x16"}),
}


def build_case(name: str, balanced: bool, sparsity: float = 0.8, seed: int = 0):
    """(folded model, manifest, skipped, example inputs)."""
    build, inputs, extra = CASES[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build().eval()
    _randomise_bn(model, g)
    cfg = PruneConfig(**{"block": "8", "sparsity": sparsity, "balanced": balanced, "min_blocks": 4, **extra})
    plans, skipped = plan_layers(model, cfg)
    layers = attach(plans, attention=False, powerprop=False, density=cfg.density)
    for layer in layers:
        R, C = layer.view.grid
        k = round(cfg.density * (C if balanced else R * C))
        score = torch.rand(R, C, generator=g)
        layer.set_mask(select_top_k(score, score, torch.ones(R, C, dtype=torch.bool), k, per_row=balanced))
    manifest = fold(layers)
    return model, manifest, skipped, inputs(32, g)


def names_for(xs) -> list[str]:
    return ["x"] if len(xs) == 1 else [f"x{i}" for i in range(len(xs))]


def feed(xs) -> dict[str, np.ndarray]:
    return {n: x.numpy() for n, x in zip(names_for(xs), xs)}
