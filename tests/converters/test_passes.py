"""Whole-graph passes: the function is unchanged, only the pattern ORT would fuse is rewritten, and a pass is
applied only when the choice has inputs to time it on."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters.passes import choose, unfused_layernorm
from converters.runtime import run_onnx


def _graph() -> onnx.ModelProto:
    """x + r -> LayerNorm (fusable), and a second Add whose output is also used elsewhere (left alone)."""
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(n, f, [2, 4, 16]) for n in ("x", "r")]
    inits = [numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), "g"),
             numpy_helper.from_array(np.linspace(-1, 1, 16).astype(np.float32), "b")]
    nodes = [helper.make_node("Add", ["x", "r"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1),
             helper.make_node("Add", ["y", "x"], ["t"]),
             helper.make_node("LayerNormalization", ["t", "g", "b"], ["z"], axis=-1),
             helper.make_node("Mul", ["t", "z"], ["w"])]
    outs = [helper.make_tensor_value_info("w", f, None)]
    return helper.make_model(helper.make_graph(nodes, "g", ins, outs, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_unfused_layernorm_keeps_the_function_and_stops_the_fusion(tmp_path):
    m = _graph()
    u, n = unfused_layernorm(m)
    assert n == 1 and [x.op_type for x in u.graph.node] == ["Sum", "LayerNormalization", "Add",
                                                            "LayerNormalization", "Mul"]
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal((2, 4, 16)).astype(np.float32) for k in ("x", "r")}
    np.testing.assert_allclose(run_onnx(u, feed)[0], run_onnx(m, feed)[0], rtol=1e-5, atol=1e-6)
    import onnxruntime as ort

    def optimized_ops(model):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [x.op_type for x in onnx.load(str(tmp_path / "opt.onnx")).graph.node]

    assert "SkipLayerNormalization" in optimized_ops(m)
    fused = "SkipLayerNormalization"
    assert optimized_ops(u).count(fused) == optimized_ops(m).count(fused) - 1


def test_choose_applies_nothing_without_timing_inputs():
    m = _graph()
    c = choose(m, None)
    assert c.applied == [] and c.model is m
    c = choose(m, {k: np.ones((2, 4, 16), np.float32) for k in ("x", "r")}, threads=1, cache=None)
    assert set(c.latencies_ms) == {"unfused_layernorm:off", "unfused_layernorm:on"}
    assert c.applied in ([], ["unfused_layernorm"])
