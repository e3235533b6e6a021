"""The planner and the fold on library layer types: transformers' Conv1D (a transposed linear),
nn.MultiheadAttention's fused in_proj_weight, tied weights, and kept blocks that ended all zero."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sapp_compress import PruneConfig
from sapp_compress.blocks.geometry import plan_layers
from sapp_compress.blocks.masks import attach, fold
from sapp_compress.io.adapters import ModelIO, find_output, select, unwrap


def _fold_with_mask(model: nn.Module, cfg: PruneConfig, keep_fn):
    plans, skipped = plan_layers(model, cfg)
    layers = attach(plans, attention=False, powerprop=False, density=cfg.density)
    for layer in layers:
        layer.set_mask(keep_fn(*layer.view.grid))
    return fold(layers), skipped


def test_conv1d_is_pruned_as_the_transposed_linear_it_is():
    from helpers import needs

    needs("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(48, 32))  # weight [in 32, out 48]
    x = torch.randn(3, 32)
    before = m(x).detach()
    keep = torch.zeros(6, 4, dtype=torch.bool)
    keep[:, 1] = True  # every output block-row keeps input block-column 1
    (lb,), _ = _fold_with_mask(m, PruneConfig(block="8", sparsity=0.75, min_blocks=1), lambda r, c: keep)
    assert lb.layout == "linear" and lb.weight_shape == (48, 32) and lb.kept.shape == (6, 4)
    w = m[0].weight.detach().numpy()  # still [32, 48] in the module
    np.testing.assert_array_equal(lb.weight, w.T)
    assert (w[:8].sum() == 0) and np.all(w[8:16] != 0)  # input rows 8..15 kept, the rest zero
    # the fold keeps the masked forward: x @ (W * mask)
    expected = x @ (m[0].weight.detach()) + m[0].bias.detach()
    np.testing.assert_allclose(m(x).detach().numpy(), expected.numpy(), rtol=0, atol=1e-6)
    assert not torch.allclose(before, m(x))


def test_multihead_attention_in_proj_is_planned_with_blocks_inside_the_qkv_split():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    plans, _ = plan_layers(nn.Sequential(mha), PruneConfig(block="8", sparsity=0.8, min_blocks=1))
    assert {p.name: p.param for p in plans} == {"0.in_proj_weight": "in_proj_weight",
                                                 "0.out_proj.weight": "weight"}
    _, skipped = plan_layers(nn.Sequential(nn.MultiheadAttention(36, 4, batch_first=True)),
                             PruneConfig(block="8x4", sparsity=0.8, min_blocks=1))
    reason = {s.name: s.reason for s in skipped}["0.in_proj_weight"]
    assert reason == "block rows 8 do not divide the embedding 36: blocks would straddle the q/k/v split"


def test_tied_weights_are_left_dense_with_the_reason():
    emb = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "body": nn.Linear(32, 32), "head": head})
    plans, skipped = plan_layers(model, PruneConfig(block="8", sparsity=0.8, min_blocks=1))
    assert [p.name for p in plans] == ["body.weight"]
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["head.weight"].startswith("tied to emb.weight (an embedding)")


def test_kept_blocks_that_ended_all_zero_are_not_recorded_as_kept():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight[:8, 8:] = 0.0  # block (0, 1) is all zero although the mask keeps it
    (lb,), _ = _fold_with_mask(nn.Sequential(lin), PruneConfig(block="8", sparsity=0.25, min_blocks=1),
                               lambda r, c: torch.ones(r, c, dtype=torch.bool))
    np.testing.assert_array_equal(lb.kept, [[True, False], [True, True]])


@pytest.mark.parametrize("out, key", [
    (torch.ones(2, 3), "tensor"),
    ({"loss": torch.tensor(1.0), "logits": torch.ones(2, 3)}, "logits"),
    ({"last_hidden_state": torch.ones(2, 4, 8), "pooler_output": torch.ones(2, 8)}, "last_hidden_state"),
    ((torch.arange(3), torch.ones(2, 3)), "1"),
])
def test_output_adapters_pick_logits_else_the_first_float_tensor(out, key):
    k, t = find_output(out)
    assert k == key and t is select(out, k)


def test_model_io_passes_named_inputs_by_keyword_and_unwraps():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, input_ids=None, attention_mask=None):
            return {"logits": self.fc(input_ids.float() * attention_mask.float())}

    inner = KW()
    io = ModelIO(inner, ("input_ids", "attention_mask"), True, "logits")
    ids, mask = torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    np.testing.assert_array_equal(io(ids, mask).detach().numpy(),
                                  inner.fc(torch.zeros(2, 4)).detach().numpy())
    assert unwrap(io) is inner
