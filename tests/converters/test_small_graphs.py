"""Contract tests on small hand-built ONNX graphs, parametrised over every registered formulation.

Each graph holds one pruned layer in one of the shapes the exporter emits: Gemm (transB = 1, bias), MatMul on
a 3-D input with the weight stored transposed, MatMul fed by a Transpose of the weight, Conv 2-D and Conv 1-D.
The dense graph run in ONNX Runtime with optimizations off is the reference; every formulation must match it
(stated tolerance: 1e-5 x max|output|) with optimizations off and on, and pass
``check_model(full_check=True)``.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from auto_rule import auto_rule_holds
from onnx import TensorProto, helper, numpy_helper

import converters
from converters import FORMATS, FORMULATIONS, LayerBlocks, convert, measure_sparsity, run_onnx
from converters.manifest import element_mask
from converters.ops import MAX_BUCKETS, buckets
from converters.runtime import session

OPSET = 18


def _kept(rng, R, C, k, balanced):
    kept = np.zeros((R, C), dtype=bool)
    for r in range(R):
        kr = k if balanced else int(rng.integers(1, C + 1))
        kept[r, rng.choice(C, kr, replace=False)] = True
    return kept


def _layer(name, layout, shape, block, balanced=True, seed=0, density=0.25):
    """A random weight of ``shape`` with random kept blocks; pruned blocks are exact zeros."""
    rng = np.random.default_rng(seed)
    probe = LayerBlocks(name, layout, shape, block, np.zeros((1, 1), bool))
    rows, cols = probe.view_shape
    R, C = -(-rows // block[0]), -(-cols // block[1])
    kept = _kept(rng, R, C, max(1, round(density * C)), balanced)
    padded = rows % block[0] != 0 or cols % block[1] != 0
    lb = LayerBlocks(name, layout, shape, block, kept, padded=padded)
    w = (rng.standard_normal(shape) * element_mask(lb)).astype(np.float32)
    return LayerBlocks(name, layout, shape, block, kept, padded=padded, weight=w)


def _model(nodes, inputs, inits, rank=2):
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])
    g = helper.make_graph(nodes, "g", inputs, [out],
                          initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def gemm(lb):
    O, I = lb.weight_shape
    b = np.linspace(-1, 1, O, dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", I])
    node = helper.make_node("Gemm", ["x", lb.name, "b"], ["y"], transB=1)
    return _model([node], [x], {lb.name: lb.weight, "b": b}), {"x": (5, I)}


def matmul_3d(lb):
    """``x [N, T, I] @ W^T`` with W^T stored as a fresh constant (as the exporter does), then + b."""
    O, I = lb.weight_shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, I])
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    inits = {"wt": np.ascontiguousarray(lb.weight.T), "b": np.linspace(-1, 1, O, dtype=np.float32)}
    return _model(nodes, [x], inits, rank=3), {"x": (4, 3, I)}


def matmul_via_transpose(lb):
    O, I = lb.weight_shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", I])
    nodes = [helper.make_node("Transpose", [lb.name], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    return _model(nodes, [x], {lb.name: lb.weight}), {"x": (6, I)}


def conv(lb):
    O, C, *k = lb.weight_shape
    spatial = [7, 6][: len(k)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, *spatial])
    pads = [1] * (2 * len(k))
    node = helper.make_node("Conv", ["x", lb.name, "b"], ["y"], pads=pads, strides=[2] + [1] * (len(k) - 1))
    return _model([node], [x], {lb.name: lb.weight, "b": np.linspace(-1, 1, O, dtype=np.float32)},
                  2 + len(k)), \
        {"x": (2, C, *spatial)}


GRAPHS = {
    "gemm": (gemm, "linear", (32, 48)),
    "matmul_3d": (matmul_3d, "linear", (48, 32)),
    "matmul_via_transpose": (matmul_via_transpose, "linear", (32, 32)),
    "conv2d": (conv, "conv_channel", (32, 32, 3, 3)),
    "conv1d": (conv, "conv_channel", (16, 32, 3)),
}


def _feed(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _check_close(model, dense, feed):
    onnx.checker.check_model(model, full_check=True)
    ref = run_onnx(dense, feed, optimize=False)[0]
    for opt in (False, True):
        out = run_onnx(model, feed, optimize=opt)[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def _dense_copy(model, w):
    """Initializers (or Constant values) holding ``w`` or ``w^T`` densely."""
    hits = []
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.size == w.size and (np.array_equal(a.reshape(w.shape), w) or
                                 (w.ndim == 2 and np.array_equal(a.reshape(w.shape[::-1]), w.T))):
            hits.append(t.name)
    return hits


@pytest.mark.parametrize("block", [(8, 8), (4, 16)], ids=["8x8", "4x16"])
@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "auto"])
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_formulation_matches_dense(graph, fmt, balanced, block):
    build, layout, shape = GRAPHS[graph]
    lb = _layer("layer.weight", layout, shape, block, balanced)
    dense, shapes = build(lb)
    res = convert(dense, [lb], fmt=fmt)
    (out,) = res.layers
    assert out.fmt == fmt, out.reason
    feed = _feed(shapes)
    _check_close(res.model, dense, feed)
    ops = Counter(n.op_type for n in res.model.graph.node)
    if fmt != "dense":
        assert not _dense_copy(res.model, lb.weight)
    if fmt == "blocked":
        n_branches = 1 if balanced else len(buckets(lb.kept.sum(axis=1)))
        assert ops["Gather"] == n_branches + (0 if balanced else 1)
        if layout == "conv_channel":
            assert ops["Conv"] == n_branches
        else:
            assert ops["MatMul"] == n_branches and ops["Gemm"] == 0
    if fmt == "compact":
        scat = [n for n in res.model.graph.node if n.op_type == "ScatterND"]
        assert len(scat) == 1 and all(a.name != "reduction" or a.s == b"none" for a in scat[0].attribute)
        # ORT folds the rebuilt weight into one dense op: the runtime graph is the dense one
    if fmt == "sparse-initializer":
        (const,) = [n for n in res.model.graph.node if n.op_type == "Constant"]
        sp = const.attribute[0].sparse_tensor
        idx = numpy_helper.to_array(sp.indices)
        assert idx.dtype == np.int64 and idx.ndim == 1 and np.all(np.diff(idx) > 0)
    sp = measure_sparsity(res.model, [lb])
    assert sp.per_layer[lb.name] == pytest.approx(1 - np.count_nonzero(lb.weight) / lb.weight.size)


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_auto_times_every_candidate_and_keeps_a_fastest(graph):
    build, layout, shape = GRAPHS[graph]
    lb = _layer("layer.weight", layout, shape, (8, 8))
    dense, shapes = build(lb)
    feed = _feed(shapes)
    res = convert(dense, [lb], fmt="auto", timing_inputs=feed)
    (out,) = res.layers
    assert set(out.latencies_ms) == {n for n, f in FORMULATIONS.items() if f.precision == "fp32"}
    assert auto_rule_holds(out)
    assert out.fmt == "blocked" or out.reason
    _check_close(res.model, dense, feed)


def test_blocked_on_conv_tap_falls_back_to_dense_with_reason_and_storage_formats_apply():
    lb = _layer("layer.weight", "conv_tap", (16, 8, 3, 3), (8, 8))
    dense, shapes = conv(lb)
    feed = _feed(shapes)
    out = convert(dense, [lb], fmt="blocked").layers[0]
    assert out.fmt == "dense" and "conv_tap" in out.reason
    for fmt in ("compact", "sparse-initializer"):
        res = convert(dense, [lb], fmt=fmt)
        assert res.layers[0].fmt == fmt
        _check_close(res.model, dense, feed)


def test_padded_layer_blocked_falls_back_with_reason_compact_handles_padding():
    lb = _layer("layer.weight", "linear", (12, 40), (8, 16))
    assert lb.padded
    dense, shapes = gemm(lb)
    feed = _feed(shapes)
    out = convert(dense, [lb], fmt="blocked").layers[0]
    assert out.fmt == "dense" and "padded" in out.reason
    res = convert(dense, [lb], fmt="compact")
    assert res.layers[0].fmt == "compact"
    _check_close(res.model, dense, feed)


def test_forced_dense_and_grouped_conv_carry_a_reason():
    lb = _layer("layer.weight", "linear", (32, 48), (8, 8))
    dense, _ = gemm(lb)
    out = convert(dense, [lb], fmt="dense").layers[0]
    assert out.fmt == "dense" and out.reason == "dense requested"
    w = np.random.default_rng(0).standard_normal((16, 1, 3, 3)).astype(np.float32)
    dw = LayerBlocks("dw.weight", "conv_channel", w.shape, (8, 1), np.ones((2, 1), bool), weight=w)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 5, 5])
    m = _model([helper.make_node("Conv", ["x", "dw.weight"], ["y"], group=16, pads=[1, 1, 1, 1])], [x],
               {"dw.weight": w}, rank=4)
    for fmt in FORMATS:
        out = convert(m, [dw], fmt=fmt).layers[0]
        assert out.fmt == "dense" and out.reason == "grouped conv"


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_held_twice_is_stored_once_and_every_consumer_rewritten(fmt):
    """One weight, two copies (a module called twice: as is for a Gemm, transposed for a MatMul): merged into
    one initializer that both read; only the formulations that rebuild the tensor by name apply, and it is
    stored once."""
    lb = _layer("w", "linear", (16, 16), (8, 8))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    nodes = [helper.make_node("Gemm", ["x", "a"], ["h"], transB=1),
             helper.make_node("MatMul", ["h", "b"], ["y"])]
    m = _model(nodes, [x], {"a": lb.weight, "b": np.ascontiguousarray(lb.weight.T)})
    res = convert(m, [lb], fmt=fmt, timing_inputs={"x": np.ones((4, 16), np.float32)})
    out = res.layers[0]
    assert out.fmt in ("compact", "sparse-initializer", "dense")
    if fmt in ("blocked", "auto"):
        assert "feeds 3 nodes" in out.reason or "feeds 2 nodes" in out.reason
    stored = [t for t in res.model.graph.initializer if t.dims and np.prod(t.dims) >= 8 * 8]
    assert sum(int(np.prod(t.dims)) for t in stored) <= 16 * 16  # one copy at most
    _check_close(res.model, m, _feed({"x": (5, 16)}))
    assert measure_sparsity(res.model, [lb]).dense_count == 16 * 16


def test_weight_held_twice_in_different_forms_is_refused_not_guessed():
    """Two initializers that both match the weight but differ (scaled differently), neither under its name."""
    lb = _layer("w", "linear", (16, 16), (8, 8))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    m = _model([helper.make_node("Gemm", ["x", "a"], ["h"], transB=1),
                helper.make_node("Gemm", ["h", "b"], ["y"], transB=1)], [x],
               {"a": lb.weight, "b": lb.weight * 2})
    with pytest.raises(converters.WeightNotFound, match="refusing to guess"):
        convert(m, [lb], fmt="blocked")
    assert "refusing to guess" in converters.unplaceable(m, [lb])["w"]


def test_zero_scaled_weight_is_found_under_its_name():
    """A conv whose BatchNorm scale is 0 (timm's zero_init_last) folds to zeros: found by its name, not
    refused; an unnamed all-zero tensor matches nothing."""
    lb = _layer("conv.weight", "conv_channel", (16, 16, 3, 3), (8, 8))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 5, 5])
    zero = np.zeros_like(lb.weight)
    named = _model([helper.make_node("Conv", ["x", "conv.weight"], ["y"], pads=[1, 1, 1, 1])], [x],
                   {"conv.weight": zero}, rank=4)
    (site,), _ = converters.locate(named, [lb])
    assert site.init_name == "conv.weight" and not site.weight.any()
    half = zero.copy()
    half[8:] = 3.0 * lb.weight[8:]  # half the channels scaled by 0, half by 3
    m = _model([helper.make_node("Conv", ["x", "other"], ["y"], pads=[1, 1, 1, 1])], [x], {"other": half},
               rank=4)
    assert converters.locate(m, [lb])[0][0].init_name == "other"
    unnamed = _model([helper.make_node("Conv", ["x", "other"], ["y"], pads=[1, 1, 1, 1])], [x],
                     {"other": zero}, rank=4)
    assert "no initializer" in converters.unplaceable(unnamed, [lb])["conv.weight"]


def test_convert_leaves_its_input_untouched_and_rejects_unknown_format():
    lb = _layer("layer.weight", "linear", (32, 48), (8, 8))
    dense, _ = gemm(lb)
    before = dense.SerializeToString()
    convert(dense, [lb], fmt="blocked")
    assert dense.SerializeToString() == before
    with pytest.raises(converters.ConverterError, match="expected one of"):
        convert(dense, [lb], fmt="csr")


@pytest.mark.parametrize("seed", range(5))
def test_buckets_partition_rows_into_at_most_four_groups(seed):
    counts = np.random.default_rng(seed).integers(1, 20, size=37)
    groups = buckets(counts)
    assert 1 <= len(groups) <= MAX_BUCKETS
    assert sorted(np.concatenate(groups).tolist()) == list(range(37))
    padded = sum(len(g) * counts[g].max() for g in groups)
    assert padded <= len(counts) * counts.max()
    assert len(buckets(np.full(9, 4))) == 1


def test_run_onnx_batches_like_one_run():
    lb = _layer("layer.weight", "linear", (32, 48), (8, 8))
    dense, _ = gemm(lb)
    feed = {"x": np.random.default_rng(2).standard_normal((23, 48)).astype(np.float32)}
    whole = session(dense).run(None, feed)[0]
    np.testing.assert_array_equal(run_onnx(dense, feed, batch_size=5)[0], whole)


def _ort_optimized_ops(model) -> Counter:
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = f"{d}/opt.onnx"
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("act", ["Relu", "Gelu"])
def test_consecutive_3d_blocked_linears_leave_two_transposes_after_ort(act):
    """x [N, T, 32] -> MatMul -> +b1 -> act -> MatMul -> +b2: the Reshape pair between the two blocked layers
    is removed (converters.chain), so ORT cancels the inner Transpose pair and 2 Transposes remain."""
    l1 = _layer("l1.weight", "linear", (64, 32), (8, 8), seed=1)
    l2 = _layer("l2.weight", "linear", (32, 64), (8, 8), seed=2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32])
    act_node = (helper.make_node("Gelu", ["a"], ["h"], domain="") if act == "Gelu"
                else helper.make_node("Relu", ["a"], ["h"]))
    nodes = [helper.make_node("MatMul", ["x", "w1t"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a"]),
             act_node, helper.make_node("MatMul", ["h", "w2t"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    inits = {"w1t": np.ascontiguousarray(l1.weight.T), "w2t": np.ascontiguousarray(l2.weight.T),
             "b1": np.linspace(-1, 1, 64, dtype=np.float32), "b2": np.linspace(-1, 1, 32, dtype=np.float32)}
    dense = _model(nodes, [x], inits, rank=3)
    dense.opset_import[0].version = 20  # Gelu
    res = convert(dense, [l1, l2], fmt="blocked")
    assert [o.fmt for o in res.layers] == ["blocked", "blocked"]
    _check_close(res.model, dense, _feed({"x": (4, 3, 32)}))
    assert _ort_optimized_ops(res.model)["Transpose"] == 2


def test_exported_transformer_ffn_transposes_cancel_in_ort():
    """The exporter's 3-D FFN (MatMul -> Add(b) -> Relu -> MatMul) keeps only the Transposes at its two ends
    after ORT's optimizations; attention out_proj (Gemm between LayerNorm and the residual Add) keeps its
    two."""
    import torch

    from converters import export_onnx
    from sapp_compress import zoo

    torch.manual_seed(0)
    model = zoo.TransformerClassifier(vocab=16, d_model=32, n_heads=4, dim_ff=64, n_layers=2,
                                      max_len=8).eval()
    rng = np.random.default_rng(0)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("encoder"):
            w = m.weight.detach()
            R, C = w.shape[0] // 8, w.shape[1] // 8
            lb = LayerBlocks(f"{name}.weight", "linear", tuple(w.shape), (8, 8),
                             _kept(rng, R, C, max(1, C // 4), True))
            with torch.no_grad():
                m.weight.mul_(torch.from_numpy(element_mask(lb)))
            layers.append(LayerBlocks(lb.name, "linear", lb.weight_shape, (8, 8), lb.kept,
                                      weight=m.weight.detach().numpy().copy()))
    tokens = torch.randint(0, 16, (3, 8))
    dense = export_onnx(model, (tokens,), input_names=["tokens"])
    res = convert(dense, layers, fmt="blocked")
    assert all(o.fmt == "blocked" for o in res.layers) and len(layers) == 6
    with torch.no_grad():
        expected = model(tokens).numpy()
    converters.verify(res.model, {"tokens": tokens.numpy()}, [expected], atol=1e-5, rtol=1e-4)
    extra = _ort_optimized_ops(res.model)["Transpose"] - _ort_optimized_ops(dense)["Transpose"]
    assert extra == 2 * 2 + 2 * 2  # per encoder layer: out_proj in/out, FFN in/out


@pytest.mark.parametrize("opset", [18, 20], ids=["gelu-decomposed", "gelu-op"])
def test_exported_3d_gelu_mlp_keeps_two_transposes(opset):
    """torch exports GELU as Div/Erf/Add/Mul/Mul (x used twice) below opset 20 and as one Gelu from 20: either
    way the Reshape pair between the blocked layers goes and ORT cancels the inner Transposes."""
    import torch

    from converters import export_onnx

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
    rng = np.random.default_rng(0)
    layers = []
    for name, lin in m.named_modules():
        if isinstance(lin, torch.nn.Linear):
            R, C = lin.weight.shape[0] // 8, lin.weight.shape[1] // 8
            lb = LayerBlocks(f"{name}.weight", "linear", tuple(lin.weight.shape), (8, 8),
                             _kept(rng, R, C, 2, True))
            with torch.no_grad():
                lin.weight.mul_(torch.from_numpy(element_mask(lb)))
            layers.append(LayerBlocks(lb.name, "linear", lb.weight_shape, (8, 8), lb.kept,
                                      weight=lin.weight.detach().numpy().copy()))
    x = torch.randn(2, 5, 32)
    dense = export_onnx(m, (x,), opset=opset)
    res = convert(dense, layers, fmt="blocked")
    with torch.no_grad():
        converters.verify(res.model, {"x": x.numpy()}, [m(x).numpy()], atol=1e-6, rtol=1e-4)
    assert _ort_optimized_ops(res.model)["Transpose"] == 2


@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "unbalanced"])
def test_linear_chunks_match_dense(monkeypatch, balanced):
    """Chunked block-rows (converters.ops.chunk_rows): same numbers; balanced chunks join by Concat alone."""
    import converters.ops as ops

    monkeypatch.setattr(ops, "CHUNK_BYTES", 2 * 8 * ops.REFERENCE_BATCH * 4)  # 1-2 block-rows per chunk
    lb = _layer("layer.weight", "linear", (64, 48), (8, 8), balanced)
    dense, shapes = gemm(lb)
    res = convert(dense, [lb], fmt="blocked")
    _check_close(res.model, dense, _feed(shapes))
    ops_count = Counter(n.op_type for n in res.model.graph.node)
    assert ops_count["MatMul"] >= 4 and ops_count["Concat"] == 1
    assert ops_count["Gather"] == ops_count["MatMul"] + (0 if balanced else 1)
