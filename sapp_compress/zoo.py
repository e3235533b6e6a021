"""Small reference architectures, built from torch's own layers.

They serve the converter zoo tests, the benchmarks and the shipped example models. Every class here is made
only of ``torch.nn`` modules, and the model loader allows exactly these classes (besides torch.nn's own) in
its weights-only unpickler, so a saved ``CTRNet`` loads without ``--trust-model``.

Architectures (input layout in brackets):
- :func:`mlp` [N, F]: Linear/ReLU stack.
- :class:`ResCNN` [N, C, H, W]: Conv-BN-ReLU stem, residual 3x3 blocks with BatchNorm, global pool, Linear.
- :class:`DSCNN` [N, C, H, W]: depthwise-separable blocks (depthwise 3x3 + pointwise 1x1).
- :class:`CTRNet` ([N, n_cat] int64, [N, n_dense] float): embeddings + dense features -> MLP -> 1 logit.
- :class:`TransformerClassifier` [N, T] int64 tokens: embedding, ``nn.TransformerEncoderLayer`` x L, mean
  pool.
- :class:`CNN1d` [N, C, T]: Conv1d stack, global pool, Linear.
"""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int] | tuple[int, ...]) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> ReLU -> ... -> Linear(sizes[-2], sizes[-1])``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(x + y)


class ResCNN(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 32, n_blocks: int = 2, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(n_blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))


class DSBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.pw(self.relu(self.bn1(self.dw(x))))))


class DSCNN(nn.Module):
    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 64),
                 n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[DSBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))


class CTRNet(nn.Module):
    """Embeddings of ``n_cat`` categorical fields (one shared table, field offsets added) concatenated with
    the dense features, then an MLP to one logit. The first dense layer (``mlp.0``) is the one the paper
    prunes on Criteo."""

    def __init__(
        self,
        n_cat: int = 26,
        vocab_per_field: int = 100,
        n_dense: int = 13,
        emb_dim: int = 8,
        hidden: tuple[int, ...] = (256, 128),
    ) -> None:
        super().__init__()
        self.n_cat = n_cat
        self.vocab_per_field = vocab_per_field
        self.embedding = nn.Embedding(n_cat * vocab_per_field, emb_dim)
        self.register_buffer("offsets", torch.arange(n_cat, dtype=torch.long) * vocab_per_field)
        self.flatten = nn.Flatten()
        self.mlp = mlp([n_cat * emb_dim + n_dense, *hidden, 1])

    def forward(self, x_cat: torch.Tensor, x_dense: torch.Tensor) -> torch.Tensor:
        e = self.flatten(self.embedding(x_cat + self.offsets))
        return self.mlp(torch.cat([e, x_dense], dim=1))


class TransformerClassifier(nn.Module):
    def __init__(
        self,
        vocab: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        dim_ff: int = 128,
        n_layers: int = 2,
        max_len: int = 32,
        n_classes: int = 4,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.tok(tokens) + self.pos(pos))
        return self.head(h.mean(dim=1))


class CNN1d(nn.Module):
    def __init__(self, in_channels: int = 8, widths: tuple[int, ...] = (32, 64, 64),
                 n_classes: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip((in_channels, *widths[:-1]), widths):
            layers += [nn.Conv1d(a, b, 5, padding=2), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


#: Classes the weights-only loader may rebuild besides torch.nn's own.
SAFE_CLASSES: tuple[type, ...] = (ResBlock, ResCNN, DSBlock, DSCNN, CTRNet, TransformerClassifier, CNN1d)
