"""int8 convs (:mod:`converters.qdq`): ORT's QDQ form over the block-sparse (grouped) or compact conv graphs.

Stated tolerances:

- ORT's fused integer kernels against the graph's own quantize / dequantize reference (ORT with optimizations
  off): 2 % of the output's scale (measured 0.7 % on resnet18 and the digits CNN: requantization rounding);
- against PyTorch in fp32: 10 % of the output's scale (static per-tensor uint8 activations through 3-5
  quantized layers; measured 1-4 % on these graphs).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from zoo_cases import build_case, feed, names_for

from converters import convert, export_onnx, measure_sparsity, verify_kernels
from converters.runtime import session

CONV_CASES = ["rescnn_bn", "dscnn", "cnn1d"]


def _proto(case, balanced):
    model, manifest, _, xs = build_case(case, balanced)
    proto = export_onnx(model, tuple(x[:2] for x in xs), input_names=names_for(xs))
    with torch.no_grad():
        ref = model(*xs).numpy()
    return proto, manifest, xs, ref


def _fused_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types ORT actually runs (its optimized graph, saved)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("fmt", ["blocked", "compact"])
@pytest.mark.parametrize("balanced", [True, False])
def test_int8_convs(case, fmt, balanced, tmp_path):
    proto, manifest, xs, ref = _proto(case, balanced)
    res = convert(proto, manifest, fmt=fmt, quantize="int8", calibration_inputs=feed(xs))
    onnx.checker.check_model(res.model, full_check=True)
    convs = [lo for lo in res.layers if lo.op_type == "Conv"]
    assert convs and {lo.fmt for lo in convs} == {f"{fmt}-int8"}
    for lo in convs:
        assert lo.int8["activation"] == "static" and lo.int8["kernel"] == "QLinearConv"
        # int8 kept blocks: about a quarter of the fp32 ones (plus block ids or per-channel scales)
        assert lo.stored_bytes < 0.5 * (1 - 0.8) * lo.dense_bytes + 1024
    # ORT runs every int8 conv (and the unpruned ones of a conv net) as QLinearConv
    ops = _fused_ops(res.model, tmp_path)
    assert ops.count("QLinearConv") >= sum(1 for n in proto.graph.node if n.op_type == "Conv")
    assert "Conv" not in ops
    # the int8 weights keep every pruned block at zero: the achieved sparsity is the manifest's
    sp = measure_sparsity(res.model, manifest)
    for lb in manifest:
        intended = 1 - lb.kept.sum() * lb.block[0] * lb.block[1] / np.prod(lb.view_shape)
        assert sp.per_layer[lb.name] >= intended - 1e-9
    out = session(res.model).run(None, feed(xs))[0]
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 0.1 * scale
    v = verify_kernels(res.model, feed(xs), rtol=0.02)
    assert v.passed and v.max_rel_diff <= 0.02


def test_without_calibration_convs_stay_fp32():
    proto, manifest, xs, _ = _proto("rescnn_bn", True)
    res = convert(proto, manifest, fmt="blocked", quantize="int8")
    assert {lo.fmt for lo in res.layers if lo.op_type == "Conv"} == {"blocked"}
    assert not any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)


def test_qdq_is_byte_deterministic():
    proto, manifest, xs, _ = _proto("rescnn_bn", False)
    a = convert(proto, manifest, fmt="compact", quantize="int8", calibration_inputs=feed(xs))
    b = convert(proto, manifest, fmt="compact", quantize="int8", calibration_inputs=feed(xs))
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_auto_times_int8_convs():
    """auto ranks the int8 convs with the fp32 formulations per layer, then keeps them only if the whole model
    is not slower than with them in fp32: whatever it picks, the model is valid and within the int8 bound."""
    proto, manifest, xs, ref = _proto("rescnn_bn", True)
    x = feed(xs)
    res = convert(proto, manifest, fmt="auto", quantize="int8",
                  timing_inputs={k: v[:8] for k, v in x.items()},
                  calibration_inputs=x, threads=1)
    onnx.checker.check_model(res.model, full_check=True)
    for lo in res.layers:
        assert lo.latencies_ms and lo.fmt in lo.latencies_ms
        if lo.op_type == "Conv":
            assert {"blocked-int8", "compact-int8", "blocked", "compact"} <= set(lo.latencies_ms)
    out = session(res.model).run(None, x)[0]
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def test_float_reference_is_the_integer_matmul():
    """The kernel check's reference computes MatMulInteger in float: exact against int64 numpy at the extremes
    (u8 255 against s8 +-127, where the AVX2 kernels' int16 pair sums would saturate), and no integer matmul
    is left in it."""
    from onnx import TensorProto, helper, numpy_helper

    from converters.verify import float_reference

    rng = np.random.default_rng(0)
    a = rng.choice(np.array([0, 255], np.uint8), size=(4, 512))
    b = rng.choice(np.array([-127, 127], np.int8), size=(512, 8))
    za, zb = np.uint8(3), np.int8(0)
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 512])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])],
        initializer=[numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.asarray(za), "za"),
                     numpy_helper.from_array(np.asarray(zb), "zb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    ref = float_reference(m)
    assert "MatMulInteger" not in [n.op_type for n in ref.graph.node]
    onnx.checker.check_model(ref, full_check=True)
    exact = (a.astype(np.int64) - int(za)) @ b.astype(np.int64)
    got = session(ref, optimize=False).run(None, {"a": a})[0]
    assert got.dtype == np.int32 and np.array_equal(got, exact)


def test_kernel_check_on_dynamic_linears():
    """The MLP's blocked-int8 linears (DynamicQuantizeLinear -> MatMulInteger, fused by ORT into
    MatMulIntegerToFloat) against their float reference: float32 rounding only (1e-5 of the output's
    scale)."""
    model, manifest, _, xs = build_case("mlp", True)
    proto = export_onnx(model, tuple(x[:2] for x in xs), input_names=names_for(xs))
    res = convert(proto, manifest, fmt="blocked", quantize="int8")
    assert {lo.fmt for lo in res.layers} == {"blocked-int8"}
    v = verify_kernels(res.model, feed(xs), atol=0.0, rtol=1e-5)
    assert v.passed
