"""The command's surface beyond bad input: shard auto-pick, unexpected failures, TorchScript, help/version."""
import json

import pytest
import torch
from conftest import ROOT, one_line_error
from torch import nn

FAST = ["--steps", "5", "--onnx-format", "compact"]


@pytest.mark.parametrize("model, shard", [("digits_cnn", "digits_img.npz"), ("ctr_mlp", "ctr.npz")])
def test_without_data_picks_the_shipped_shard_that_fits(run_cli, tmp_path, model, shard):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code, err = run_cli(ROOT / "examples" / "models" / f"{model}.pt", "-o", out, "--report", rep, *FAST)
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert r["data"]["train"].endswith(shard) and r["exit_code"] == 0 and out.exists()


def test_no_shipped_shard_fits_asks_for_data(run_cli, tmp_path):
    path, out, rep = tmp_path / "odd.pt", tmp_path / "m.onnx", tmp_path / "r.json"
    torch.save(nn.Sequential(nn.Linear(7, 32), nn.ReLU(), nn.Linear(32, 3)), path)
    code, err = run_cli(path, "-o", out, "--report", rep, *FAST)
    assert code == 2 and one_line_error(err) and "pass --data" in err, err
    assert not out.exists()
    r = json.loads(rep.read_text())  # the report is written on failure too and says why
    assert r["exit_code"] == 2 and "pass --data" in r["error"] and r["accuracy"]["onnx"] is None


# torch.jit is deprecated; users still have archives
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_a_one_line_usage_error(run_cli, tmp_path, mlp_path):
    path, out = tmp_path / "ts.pt", tmp_path / "m.onnx"
    torch.jit.save(torch.jit.script(torch.load(mlp_path, weights_only=False)), path)
    code, err = run_cli(path, "-o", out)
    assert code == 2 and one_line_error(err) and "TorchScript" in err, err
    assert not out.exists()


def test_unexpected_failure_exits_1_traceback_only_with_verbose(run_cli, tmp_path, mlp_path, monkeypatch):
    import converters

    def broken(*a, **k):
        raise RuntimeError("simulated exporter defect\nsecond line")

    monkeypatch.setattr(converters, "export_onnx", broken)
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, *FAST)
    assert code == 1 and one_line_error(err), err
    assert "RuntimeError: simulated exporter defect" in err and "second line" not in err
    assert not out.exists()
    code, err = run_cli(mlp_path, "-o", out, "-v", *FAST)
    assert code == 1 and "Traceback" in err and "simulated exporter defect" in err
    assert not out.exists()


def test_save_torch_loads_without_trust(run_cli, tmp_path, mlp_path):
    """The pruned module is saved so that the safe loader (and so this command) takes it back."""
    out, pt = tmp_path / "m.onnx", tmp_path / "p.pt"
    code, err = run_cli(mlp_path, "-o", out, "--save-torch", pt, "-q", *FAST)
    assert code == 0, err
    assert err.strip() == ""  # -q: nothing but errors
    from sapp_compress.io.loading import load_model

    model = load_model(pt)
    assert any((p == 0).any() for p in model.parameters())


def test_help_lists_every_contract_option_and_version(run_cli):
    from click.testing import CliRunner

    from sapp_compress import __version__
    from sapp_compress.cli import main

    text = CliRunner().invoke(main, ["--help"]).output
    for opt in ("--output", "--block", "--sparsity", "--method", "--data", "--eval-data", "--epochs",
                "--steps", "--batch-size", "--lr", "--device", "--seed", "--onnx-format",
                "--max-accuracy-drop", "--atol", "--rtol", "--report", "--trust-model", "--save-torch",
                "--arch", "--balanced", "--min-blocks", "--indivisible", "--include", "--exclude",
                "--conv-layout", "--weight-decay", "--threads", "--export-batch-size", "--quiet", "--verbose",
                "--version"):
        assert opt in text, opt
    for name in ("sapp", "acdc", "magnitude", "gmp", "powerprop", "blocked", "compact", "sparse-initializer"):
        assert name in text, name
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_click_usage_errors_exit_2(run_cli, tmp_path, mlp_path):
    code, err = run_cli(mlp_path)  # no -o
    assert code == 2 and "Missing option" in err
    code, err = run_cli(mlp_path, "-o", tmp_path / "m.onnx", "--method", "nope")
    assert code == 2 and "Invalid value for '--method'" in err


def test_method_options_reach_the_method_and_the_report(run_cli, tmp_path, mlp_path):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code, err = run_cli(mlp_path, "-o", out, "--report", rep, "--method-option", "cycles=1",
                        "--method-option", "logit_norm=element", "--method-option", "logit_lr=1.0", *FAST)
    assert code == 0, err
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["prune"]["method_options"] == {"cycles": 1, "logit_norm": "element", "logit_lr": 1.0}
