"""Block-sparse linears on N-D (token) inputs, ``auto`` on transformers, and the converter's clean-up.

Small hand-built graphs (``x [N, T, I] @ W^T`` chains, as the exporter emits ``nn.Linear`` on 3-D inputs) and
a tiny BERT (2 layers, hidden 64, exported at batch 2 x sequence 8) are converted; the reference is the dense
export run in ONNX Runtime with optimizations off (its pruned blocks are exact zeros, so it is the pruned
model). Tolerance: 1e-5 x max|output| + 1e-6 (fp32 sums in another order). Sizes are tiny: seconds in all.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import FORMATS, LayerBlocks, convert, run_onnx
from converters.choose import timing_feeds
from converters.graph import prune_unused
from converters.manifest import element_mask
from converters.verify import check

OPSET = 18
RTOL = 1e-5


def _layer(name, shape, block, balanced=True, seed=0, density=0.25):
    rng = np.random.default_rng(seed)
    O, I = shape
    R, C = O // block[0], I // block[1]
    kept = np.zeros((R, C), dtype=bool)
    for r in range(R):
        kr = max(1, round(density * C)) if balanced else int(rng.integers(1, C + 1))
        kept[r, rng.choice(C, kr, replace=False)] = True
    lb = LayerBlocks(name, "linear", shape, block, kept)
    w = (rng.standard_normal(shape) * element_mask(lb)).astype(np.float32)
    return LayerBlocks(name, "linear", shape, block, kept, weight=w)


def mlp_3d(layers: list[LayerBlocks], residual: bool = False) -> onnx.ModelProto:
    """``x [N, T, I]`` through MatMul (W^T stored) + bias + Relu per layer, optionally a residual Add at the
    end (the last layer's output width equals the input's then)."""
    I = layers[0].weight_shape[1]
    nodes, inits, cur = [], {}, "x"
    for i, lb in enumerate(layers):
        inits[f"wt{i}"] = np.ascontiguousarray(lb.weight.T)
        inits[f"b{i}"] = np.linspace(-1, 1, lb.weight_shape[0], dtype=np.float32)
        nodes += [helper.make_node("MatMul", [cur, f"wt{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"a{i}"])]
        cur = f"a{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    if residual:
        nodes.append(helper.make_node("Add", [cur, "x"], ["res"]))
        cur = "res"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", I])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", layers[-1].weight_shape[0]])
    g = helper.make_graph(nodes, "g", [x], [y],
                          initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def _close(model, dense, feed):
    ref = run_onnx(dense, feed, optimize=False)[0]
    tol = RTOL * float(np.abs(ref).max()) + 1e-6
    for opt in (False, True):
        out = run_onnx(model, feed, optimize=opt)[0]
        assert out.shape == ref.shape
        assert float(np.abs(out - ref).max()) <= tol, (opt, float(np.abs(out - ref).max()), tol)


def _unused_initializers(model: onnx.ModelProto) -> list[str]:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    return [t.name for t in model.graph.initializer if t.name not in used]


def _feeds(I, sizes=((1, 5), (3, 7), (2, 16))):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((n, t, I)).astype(np.float32)} for n, t in sizes]


@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "unbalanced"])
def test_nd_linear_gathers_feature_rows_one_reshape_per_layer(balanced):
    """Chunks gather feature rows straight into ``[rows, k*bc, M]``: no Reshape per chunk; the block ids are
    stored (8 bytes a block) and expanded by constant nodes ORT folds; numbers match at batch 1 and 3 and
    sequence lengths the graph never saw."""
    lb = _layer("fc.weight", (64, 48), (8, 8), balanced)
    dense = mlp_3d([lb])
    res = convert(dense, [lb], fmt="blocked")
    check(res.model)
    ops = Counter(n.op_type for n in res.model.graph.node)
    chunks = ops["MatMul"]
    # one Gather per chunk (+ the row-order Gather of an unbalanced mask); Reshapes: flatten, expand each
    # chunk's block ids to feature ids (folded at load), one [R, br, M] -> [O, M], restore the leading axes
    assert ops["Gather"] == chunks + (0 if balanced else 1)
    assert ops["Reshape"] == 3 + chunks
    idx = [t for t in res.model.graph.initializer if "cols" in t.name]
    assert sum(int(np.prod(t.dims)) for t in idx) <= lb.kept.shape[0] * lb.kept.sum(axis=1).max()
    for feed in _feeds(48):
        _close(res.model, dense, feed)


def test_nd_chunks_cover_one_block_row_at_transformer_sizes():
    """A BERT-size FFN layer (k = 10 kept blocks of 16 in every block-row): chunks of about one block-row,
    so a chunk's gathered activations stay in cache at 1024 tokens."""
    from converters.ops import CHUNK_BYTES, REFERENCE_TOKENS, buckets, chunk_rows

    kept = np.zeros((192, 48), dtype=bool)
    kept[:, :10] = True
    groups = chunk_rows(buckets(kept.sum(axis=1)), kept, 16, REFERENCE_TOKENS)
    largest = max(len(g) for g in groups) * 10 * 16 * REFERENCE_TOKENS * 4
    assert largest <= max(CHUNK_BYTES, 10 * 16 * 1024 * 4)
    assert sorted(np.concatenate(groups).tolist()) == list(range(192))


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_unused_initializers_or_dead_nodes_after_convert(fmt):
    """Every format leaves no initializer that no node reads (ORT warned once per layer) and no node whose
    outputs nobody reads; two consecutive blocked layers with a residual exercise the Reshape-pair pass."""
    a, b = _layer("a.weight", (32, 16), (8, 8), seed=1), _layer("b.weight", (16, 32), (8, 8), seed=2)
    dense = mlp_3d([a, b], residual=True)
    feed = _feeds(16, sizes=((2, 4),))[0]
    res = convert(dense, [a, b], fmt=fmt, timing_inputs=feed if fmt == "auto" else None)
    check(res.model)
    assert _unused_initializers(res.model) == []
    used = {i for n in res.model.graph.node for i in n.input} | {o.name for o in res.model.graph.output}
    assert all(any(o in used for o in n.output) for n in res.model.graph.node)
    for f in _feeds(16):
        _close(res.model, dense, f)


