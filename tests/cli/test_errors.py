"""Bad input: each case exits with its documented code, prints one line (no traceback) and leaves no
output."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, one_line_error, save_npz

FAST = ["--steps", "20", "--onnx-format", "compact"]


def _assert_failed(code, err, out, expected_code, match):
    assert code == expected_code, err
    assert one_line_error(err), err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp files left


def test_missing_model_file(run_cli, tmp_path):
    out = tmp_path / "m.onnx"
    code, err = run_cli(tmp_path / "nope.pt", "-o", out)
    _assert_failed(code, err, out, 2, "no such file")


def test_file_that_is_not_a_model(run_cli, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    out = tmp_path / "m.onnx"
    code, err = run_cli(bad, "-o", out)
    _assert_failed(code, err, out, 2, "not a PyTorch file")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    code, err = run_cli(tmp_path / "dict.pt", "-o", out)
    _assert_failed(code, err, out, 2, "not an nn.Module")


def test_custom_class_needs_trust_model(run_cli, tmp_path):
    import custom_model

    path = tmp_path / "mine.pt"
    torch.save(custom_model.build(), path)
    out = tmp_path / "m.onnx"
    code, err = run_cli(path, "-o", out)
    _assert_failed(code, err, out, 2, "custom_model.MyNet, which is not a torch.nn class; pass --trust-model")
    code, err = run_cli(path, "-o", out, "--trust-model", "--data", ROOT / "calib_data" / "digits.npz", *FAST)
    assert code == 0, err
    assert out.exists()


def test_state_dict_with_arch(run_cli, tmp_path):
    import custom_model

    path = tmp_path / "sd.pt"
    torch.save(custom_model.build().state_dict(), path)
    out = tmp_path / "m.onnx"
    code, err = run_cli(path, "-o", out)
    _assert_failed(code, err, out, 2, "pass --arch module:callable")
    code, err = run_cli(path, "-o", out, "--arch", "custom_model:build", *FAST)
    assert code == 0, err


def test_pickle_that_runs_code_does_not_run(run_cli, tmp_path):
    import custom_model

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": custom_model.Evil(str(marker))}, path)
    out = tmp_path / "m.onnx"
    code, err = run_cli(path, "-o", out)
    _assert_failed(code, err, out, 2, "pass --trust-model")
    assert not marker.exists()


@pytest.mark.parametrize("s", ["0", "1", "1.5", "-0.2"])
def test_sparsity_out_of_range(run_cli, tmp_path, mlp_path, s):
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--sparsity", s)
    _assert_failed(code, err, out, 2, "0 < s < 1")


@pytest.mark.parametrize("b", ["0", "8x0", "x8", "abc"])
def test_bad_block(run_cli, tmp_path, mlp_path, b):
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--block", b)
    _assert_failed(code, err, out, 2, "block")


@pytest.mark.parametrize("opt, match", [
    ("bogus=1", "method sapp: unknown options ['bogus']"),
    ("cycles=abc", "method sapp: option cycles: expected int, got 'abc'"),
    ("cycles=2.5", "method sapp: option cycles: expected int, got 2.5"),
    ("c=-1", "c: expected a positive schedule steepness, got -1"),
    ("logit_lr=0", "logit_lr: expected a positive multiple of lr, got 0"),
    ("revive", "expected KEY=VALUE, got 'revive'"),
])
def test_bad_method_option(run_cli, tmp_path, mlp_path, opt, match):
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--method-option", opt, *FAST)
    _assert_failed(code, err, out, 2, match)


def test_block_larger_than_every_layer(run_cli, tmp_path, mlp_path):
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--block", "512", *FAST)
    _assert_failed(code, err, out, 2, "no layer can be pruned at block 512x512")


def test_shard_that_does_not_fit(run_cli, tmp_path, mlp_path):
    shard = save_npz(tmp_path / "wrong.npz", x=np.zeros((50, 30), np.float32), y=np.zeros(50, np.int64))
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--data", shard, *FAST)
    _assert_failed(code, err, out, 2, "inputs of per-sample shape (30,) float32 do not fit the model")


def test_shard_with_nan(run_cli, tmp_path, mlp_path, digits_shard):
    x = digits_shard["x"].copy()
    x[5, 3] = np.nan
    shard = save_npz(tmp_path / "nan.npz", x=x, y=digits_shard["y"])
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--data", shard, *FAST)
    _assert_failed(code, err, out, 2, "x has NaN or Inf values (first in sample 5)")


def test_labels_out_of_range(run_cli, tmp_path, mlp_path, digits_shard):
    y = digits_shard["y"].copy()
    y[0] = 12
    shard = save_npz(tmp_path / "labels.npz", x=digits_shard["x"], y=y)
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--data", shard, *FAST)
    _assert_failed(code, err, out, 2, "class indices in [0, 9] for a model with 10 outputs, got values in "
                   "[0, 12]")


def test_unwritable_output_path(run_cli, tmp_path, mlp_path):
    out = tmp_path / "no_such_dir" / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, *FAST)
    assert code == 2 and one_line_error(err) and "does not exist" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(mlp_path, "-o", blocker / "m.onnx", *FAST)
    assert code == 2 and one_line_error(err)
    code, err = run_cli(mlp_path, "-o", tmp_path, *FAST)
    assert code == 2 and "is a directory" in err


def test_failed_gate_exits_4_and_reports(run_cli, tmp_path, mlp_path):
    import json

    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code, err = run_cli(mlp_path, "-o", out, "--report", rep, "--block", "16", "--sparsity", "0.97",
                        "--steps", "3", "--max-accuracy-drop", "0", "--onnx-format", "compact")
    _assert_failed(code, err, out, 4, "accuracy gate failed")
    r = json.loads(rep.read_text())
    assert r["exit_code"] == 4 and r["accuracy"]["drop"] > 0 and "accuracy gate failed" in r["error"]


def test_forced_verification_failure_exits_3(run_cli, tmp_path, mlp_path, monkeypatch):
    """Corrupt the stored kept values after conversion: the check must catch it (exit 3), not warn."""
    import json

    from onnx import numpy_helper

    import converters

    real = converters.convert

    def corrupting(*a, **k):
        res = real(*a, **k)
        values = res.layers[0].value_tensors[0]
        for t in res.model.graph.initializer:
            if t.name == values:
                arr = numpy_helper.to_array(t).copy()
                arr += 0.5  # every stored value: a single one may meet an always-zero input pixel
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
        return res

    monkeypatch.setattr(converters, "convert", corrupting)
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code, err = run_cli(mlp_path, "-o", out, "--report", rep, *FAST)
    _assert_failed(code, err, out, 3, "ONNX Runtime differs from the pruned PyTorch model")
    r = json.loads(rep.read_text())
    assert r["exit_code"] == 3 and r["verification"]["passed"] is False and \
        r["verification"]["max_abs_diff"] > 1e-3


@pytest.mark.slow
def test_sigint_exits_130_and_leaves_nothing(tmp_path, mlp_path):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sapp_compress", str(mlp_path), "-o", str(out), "--report", str(rep),
         "--steps", "100000", "--lr", "1e-3"], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        # a suite started in the background by a non-interactive shell runs with SIGINT ignored, which
        # children inherit (and Python then honours): the child gets the default disposition, as from a
        # terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # wait until fine-tuning is under way (its progress line), then interrupt
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and not line.startswith("fine-tune"):
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    err = line + proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "Error: interrupted" in err and "Traceback" not in err
    assert not out.exists()
    import json

    assert json.loads(rep.read_text())["exit_code"] == 130


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the clean failure on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_usage_error(run_cli, tmp_path, mlp_path):
    out = tmp_path / "m.onnx"
    code, err = run_cli(mlp_path, "-o", out, "--device", "cuda", *FAST)
    _assert_failed(code, err, out, 2, "cuda was asked for but torch.cuda.is_available() is False")
