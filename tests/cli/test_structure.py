"""``--structure channels`` through the CLI: a Hugging Face directory and a torchvision CNN end to end
(exit 0, verification, gate, report, a smaller ONNX and a smaller --save-torch model), int8, and the bad
inputs that must fail before the fine-tune."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import real_models  # noqa: E402
from conftest import one_line_error  # noqa: E402
from helpers import needs  # noqa: E402
from real_models import MODELS as CASES  # noqa: E402

from sapp_compress.cli import main  # noqa: E402

FAST = ["--structure", "channels", "--sparsity", "0.5", "--steps", "4", "--batch-size", "16"]





def run(case, tmp: Path, *args) -> tuple[int, str, dict]:
    np.savez(tmp / "shard.npz", **case.arrays)
    rep = tmp / "report.json"
    res = CliRunner().invoke(main, [str(case.path), "--data", str(tmp / "shard.npz"), "-o",
                                    str(tmp / "m.onnx"), "--report", str(rep), *case.args, *map(str, args)])
    return res.exit_code, res.output, json.loads(rep.read_text()) if rep.exists() else {}


def _onnx_params(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


@pytest.mark.slow
def test_hugging_face_directory(tmp_path):
    """BERT: 2 layers x (4 heads, 128 FFN neurons) and the pooler's 64 neurons, half of each removed; ONNX
    Runtime matches the smaller PyTorch model, the gate runs on the written ONNX, the file is smaller."""
    needs("transformers")
    case = CASES["bert"](tmp_path)
    code, out, rep = run(case, tmp_path, *FAST, "--max-accuracy-drop", "1.0", "--save-torch",
                         tmp_path / "m.pt")
    assert code == 0, out
    assert rep["verification"]["passed"] and rep["exit_code"] == 0
    fams = {lay["name"]: (lay["kind"], lay["units"], lay["kept_units"]) for lay in rep["layers"]}
    assert fams == {"bert.encoder.layer.0.attention (heads)": ("heads", 4, 2),
                    "bert.encoder.layer.1.attention (heads)": ("heads", 4, 2),
                    "bert.encoder.layer.0 (neurons)": ("neurons", 128, 64),
                    "bert.encoder.layer.1 (neurons)": ("neurons", 128, 64),
                    "bert.pooler.dense (neurons)": ("neurons", 64, 32)}
    assert all(lay["onnx_format"] == "dense" for lay in rep["layers"])
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rep["onnx_bytes"] < 0.9 * rep["dense_onnx_bytes"]
    assert rep["accuracy"]["onnx"] is not None and rep["accuracy"]["drop"] is not None
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "residual" in reasons["bert.encoder.layer.0.attention.output.dense.weight[0]"]
    assert [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input] == \
        ["input_ids", "attention_mask"]
    small = torch.load(tmp_path / "m.pt", weights_only=False)  # the --save-torch model is itself smaller
    att = small.bert.encoder.layer[0].attention
    assert (att.self.query.out_features, att.output.dense.in_features) == (32, 32)
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 64
    p = rep["structure"]["parameters"]
    assert sum(x.numel() for x in small.parameters()) == p["pruned"] < p["dense"]


@pytest.mark.slow
def test_torchvision_cnn_int8(tmp_path):
    """resnet18: the first conv of each block loses half its channels (with its BatchNorm and the next conv's
    inputs); --quantize int8 puts the smaller graph in ORT's fastest int8 form here, verified in stages."""
    needs("torchvision")
    case = CASES["resnet18"](tmp_path)
    code, out, rep = run(case, tmp_path, *FAST, "--quantize", "int8")
    assert code == 0, out
    assert len(rep["layers"]) == 8 and all(lay["kind"] == "channels" for lay in rep["layers"])
    assert {lay["kept_units"] * 2 for lay in rep["layers"]} == {64, 128, 256, 512}
    assert rep["int8"]["form"] in ("static", "dynamic", "fp32") and "fp32" in rep["int8"]["latencies_ms"]
    ver = rep["verification"]
    assert ver["passed"]
    if rep["int8"]["form"] != "fp32":
        assert set(ver["stages"]) == {"fp32", "int8_kernels"} and ver["precision"] == "int8"
    assert _onnx_params(tmp_path / "m.onnx") < 0.8 * sum(p.numel() for p in case.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize(("name", "library"), [("mobilenet_v3_small", "torchvision"),
                                               ("efficientnet", "timm")])
def test_squeeze_excitation_cnns(name, library, tmp_path):
    """Library CNNs with squeeze-excitation blocks (torchvision's mobilenet_v3_small, timm's efficientnet_b0):
    the expansion channels, the squeeze units and the depthwise convs' channels go together, the coupled decay
    reaches the up projection that two families touch (it raised KeyError in the first training step), and the
    smaller model runs in ORT as the pruned one does."""
    needs(library)
    case = CASES[name](tmp_path)
    code, out, rep = run(case, tmp_path, *FAST)
    assert code == 0, out
    kept = {lay["name"]: (lay["units"], lay["kept_units"]) for lay in rep["layers"]}
    assert len(kept) >= 10 and all(k < n for n, k in kept.values())
    assert rep["verification"]["passed"]
    assert _onnx_params(tmp_path / "m.onnx") < 0.7 * sum(p.numel() for p in case.model.parameters())


@pytest.mark.slow
def test_channel_shuffle_cnn(tmp_path):
    """torchvision's shufflenet_v2: a channel shuffle interleaves a conv's channels before a split, so the
    removal is exact only for keep sets that match across the families it makes; the plan's check (two keep
    sets) leaves those whole, the others are pruned, and the smaller model runs in ORT as the pruned one does
    (it failed: first on two families with one name, then on a removal check that one keep set had passed)."""
    tv = needs("torchvision")
    torch.manual_seed(0)
    case = real_models._torch(tmp_path, "shufflenet", tv.models.shufflenet_v2_x0_5(num_classes=10),
                              real_models._images(labels=10))
    code, out, rep = run(case, tmp_path, *FAST)
    assert code == 0, out
    names = [lay["name"] for lay in rep["layers"]]
    assert len(names) >= 10 and len(set(names)) == len(names)
    assert rep["verification"]["passed"] and rep["structure"]["parity"] <= 1e-4


def test_no_prunable_group_fails_before_the_fine_tune(tmp_path):
    torch.save(nn.Sequential(nn.Linear(8, 3)), tmp_path / "one.pt")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32),
             y=np.zeros(32, dtype=np.int64))
    t = time.perf_counter()
    res = CliRunner().invoke(main, [str(tmp_path / "one.pt"), "--data", str(tmp_path / "d.npz"), "-o",
                                    str(tmp_path / "o.onnx"), "--structure", "channels", "--steps", "100000"])
    assert res.exit_code == 2, res.output
    assert one_line_error(res.output) and "no attention head, neuron or channel can be removed" in res.output
    assert time.perf_counter() - t < 60 and not (tmp_path / "o.onnx").exists()


