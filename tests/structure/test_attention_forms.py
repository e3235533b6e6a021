"""Heads in the attention forms users bring (each built by its library's own constructor, small configs):
fused q/k/v with grouped-query attention (Phi-3), per-head norms over the head dimension (Qwen3), multi-query
attention (Falcon: the query heads go, the one key/value head stays), a relative-position table indexed by
head and shared by every layer (MPNet: one kept set for all of them), an encoder-decoder (T5: self- and
cross-attention); and the reasons given where nothing can go (ConvNeXt-V2's global response norm, RepVGG's
training-time branches). In each, removing the pruned units computes what zeroing them at their consumers
computes (to 1e-5 of the output's scale), at the uniform widths of the one rule."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import needs
from torch import nn

from sapp_compress.config import BlockSpec, PruneConfig
from sapp_compress.structure import discover
from sapp_compress.structure.plan import plan_families
from sapp_compress.structure.remove import max_rel_diff, random_keep, remove, zero_removed

CFG = PruneConfig(BlockSpec(1, 1), 0.5, structure="channels")


class Out(nn.Module):
    """The library model called with keyword inputs, one output tensor (as the tool's adapter makes it)."""

    def __init__(self, inner: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.inner, self.keys = inner, keys

    def forward(self, *xs):
        out = self.inner(**dict(zip(self.keys, xs)))
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ids(vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(0))


def phi3():
    t = needs("transformers")
    cfg = t.Phi3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return Out(t.Phi3ForCausalLM(cfg).eval(), ("input_ids",)), (_ids(1000, 2, 16),)


def qwen3():
    t = needs("transformers")
    cfg = t.Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return Out(t.Qwen3ForCausalLM(cfg).eval(), ("input_ids",)), (_ids(100, 2, 16),)


def falcon_mqa():
    t = needs("transformers")
    cfg = t.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         multi_query=True, new_decoder_architecture=False, alibi=False)
    return Out(t.FalconForCausalLM(cfg).eval(), ("input_ids",)), (_ids(100, 2, 16),)


def mpnet():
    t = needs("transformers")
    cfg = t.MPNetConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return Out(t.MPNetModel(cfg).eval(), ("input_ids",)), (_ids(100, 2, 16),)


def t5():
    t = needs("transformers")
    cfg = t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                     num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    model = Out(t.T5ForConditionalGeneration(cfg).eval(), ("input_ids", "decoder_input_ids"))
    return model, (_ids(100, 2, 10), _ids(100, 2, 6))


#: model -> (builder, {attention family: the heads (units) it must have})
FORMS = {
    # fused qkv_proj, 4 query heads in 2 groups: a unit is a key/value head with its 2 query heads
    "phi3": (phi3, {f"model.layers.{i}.self_attn (heads)": 2 for i in range(2)}),
    # q_norm / k_norm over the head dimension, shared by every head: kept whole, the groups still go
    "qwen3": (qwen3, {f"model.layers.{i}.self_attn (heads)": 2 for i in range(2)}),
    # one key/value head for 4 query heads: the query heads are the units
    "falcon_mqa": (falcon_mqa, {f"transformer.h.{i}.self_attention (heads)": 4 for i in range(2)}),
    # one relative-attention table for every layer: a head goes from all layers and the table at once
    "mpnet": (mpnet, {"encoder (heads)": 4}),
    "t5": (t5, {"encoder.block.0.layer.0.SelfAttention (heads)": 4,
                "decoder.block.0.layer.0.SelfAttention (heads)": 4,
                "decoder.block.0.layer.1.EncDecAttention (heads)": 4}),
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_heads_found_and_removed_exactly(name):
    builder, heads = FORMS[name]
    torch.manual_seed(0)
    model, inputs = builder()
    fams, plan = plan_families(model, model.inner, inputs, CFG, inner_of=lambda m: m.inner)
    found = {p.family.name: p.family for p in fams}
    for fam, n in heads.items():
        assert fam in found and found[fam].kind == "heads" and found[fam].n_units == n, (fam, sorted(found))
    assert not [w for w in plan.whole if "cannot be removed exactly" in w.reason]
    families = [p.family for p in fams]
    keep = random_keep(families, {f.name: f.kept_units(CFG.sparsity) for f in families}, seed=1)
    ref = copy.deepcopy(model)
    zero_removed(ref.inner, families, keep)
    small = copy.deepcopy(model)
    remove(small.inner, families, keep)
    with torch.no_grad():
        a, b, dense = ref(*inputs), small(*inputs), model(*inputs)
    assert max_rel_diff(a, b) <= 1e-5
    assert max_rel_diff(dense, a) > 1e-4  # the removal changed the model: units really went
    kept = {f.name: int(keep[f.name].sum()) for f in families}
    assert all(kept[f] == n // 2 for f, n in heads.items())  # heads exact: half of each attention family
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_shared_key_value_head_and_per_head_norm_stay_whole():
    """Multi-query attention's key/value rows are in no unit (the query heads are), and Qwen3's per-head
    norm weights, shared by every head, are not in its heads' units: neither ties the heads."""
    model, inputs = falcon_mqa()
    plan = discover(model, inputs, names_from=model.inner)
    fam = plan.family("transformer.h.0.self_attention (heads)")
    key = ("transformer.h.0.self_attention.query_key_value.weight", 0)
    rows = sorted(int(i) for u in fam.units for i in u[key])
    assert rows == list(range(64))  # the query rows only; the key and value rows (64..95) stay
    model, inputs = qwen3()
    plan = discover(model, inputs, names_from=model.inner)
    fam = plan.family("model.layers.0.self_attn (heads)")
    assert not any("q_norm" in t or "k_norm" in t for t, _ in fam.keys)


def test_where_nothing_can_go_the_reason_names_the_op():
    """ConvNeXt-V2's global response norm divides by the mean over channels (a norm over them all): its
    channels are tied, and the reason names the op; RepVGG's identity branch adds each block's input to its
    output: the residual stream."""
    t = needs("transformers")
    cfg = t.ConvNextV2Config(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5,
                             image_size=32)
    m = t.ConvNextV2ForImageClassification(cfg).eval()
    plan = discover(Out(m, ("pixel_values",)), (torch.randn(2, 3, 32, 32),), names_from=m)
    reasons = {w.reason for w in plan.whole}
    assert not plan.families
    tied = "all its channels are tied together by mean (a normalisation, softmax or reduction over them)"
    assert tied in reasons
    assert not any("no channel rule" in r for r in reasons)  # linalg_vector_norm has its rule
    timm = needs("timm")
    m = timm.create_model("repvgg_a0", pretrained=False, num_classes=5).eval()
    plan = discover(m, (torch.randn(2, 3, 32, 32),))
    assert not plan.families
    assert any("residual stream" in w.reason for w in plan.whole)
