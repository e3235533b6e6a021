"""Every zoo architecture, pruned at B = 8, s = 0.8 (and one at 4x16), exports, passes the checker, and
matches PyTorch in ONNX Runtime in every formulation; structure and size are checked on the final bytes."""
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from auto_rule import auto_rule_holds
from onnx import numpy_helper
from zoo_cases import CASES, build_case, feed, names_for

import converters
from converters import FORMATS, convert, export_onnx, measure_sparsity, verify

RTOL = 1e-4  # relative to max|output|
_EXPORTS: dict = {}


def _exported(name, balanced):
    key = (name, balanced)
    if key not in _EXPORTS:
        model, manifest, skipped, xs = build_case(name, balanced)
        proto = export_onnx(model, xs, input_names=names_for(xs))
        with torch.no_grad():
            expected = model(*xs).numpy()
        _EXPORTS[key] = (proto, manifest, skipped, xs, expected)
    return _EXPORTS[key]


def _dense_copies(model: onnx.ModelProto, manifest) -> list[str]:
    """Initializers that still hold a converted weight as a dense tensor (as is or transposed)."""
    found = []
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        for lb in manifest:
            if a.size == lb.weight.size and ((a.shape == lb.weight.shape and np.array_equal(a, lb.weight))
                                              or (a.shape == lb.weight.T.shape
                                                  and np.array_equal(a, lb.weight.T))):
                found.append(f"{t.name} ~ {lb.name}")
    return found


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "auto"])
@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "free"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_matches_pytorch_in_every_formulation(name, balanced, fmt):
    proto, manifest, skipped, xs, expected = _exported(name, balanced)
    assert manifest, f"{name}: nothing was pruned"
    res = convert(proto, manifest, fmt=fmt)
    ver = verify(res.model, feed(xs), [expected], atol=1e-5, rtol=RTOL, classifier=True)
    assert ver.passed
    assert ver.top1_agreement == (1.0 if expected.shape[-1] > 1 else None)
    ops = Counter(n.op_type for n in res.model.graph.node)
    converted = [o for o in res.layers if o.fmt == fmt]
    if fmt != "dense":
        assert not _dense_copies(res.model, [lb for lb in manifest if lb.name in {o.name for o in converted}])
    if fmt == "blocked":
        n_lin = sum(o.op_type in ("Gemm", "MatMul") for o in converted)
        n_conv = sum(o.op_type == "Conv" for o in converted)
        assert ops["Gather"] >= n_lin + n_conv
        grouped = [n for n in res.model.graph.node if n.op_type == "Conv"
                   and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        assert len(grouped) >= n_conv
    if fmt == "compact":
        assert ops["ScatterND"] == len(converted)
        assert all(a.s in (b"", b"none") for n in res.model.graph.node if n.op_type == "ScatterND"
                   for a in n.attribute if a.name == "reduction")
    if fmt == "sparse-initializer":
        assert sum(1 for n in res.model.graph.node if n.op_type == "Constant"
                   and any(a.name == "sparse_value" for a in n.attribute)) == len(converted)
    # sparsity measured from the final bytes equals the masks' (random weights have no exact zeros)
    sp = measure_sparsity(res.model, manifest)
    for lb in manifest:
        assert sp.per_layer[lb.name] == pytest.approx(1 - lb.n_kept / lb.n_blocks
                                                      if not lb.padded else sp.per_layer[lb.name], abs=1e-9)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_pruned_layer_is_converted_or_explained(name):
    proto, manifest, skipped, xs, expected = _exported(name, True)
    res = convert(proto, manifest, fmt="blocked")
    for o in res.layers:
        assert o.fmt == "blocked" or o.reason, o
    reasons = {s.name: s.reason for s in skipped}
    if name == "dscnn":
        assert any("depthwise" in r for r in reasons.values())
    if name == "transformer":
        # the fused q/k/v projection is pruned (block rows aligned with the split) and computed blocked
        assert {o.fmt for o in res.layers if "in_proj" in o.name} == {"blocked"}
        assert any("norm" in n and "normalisation" in r for n, r in reasons.items())
        assert {o.op_type for o in res.layers} == {"MatMul", "Gemm"}  # 3-D linears and the out_proj


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("fmt", ["blocked", "compact"])
def test_converted_weights_take_at_most_density_plus_5_percent(fmt, block):
    """Measured on the final bytes: (file - everything that is not a converted weight) <= (1-s)*dense*1.05."""
    from sapp_compress import PruneConfig, zoo
    from sapp_compress.blocks.geometry import plan_layers
    from sapp_compress.blocks.masks import attach, fold
    from sapp_compress.engine.methods import select_top_k

    torch.manual_seed(0)
    model = zoo.mlp([256, 512, 512, 256]).eval()
    cfg = PruneConfig(block=str(block), sparsity=0.8, balanced=True)
    layers = attach(plan_layers(model, cfg)[0], attention=False, powerprop=False, density=0.2)
    for layer in layers:
        R, C = layer.view.grid
        s = torch.rand(R, C)
        layer.set_mask(select_top_k(s, s, torch.ones(R, C, dtype=torch.bool), round(0.2 * C), per_row=True))
    manifest = fold(layers)
    x = torch.randn(4, 256)
    proto = export_onnx(model, (x,))
    dense_weights = sum(lb.weight.nbytes for lb in manifest)
    rest = proto.ByteSize() - dense_weights
    res = convert(proto, manifest, fmt=fmt)
    converted = res.model.ByteSize() - rest
    assert converted <= (1 - 0.8) * dense_weights * 1.05, (converted, dense_weights)
    assert sum(o.stored_bytes for o in res.layers) <= (1 - 0.8) * dense_weights * 1.05


def test_verification_catches_a_corrupted_value():
    proto, manifest, skipped, xs, expected = _exported("mlp", True)
    res = convert(proto, manifest, fmt="blocked")
    name = res.layers[0].value_tensors[0]
    for t in res.model.graph.initializer:
        if t.name == name:
            a = numpy_helper.to_array(t).copy()
            a.reshape(-1)[np.argmax(np.abs(a))] *= -3.0
            t.CopyFrom(numpy_helper.from_array(a, name))
    with pytest.raises(converters.VerificationError) as e:
        verify(res.model, feed(xs), [expected], atol=1e-5, rtol=RTOL)
    assert e.value.result is not None and not e.value.result.passed


def test_weight_that_cannot_be_found_fails_loudly():
    proto, manifest, *_ = _exported("mlp", True)
    lb = manifest[0]
    wrong = converters.LayerBlocks(lb.name, lb.layout, lb.weight_shape, lb.block, lb.kept, lb.padded,
                                   lb.weight + 1.0)
    with pytest.raises(converters.WeightNotFound, match="no initializer"):
        convert(proto, [wrong], fmt="blocked")


def test_export_does_not_mutate_the_model():
    model, manifest, _, xs = build_case("rescnn_bn", True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, xs)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_records_latencies_and_picks_a_measured_candidate():
    proto, manifest, skipped, xs, expected = _exported("mlp", True)
    res = convert(proto, manifest, fmt="auto", timing_inputs=feed(xs))
    for o in res.layers:
        assert o.latencies_ms and set(o.latencies_ms) >= {"dense", "compact", "blocked"}
        assert auto_rule_holds(o)
        assert o.fmt == "blocked" or o.reason
    verify(res.model, feed(xs), [expected], atol=1e-5, rtol=RTOL)