def test_group_count_that_rounds_to_zero(tmp_path):
    """Llama with 2 kv heads: --sparsity 0.75 would keep round(0.5) = 0 of them; exit 2, naming the family
    and the way out."""
    t = needs("transformers")
    m = t.LlamaForSequenceClassification(t.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, num_labels=3, pad_token_id=0))
    m.save_pretrained(tmp_path / "llama")
    ids = np.random.default_rng(0).integers(1, 96, size=(32, 8))
    np.savez(tmp_path / "d.npz", input_ids=ids, y=np.zeros(32, dtype=np.int64))
    res = CliRunner().invoke(main, [str(tmp_path / "llama"), "--data", str(tmp_path / "d.npz"), "-o",
                                    str(tmp_path / "o.onnx"), "--structure", "channels", "--sparsity", "0.75",
                                    "--steps", "100000"])
    assert res.exit_code == 2, res.output
    assert one_line_error(res.output)
    assert "= 0 of the 2 heads of model.layers.0.self_attn (heads)" in res.output and \
        "--exclude" in res.output


def test_block_options_are_said_not_to_apply(run_cli, tmp_path, mlp_path):
    code, err = run_cli(mlp_path, "-o", tmp_path / "o.onnx", "--structure", "channels", "--block", "16",
                        "--steps", "2", "--sparsity", "0.5")
    assert code == 0, err
    assert "--block does not apply to --structure channels" in err


def test_gate_and_verification_exit_codes(run_cli, tmp_path, mlp_path):
    """Exit 4 when the written ONNX loses more than allowed, exit 3 when ORT does not match at the asked
    tolerance; no output file either way."""
    out = tmp_path / "o.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--structure", "channels", "--sparsity", "0.97", "--steps", "1",
                        "--max-accuracy-drop", "0.01")
    assert code == 4, err
    assert not out.exists()
    code, err = run_cli(mlp_path, "-o", out, "--structure", "channels", "--sparsity", "0.5", "--steps", "1",
                        "--atol", "0", "--rtol", "0")
    assert code == 3, err
    assert not out.exists()