def test_prune_unused_keeps_what_subgraphs_read():
    """A tensor read only inside an If branch is used; a dead chain and its initializer go."""
    then_g = helper.make_graph([helper.make_node("Add", ["x", "c_sub"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["x", "c_dead"], ["d1"]), helper.make_node("Relu", ["d1"], ["d2"])]
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("c_sub", "c_dead", "c_unused")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits)
    assert prune_unused(g) == (2, 2)
    assert [t.name for t in g.initializer] == ["c_sub"] and [n.op_type for n in g.node] == ["If"]


def test_timing_feeds_add_batch_one_or_a_larger_batch():
    from converters.choose import LARGE_BATCH

    x = np.arange(8 * 16).reshape(8, 16)
    feeds = timing_feeds({"ids": x, "mask": x})
    assert [f["ids"].shape for f in feeds] == [(8, 16), (1, 16)]
    one = timing_feeds({"ids": x[:1]})
    assert [f["ids"].shape for f in one] == [(1, 16), (LARGE_BATCH, 16)]
    assert np.array_equal(one[1]["ids"][-1], x[0])
    assert timing_feeds(None) == []


# --- a tiny BERT ----------------------------------------------------------------------------------------

_BERT: dict = {}


def _tiny_bert():
    """(dense export, manifest): BertModel hidden 64, 2 layers, 4 heads, every projection pruned at 8x8,
    s = 0.75, balanced; biases and LayerNorm parameters random, so that nothing is deduplicated."""
    if _BERT:
        return _BERT["v"]
    import torch
    from helpers import needs

    from converters import export_onnx

    needs("transformers")  # skips only when transformers is not installed; any other error fails
    from transformers import BertConfig, BertModel

    class Enc(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=50, max_position_embeddings=64)
    model = Enc(BertModel(cfg, add_pooling_layer=False)).eval()
    rng = np.random.default_rng(0)
    manifest = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "LayerNorm.weight" in name else 0.0))
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                O, I = mod.weight.shape
                kept = np.zeros((O // 8, I // 8), dtype=bool)
                for r in range(O // 8):
                    kept[r, rng.choice(I // 8, max(1, (I // 8) // 4), replace=False)] = True
                mod.weight.mul_(torch.from_numpy(np.kron(kept, np.ones((8, 8))).astype(np.float32)))
                manifest.append(LayerBlocks(f"{name}.weight", "linear", (O, I), (8, 8), kept,
                                            weight=mod.weight.numpy().copy()))
    ids = torch.randint(0, 50, (2, 8))
    proto = export_onnx(model, (ids, torch.ones_like(ids)), input_names=["input_ids", "attention_mask"])
    _BERT["v"] = (proto, manifest)
    return _BERT["v"]


def _bert_feed(n, t, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), np.int64)
    mask[0, t - t // 3:] = 0
    return {"input_ids": rng.integers(0, 50, (n, t)).astype(np.int64), "attention_mask": mask}


def test_tiny_bert_blocked_matches_dense_at_other_batches_and_lengths():
    proto, manifest = _tiny_bert()
    res = convert(proto, manifest, fmt="blocked")
    check(res.model)
    assert all(o.fmt == "blocked" for o in res.layers) and len(res.layers) == 12
    assert _unused_initializers(res.model) == []
    for n, t in ((1, 8), (3, 5), (2, 13)):
        _close(res.model, proto, _bert_feed(n, t))


def test_tiny_bert_auto_times_every_layer_at_both_sizes_and_holds():
    """``auto`` used to time none of a transformer's layers (the sequence axis was unknown). Now each layer is
    timed at the timing batch and at batch 1; the result matches dense and runs at least 0.95x dense."""
    proto, manifest = _tiny_bert()
    feed = _bert_feed(4, 8)
    res = convert(proto, manifest, fmt="auto", timing_inputs=feed, threads=1)
    check(res.model)
    for o in res.layers:
        assert o.latencies_ms is not None, o.reason
        assert set(o.latencies_by_shape) in ({"4x8x64", "1x8x64"}, {"4x8x128", "1x8x128"})
    assert _unused_initializers(res.model) == []
    for n, t in ((1, 8), (3, 5)):
        _close(res.model, proto, _bert_feed(n, t))


def test_layers_reading_one_tensor_share_its_transposed_copy():
    """Three blocked projections of one input (query, key, value) read one Reshape + Transpose of it, and one
    leading-shape computation; each keeps its own output Transpose."""
    layers = [_layer(f"{n}.weight", (32, 32), (8, 8), seed=i) for i, n in enumerate("qkv")]
    nodes, inits = [], {}
    for i, lb in enumerate(layers):
        inits[f"wt{i}"] = np.ascontiguousarray(lb.weight.T)
        nodes.append(helper.make_node("MatMul", ["x", f"wt{i}"], [f"h{i}"]))
    nodes += [helper.make_node("Add", ["h0", "h1"], ["s"]), helper.make_node("Mul", ["s", "h2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 32])],
                          initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    dense = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    res = convert(dense, layers, fmt="blocked")
    check(res.model)
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["Transpose"] == 1 + 3 and ops["Shape"] == 1 and ops["Slice"] == 1
    x_users = [n.op_type for n in res.model.graph.node if "x" in n.input]
    assert sorted(x_users) == ["Reshape", "Shape"]
    for feed in _feeds(32):
        _close(res.model, dense, feed)


def test_ranking_takes_the_worse_size_and_ties_go_to_the_smallest():
    """Ranking from medians per size (no timing): blocked twice as fast at batch 8 but 20 % slower at batch 1
    stays on the dense op; faster at both is picked; within 5 % of the best the smallest file wins."""
    from converters import FORMULATIONS
    from converters.choose import rank_candidates

    sizes = {"blocked": 20, "compact": 21, "sparse-initializer": 60, "dense": 100}

    def per_size(b8, b1):
        return {"8x128x64": {"blocked": b8, "compact": 1.02, "sparse-initializer": 1.0, "dense": 1.01},
                "1x128x64": {"blocked": b1, "compact": 0.1, "sparse-initializer": 0.11, "dense": 0.1}}

    pick, worst, at = rank_candidates(per_size(0.5, 0.12), FORMULATIONS, sizes)
    assert pick == "compact" and worst["blocked"] == pytest.approx(1.2) and at["blocked"] == "1x128x64"
    pick, worst, _ = rank_candidates(per_size(0.7, 0.08), FORMULATIONS, sizes)
    assert pick == "blocked" and worst["blocked"] == pytest.approx(0.8) and worst["dense"] == 1.0
    pick, _, _ = rank_candidates(per_size(1.03, 0.104), FORMULATIONS, {**sizes, "blocked": 22})
    assert pick == "compact"  # blocked within 5 % of the dense op's best but larger than compact
