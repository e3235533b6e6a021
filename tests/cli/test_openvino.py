"""``--runtime openvino`` end to end through the CLI: a Hugging Face encoder directory written as OpenVINO IR
and a torchvision CNN, each with ``--quantize int8`` (NNCF's form where it measures faster here), verified in
OpenVINO, gated, with the runtime in the report; and the bad inputs, which fail in seconds with one line and
exit 2. Skipped, with the extra to install, where OpenVINO is not installed (CI installs it)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from conftest import one_line_error  # noqa: E402
from helpers import needs  # noqa: E402
from real_models import MODELS as CASES  # noqa: E402

from converters.runtimes.openvino import OPENVINO  # noqa: E402
from sapp_compress.cli import main  # noqa: E402

needs_openvino = pytest.mark.skipif(
    OPENVINO.missing() is not None,
    reason=f"the OpenVINO runtime needs {OPENVINO.missing()}: pip install 'sapp-compress[openvino]'")

FAST = ["--structure", "channels", "--sparsity", "0.5", "--steps", "4", "--batch-size", "16"]


def run(case, tmp: Path, output: str, *args) -> tuple[int, str, dict]:
    np.savez(tmp / "shard.npz", **case.arrays)
    rep = tmp / "report.json"
    res = CliRunner().invoke(main, [str(case.path), "--data", str(tmp / "shard.npz"), "-o", str(tmp / output),
                                    "--report", str(rep), *case.args, *map(str, args)])
    return res.exit_code, res.output, json.loads(rep.read_text()) if rep.exists() else {}


def _check_runtime_report(rep: dict) -> None:
    rt = rep["runtime"]
    assert rt["name"] == "openvino" and rt["precision"] == "f32" and rt["version"] == OPENVINO.version()
    assert rt["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rep["versions"]["openvino"] == OPENVINO.version() and rep["versions"]["nncf"]
    sp = rt["speedup"]
    assert sp["runtime"] == "openvino" and sp["measured"] > 0 and sp["paired"]
    assert sp["dense_int8_form"] in ("nncf", "dynamic", "fp32")
    assert (sp["vs_dense_int8"] is None) == (sp["dense_int8_form"] == "fp32")
    ver = rep["verification"]
    assert ver["passed"] and set(ver["per_session"]) == {"openvino"}
    assert set(rep["int8"]["latencies_ms"]) == {"fp32", "nncf", "dynamic"}
    if rep["int8"]["form"] != "fp32":
        assert ver["precision"] == "int8" and set(ver["stages"]) == {"fp32", "int8_kernels"}
    else:  # no int8 form measured faster than fp32 here: the graph stays fp32, said in a warning
        assert ver["precision"] == "fp32" and any("stays fp32" in w for w in rep["warnings"])


@needs_openvino
@pytest.mark.slow
def test_hugging_face_encoder_as_openvino_ir(tmp_path):
    """BERT (2 layers, 4 heads) at half width, int8, gated, written as IR (.xml + .bin); the IR, compiled
    in OpenVINO, computes what the smaller PyTorch model (--save-torch) does."""
    import openvino as ov

    needs("transformers")
    case = CASES["bert"](tmp_path)
    code, out, rep = run(case, tmp_path, "m.xml", *FAST, "--runtime", "openvino", "--quantize", "int8",
                         "--max-accuracy-drop", "1.0", "--save-torch", tmp_path / "m.pt", "--threads", "1")
    assert code == 0, out
    assert rep["exit_code"] == 0 and rep["accuracy"]["onnx"] is not None
    _check_runtime_report(rep)
    assert "OpenVINO" in out and "ORT" not in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.")) == ["m.bin", "m.pt", "m.xml"]
    compiled = ov.Core().compile_model(str(tmp_path / "m.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    small = torch.load(tmp_path / "m.pt", weights_only=False).eval()
    feed = {k: case.arrays[k][:8] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = small(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    got = compiled(feed)[0]
    tol = 0.2 if rep["int8"]["form"] != "fp32" else 1e-4
    assert np.abs(got - want).max() <= 1e-4 + tol * np.abs(want).max()


@needs_openvino
@pytest.mark.slow
def test_torchvision_cnn_in_openvino(tmp_path):
    """resnet18 at half its inner channels, int8 measured in OpenVINO, verified there."""
    needs("torchvision")
    case = CASES["resnet18"](tmp_path)
    code, out, rep = run(case, tmp_path, "m.onnx", *FAST, "--runtime", "openvino", "--quantize", "int8",
                         "--max-accuracy-drop", "1.0", "--threads", "1")
    assert code == 0, out
    _check_runtime_report(rep)
    assert (tmp_path / "m.onnx").exists()
    assert {lay["kept_units"] * 2 for lay in rep["layers"]} == {64, 128, 256, 512}


def test_xml_output_needs_the_openvino_runtime(tmp_path, mlp_path):
    res = CliRunner().invoke(main, [str(mlp_path), "-o", str(tmp_path / "m.xml"), "--steps", "2"])
    assert res.exit_code == 2 and one_line_error(res.output)
    assert "--runtime openvino" in res.output and not list(tmp_path.iterdir())


def test_openvino_without_the_extra_fails_in_seconds(tmp_path, mlp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nncf" else real(name, *a))
    rep = tmp_path / "r.json"
    res = CliRunner().invoke(main, [str(mlp_path), "-o", str(tmp_path / "m.onnx"), "--runtime", "openvino",
                                    "--report", str(rep)])
    assert res.exit_code == 2 and one_line_error(res.output), res.output
    assert "nncf (not installed)" in res.output and "sapp-compress[openvino]" in res.output
    r = json.loads(rep.read_text())
    assert r["exit_code"] == 2 and "fine_tune" not in r["timings"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


class WithDet(nn.Module):
    """A model whose graph holds ONNX's Det, which ONNX Runtime runs and OpenVINO cannot read."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))

    def forward(self, x):
        h = self.body(x)
        return torch.cat([h, torch.linalg.det(h.reshape(-1, 4, 4)).unsqueeze(-1)], dim=-1)


@needs_openvino
def test_an_op_openvino_cannot_run_fails_before_the_fine_tune(tmp_path):
    """Exit 2 from the pre-check (the dense graph run in OpenVINO), naming the op, no fine-tune, no output;
    the same model goes through in ONNX Runtime's pre-check."""
    from sapp_compress.config import OutputConfig, PruneConfig, TrainConfig
    from sapp_compress.errors import UnsupportedModel
    from sapp_compress.pipeline import compress

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    np.savez(tmp_path / "shard.npz", x=x, y=rng.standard_normal((64, 17)).astype(np.float32))
    out = OutputConfig(output=tmp_path / "m.onnx", report=tmp_path / "r.json", runtime="openvino")
    with pytest.raises(UnsupportedModel, match=r"OpenVINO .* cannot run the model: .*Det"):
        compress(WithDet().eval(), PruneConfig(block="8", sparsity=0.5), TrainConfig(steps=2), out,
                 data=tmp_path / "shard.npz")
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["exit_code"] == 2 and "precheck" not in r["timings"] and "fine_tune" not in r["timings"]
    assert not (tmp_path / "m.onnx").exists()
