"""The block manifest: the one contract between the pruning engine and the ONNX converters.

The engine (``sapp_compress``) writes one :class:`LayerBlocks` per pruned weight; the converters read it to
find the weight in the exported graph and to know which blocks are kept. It holds only numpy and plain
Python values, so ``converters`` never needs torch's training side, and it round-trips through JSON.

Layout conventions (the "2-D view" of each weight; rows are always the output side):

- ``linear``: ``nn.Linear`` weight ``[O, I]`` as is. Block ``(br, bc)`` = ``br`` outputs x ``bc`` inputs.
- ``conv_channel``: conv weight ``[O, C, *taps]`` (groups = 1) viewed as ``[O, C]`` channel pairs, every
  spatial tap of a pair belonging to the same block. Block ``(br, bc)`` = ``br`` output channels x ``bc``
  input channels x all taps.
- ``conv_tap``: the paper's view, ``w.permute(2, 3, 1, 0).reshape(kh*kw*C, O)`` transposed to rows =
  outputs, i.e. ``[O, kh*kw*C]`` with column index ``(h*kw + w)*C + c``. Only storage formulations
  (compact / sparse-initializer / dense) apply.

``kept`` is a boolean ``[R, C]`` grid over blocks of the view (``R = ceil(rows/br)``, ``C = ceil(cols/bc)``).
When ``padded`` is true the view was zero-padded up to ``(R*br, C*bc)`` for block arithmetic; the padding is
not part of the weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAYOUTS = ("linear", "conv_channel", "conv_tap")


@dataclass(frozen=True)
class LayerBlocks:
    """Which blocks of one weight are kept.

    Attributes:
        name: full parameter name in the PyTorch model, e.g. ``"encoder.0.fc1.weight"``.
        layout: one of :data:`LAYOUTS`.
        weight_shape: the PyTorch weight's shape (``[O, I]`` or ``[O, C, kh, kw]`` / ``[O, C, k]``).
        block: ``(br, bc)`` block shape on the 2-D view.
        kept: bool array ``[R, C]``; True where the block is kept.
        padded: whether the view was zero-padded to a multiple of the block.
        weight: the folded weight (float32, PyTorch layout) whose pruned blocks are exact zeros. Used to
            find the initializer in the exported graph by value. Not serialised to JSON.
    """

    name: str
    layout: str
    weight_shape: tuple[int, ...]
    block: tuple[int, int]
    kept: np.ndarray
    padded: bool = False
    weight: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        kept = np.asarray(self.kept, dtype=bool)
        if kept.ndim != 2:
            raise ValueError(f"kept: expected a 2-D [R, C] grid, got shape {kept.shape}")
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "weight_shape", tuple(int(d) for d in self.weight_shape))
        object.__setattr__(self, "block", (int(self.block[0]), int(self.block[1])))

    @property
    def view_shape(self) -> tuple[int, int]:
        """Unpadded 2-D view shape ``(rows, cols)``."""
        o = self.weight_shape[0]
        if self.layout == "linear":
            return (o, self.weight_shape[1])
        if self.layout == "conv_channel":
            return (o, self.weight_shape[1])
        return (o, int(np.prod(self.weight_shape[1:])))

    @property
    def n_blocks(self) -> int:
        return int(self.kept.size)

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def block_sparsity(self) -> float:
        return 1.0 - self.n_kept / self.n_blocks

    @property
    def balanced(self) -> bool:
        """True when every block-row keeps the same number of blocks."""
        per_row = self.kept.sum(axis=1)
        return bool(np.all(per_row == per_row[0]))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layout": self.layout,
            "weight_shape": list(self.weight_shape),
            "block": list(self.block),
            "kept": self.kept.astype(int).tolist(),
            "padded": self.padded,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LayerBlocks":
        return cls(
            name=d["name"],
            layout=d["layout"],
            weight_shape=tuple(d["weight_shape"]),
            block=tuple(d["block"]),
            kept=np.asarray(d["kept"], dtype=bool),
            padded=bool(d.get("padded", False)),
        )


def view_of(lb: LayerBlocks, w: np.ndarray) -> np.ndarray:
    """The 2-D view of weight ``w`` (PyTorch layout), with a trailing taps axis for ``conv_channel``:
    ``linear`` -> [O, I]; ``conv_channel`` -> [O, C, taps]; ``conv_tap`` -> [O, taps*C]."""
    o = w.shape[0]
    if lb.layout == "linear":
        return w
    if lb.layout == "conv_channel":
        return w.reshape(o, w.shape[1], -1)
    perm = (0, *range(2, w.ndim), 1)
    return w.transpose(perm).reshape(o, -1)


def element_mask(lb: LayerBlocks) -> np.ndarray:
    """Boolean array of the weight's shape (PyTorch layout): True inside kept blocks."""
    br, bc = lb.block
    rows, cols = lb.view_shape
    m = np.kron(lb.kept, np.ones((br, bc), dtype=bool)).astype(bool)[:rows, :cols]
    shape = lb.weight_shape
    if lb.layout == "linear":
        return m
    if lb.layout == "conv_channel":
        return np.broadcast_to(m.reshape(*m.shape, *([1] * (len(shape) - 2))), shape).copy()
    o, c, *taps = shape
    inv = (0, len(shape) - 1, *range(1, len(shape) - 1))
    return m.reshape(o, *taps, c).transpose(inv).copy()
