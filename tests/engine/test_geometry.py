"""Block views: norms and expansion agree with a direct reference, for every layout and padding."""
import math

import pytest
import torch
from torch import nn

from sapp_compress.blocks.geometry import VIEWS, plan_layers
from sapp_compress.config import BlockSpec, PruneConfig
from sapp_compress.errors import GeometryError


def _reference_blocks(view, w):
    """Block id of every weight element, computed the slow, obvious way from the view's definition."""
    cols = view.cols
    br, bc = view.block.rows, view.block.cols
    ids = torch.empty(w.shape, dtype=torch.long)
    C = math.ceil(cols / bc)
    for idx in torch.cartesian_prod(*[torch.arange(d) for d in w.shape]):
        o = int(idx[0])
        if view.layout == "linear":
            c = int(idx[1])
        elif view.layout == "conv_channel":
            c = int(idx[1])
        else:  # conv_tap: column = tap * C_in + c
            cin, taps = int(idx[1]), idx[2:].tolist()
            tap = 0
            for t, k in zip(taps, w.shape[2:]):
                tap = tap * k + t
            c = tap * w.shape[1] + cin
        ids[tuple(idx.tolist())] = (o // br) * C + c // bc
    return ids


CASES = [
    ("linear", (16, 24), BlockSpec(8, 8)),
    ("linear", (12, 20), BlockSpec(8, 8)),  # padded
    ("linear", (16, 32), BlockSpec(4, 16)),
    ("conv_channel", (16, 8, 3, 3), BlockSpec(8, 4)),
    ("conv_channel", (16, 8, 5), BlockSpec(4, 4)),
    ("conv_tap", (8, 4, 3, 3), BlockSpec(4, 4)),
    ("conv_tap", (8, 6, 3), BlockSpec(4, 4)),  # padded
]


@pytest.mark.parametrize("layout,shape,block", CASES)
def test_norms_and_expand_match_reference(layout, shape, block):
    torch.manual_seed(0)
    view = VIEWS[layout](shape, block)
    w = torch.randn(shape, dtype=torch.float64)
    ids = _reference_blocks(view, w)
    ref = torch.zeros(view.n_blocks, dtype=torch.float64).index_add_(
        0, ids.flatten(), w.flatten() ** 2).sqrt()
    torch.testing.assert_close(view.block_norms(w).double().flatten(), ref, rtol=1e-6, atol=1e-9)
    v = torch.randn(view.grid, dtype=torch.float64)
    expected = w * v.flatten()[ids]
    torch.testing.assert_close(view.scale(w, v), expected, rtol=0, atol=0)
    torch.testing.assert_close(w * view.expand(v), expected, rtol=0, atol=0)


def test_plan_reasons_and_policies():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Flatten(), nn.Linear(64, 64),
        nn.Linear(64, 10), nn.Embedding(10, 4),
    )
    cfg = PruneConfig(block="8", sparsity=0.5, min_blocks=2)
    plans, skipped = plan_layers(model, cfg)
    reasons = {s.name: s.reason for s in skipped}
    assert [p.name for p in plans] == ["3.weight"]
    assert "depthwise" in reasons["1.weight"]
    assert "larger than the 16x3" in reasons["0.weight"] and "does not divide" in reasons["4.weight"]
    assert "embedding" in reasons["5.weight"]
    plans, _ = plan_layers(model, PruneConfig(block="8", sparsity=0.5, min_blocks=2, indivisible="pad"))
    assert [p.name for p in plans] == ["3.weight", "4.weight"]  # 0.weight: 3 input channels < 8
    with pytest.raises(GeometryError, match=r"4\.weight: block 8x8 does not divide the 10x64"):
        plan_layers(model, PruneConfig(block="8", sparsity=0.5, min_blocks=2, indivisible="error",
                                       exclude=("0.*",)))


def test_min_blocks_include_exclude():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    plans, skipped = plan_layers(model, PruneConfig(block="8", sparsity=0.5, min_blocks=40))
    assert [p.name for p in plans] == ["0.weight"]
    assert "fewer than min_blocks=40" in {s.name: s.reason for s in skipped}["2.weight"]
    plans, _ = plan_layers(model, PruneConfig(block="8", sparsity=0.5, include=("2",)))
    assert [p.name for p in plans] == ["2.weight"]
    plans, _ = plan_layers(model, PruneConfig(block="8", sparsity=0.5, exclude=("0.weight",)))
    assert [p.name for p in plans] == ["2.weight"]
