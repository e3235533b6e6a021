"""The runtime interface (:mod:`converters.runtimes`): its two entries, the current runtime a job sets, the
timing cache keyed by it, and OpenVINO's entry itself (sessions against ONNX Runtime, an op it cannot read
named, NNCF's int8 against its own quantization reference). The OpenVINO tests skip, with the extra to
install, where it is not installed."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import converters
from converters import ConverterError, TimingKey, runtimes
from converters.export import export_onnx
from converters.runtimes import RuntimeMissing, current, use
from converters.runtimes.openvino import OPENVINO

needs_openvino = pytest.mark.skipif(
    OPENVINO.missing() is not None,
    reason=f"the OpenVINO runtime needs {OPENVINO.missing()}: pip install 'sapp-compress[openvino]'")


def _mlp_and_feed(rows: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    x = torch.randn(rows, 24)
    proto = export_onnx(m, (x[:2],))
    return m, proto, {proto.graph.input[0].name: x.numpy()}


def test_two_entries_and_ort_outside_a_job():
    assert list(runtimes.RUNTIMES) == ["ort", "openvino"]
    assert current().name == "ort"
    assert runtimes.get("ort").int8_forms == ("dynamic", "static")
    assert runtimes.get("openvino").int8_forms == ("nncf", "dynamic")
    with pytest.raises(ValueError, match="expected one of"):
        runtimes.get("tensorrt")


def test_a_missing_runtime_names_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("openvino", "nncf") else real(name, *a))
    assert "openvino and nncf (not installed)" == OPENVINO.missing()
    with pytest.raises(RuntimeMissing, match=r"pip install 'sapp-compress\[openvino\]'"):
        with use("openvino"):
            pass
    assert current().name == "ort"


@needs_openvino
def test_use_sets_the_runtime_for_the_block_and_the_timing_key_says_which():
    outside = TimingKey("k", "", "", "", "", "", "fp32", 1)
    with use("openvino") as rt:
        assert current() is rt
        inside = TimingKey("k", "", "", "", "", "", "fp32", 1)
    assert current().name == "ort"
    assert outside.runtime.startswith("ort ") and inside.runtime == f"openvino {rt.version()} f32"
    assert outside.sha256 != inside.sha256  # one runtime's timings are never read for another's


@needs_openvino
def test_openvino_computes_what_onnx_runtime_does_at_every_batch():
    """Compiled once per input shape: 32 rows in chunks of 10 (three shapes), outputs copied out of the
    infer request (a later run does not overwrite an earlier result)."""
    m, proto, feed = _mlp_and_feed()
    ref = converters.run_onnx(proto, feed)[0]
    with use("openvino"):
        sess = runtimes.current().session(proto, threads=1)
        got = converters.run_onnx(proto, feed, batch_size=10, sess=sess)[0]
        first = sess.run(None, {k: v[:10] for k, v in feed.items()})[0]
        sess.run(None, {k: v[10:20] for k, v in feed.items()})
        assert sess.precision() == "f32"  # the hint set explicitly, as the plugin reports it
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first, ref[:10], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, m(torch.from_numpy(feed[next(iter(feed))])).detach().numpy(), atol=1e-5)


@needs_openvino
def test_an_op_openvino_cannot_read_is_named():
    """ONNX's Det runs in ONNX Runtime; OpenVINO 2026.4 has no conversion for it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "det", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 3)).astype(np.float32)}
    np.testing.assert_allclose(converters.run_onnx(model, feed)[0], np.linalg.det(feed["x"]), rtol=1e-4)
    with use("openvino"), pytest.raises(ConverterError, match=r"OpenVINO .*cannot read the graph: .*Det"):
        converters.run_onnx(model, feed)


@needs_openvino
def test_nncf_int8_runs_on_openvinos_int8_kernels_within_the_quantization_reference():
    """NNCF's form (QDQ ONNX) built untimed: its QuantizeLinear nodes are there, OpenVINO's integer kernels
    match the graph's own quantize / dequantize reference (ONNX Runtime, optimizations off) to 1e-3 of the
    output's scale (7-bit weights on a CPU without VNNI keep the int16 pair sums from saturating), and the
    int8 model stays within 10 % of the fp32 output's scale."""
    m, proto, feed = _mlp_and_feed(rows=64)
    fp32 = converters.run_onnx(proto, feed)[0]
    with use("openvino"):
        whole = converters.quantize_whole(proto, calibration_inputs=feed, form="nncf")
        assert whole.form == "nncf"
        assert sum(n.op_type == "QuantizeLinear" for n in whole.model.graph.node) >= 2
        k = converters.verify_kernels(whole.model, feed, rtol=1e-3)
        got = converters.run_onnx(whole.model, feed)[0]
    assert k.passed and list(k.per_session) == ["optimizations_on_vs_off"]
    assert np.abs(got - fp32).max() <= 0.1 * np.abs(fp32).max()
    onnx.checker.check_model(whole.model)


@needs_openvino
def test_quantize_whole_in_openvino_times_nncf_against_fp32():
    """The choice is measured in OpenVINO: every form timed, the fastest kept (fp32 where no int8 form is
    faster, as on CPUs without VNNI), with the reason."""
    _, proto, feed = _mlp_and_feed(rows=64)
    with use("openvino"):
        whole = converters.quantize_whole(proto, timing_inputs={k: v[:8] for k, v in feed.items()},
                                          calibration_inputs=feed)
    assert set(whole.latencies_ms) == {"fp32", "nncf", "dynamic"}
    assert whole.form == min(whole.latencies_ms, key=whole.latencies_ms.get)
    assert ("fastest measured" in whole.reason) == (whole.form == "nncf")
