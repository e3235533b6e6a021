"""--quantize int8 through the CLI: the int8 artifact is verified (fp32 stage, ORT's int8 kernels against the
model's own quantization reference, then the int8 tolerance against PyTorch), gated and reported; a
verification it cannot pass is exit 3; a fixed format gives the same bytes for the same seed. The MLP's
linears take the dynamic int8 form, the digits CNN's convs the static (QDQ) one."""
import json

import onnx
import pytest

INT8 = ["--block", "8", "--sparsity", "0.8", "--steps", "30", "--quantize", "int8"]


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, mlp_path):
    from click.testing import CliRunner

    from sapp_compress.cli import main

    d = tmp_path_factory.mktemp("int8")
    res = CliRunner().invoke(main, [str(mlp_path), "-o", str(d / "m.onnx"), "--report", str(d / "r.json"),
                                    "--onnx-format", "blocked", "--max-accuracy-drop", "0.5", *INT8])
    return res, d


def test_int8_end_to_end_report_and_gate(int8_run):
    res, d = int8_run
    assert res.exit_code == 0, res.output
    r = json.loads((d / "r.json").read_text())
    assert [row["precision"] for row in r["layers"]] == ["int8"] * len(r["layers"])
    assert {row["onnx_format"] for row in r["layers"]} == {"blocked-int8"}
    assert all(row["int8"]["weight_bits"] in (7, 8) and row["int8"]["activation"] == "dynamic"
               for row in r["layers"])
    # bytes at each stage: int8 blocks take about a quarter of the fp32 blocks
    b = r["bytes"]
    assert b["sparse"] < b["sparse_fp32"] < b["dense_fp32"]
    v = r["verification"]
    assert v["precision"] == "int8" and v["passed"] and v["rtol"] == 0.2
    assert v["stages"]["fp32"]["passed"] and v["stages"]["fp32"]["rtol"] == 1e-3
    assert v["stages"]["int8_kernels"]["passed"] and v["stages"]["int8_kernels"]["rtol"] == 0.1
    # the gate ran on the int8 artifact: its score is ORT's on the int8 bytes
    assert r["accuracy"]["onnx"] is not None and r["accuracy"]["drop"] <= 0.5
    m = onnx.load(str(d / "m.onnx"))
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in m.graph.node) == len(r["layers"])


def test_int8_sparsity_is_the_masks_and_rounded_zeros_are_apart(int8_run):
    """achieved_sparsity with int8 counted the kept weights that rounded to zero too (0.805 in fp32 read 0.903
    in int8): it is the masks' block sparsity, measured on the fp32 form of the same masks; the int8 zeros are
    reported apart. The top-1 floor that applied is in the report."""
    res, d = int8_run
    r = json.loads((d / "r.json").read_text())
    masks = 1 - sum(row["kept_blocks"] * int(row["block"].split("x")[0]) * int(row["block"].split("x")[1])
                    for row in r["layers"]) / sum(row["shape"][0] * row["shape"][1] for row in r["layers"])
    assert r["block_sparsity"] == pytest.approx(masks, abs=1e-9)
    # the masks' zeros and the odd exact zero inside a kept block (pixels that are 0 in every digit), no more
    assert masks <= r["achieved_sparsity"] < masks + 0.01
    z = r["int8_zeros"]
    assert z["fraction"] >= r["achieved_sparsity"] and z["rounded_to_zero"] == pytest.approx(
        z["fraction"] - r["achieved_sparsity"])
    assert all(row["int8_zero_fraction"] >= row["sparsity"] for row in r["layers"])
    assert r["verification"]["min_top1_agreement"] == 0.8 and r["verification"]["top1_agreement"] >= 0.8
    assert "rounded to zero" in res.output


def test_int8_verification_failure_is_exit_3(run_cli, tmp_path, mlp_path):
    """An int8 tolerance no int8 model can meet: the fp32 stage passes, the int8 stage fails, exit 3."""
    rep = tmp_path / "r.json"
    code, err = run_cli(mlp_path, "-o", tmp_path / "m.onnx", "--report", rep, "--onnx-format", "blocked",
                        "--int8-rtol", "1e-9", *INT8)
    assert code == 3, err
    assert "Error: int8 model: ONNX Runtime differs from the pruned PyTorch model" in err
    r = json.loads(rep.read_text())
    assert r["verification"]["passed"] is False and r["verification"]["precision"] == "int8"
    assert r["verification"]["stages"]["fp32"]["passed"] is True
    assert not (tmp_path / "m.onnx").exists()


def test_int8_fixed_format_is_byte_deterministic(run_cli, tmp_path, mlp_path, int8_run):
    _, d = int8_run
    code, err = run_cli(mlp_path, "-o", tmp_path / "m.onnx", "--onnx-format", "blocked",
                        "--max-accuracy-drop", "0.5", *INT8)
    assert code == 0, err
    assert (tmp_path / "m.onnx").read_bytes() == (d / "m.onnx").read_bytes()


CNN = ["--block", "8", "--sparsity", "0.8", "--steps", "150", "--quantize", "int8", "--onnx-format",
       "compact"]


@pytest.fixture(scope="module")
def cnn_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "examples" / "models" / "digits_cnn.pt"


@pytest.mark.slow
def test_int8_convs_end_to_end(run_cli, tmp_path, cnn_path):
    """The shipped digits CNN: its pruned convs in int8 with calibrated static scales, the rest of the conv
    net too; the report says so per layer, with the calibration rows."""
    rep = tmp_path / "r.json"
    code, err = run_cli(cnn_path, "-o", tmp_path / "m.onnx", "--report", rep, "--max-accuracy-drop", "0.05",
                        *CNN)
    assert code == 0, err
    r = json.loads(rep.read_text())
    convs = [row for row in r["layers"] if len(row["shape"]) == 4]
    assert convs and all(row["onnx_format"] == "compact-int8" and row["int8"]["activation"] == "static"
                         and row["int8"]["kernel"] == "QLinearConv" for row in convs)
    assert r["calibration"]["rows"] == 64
    assert r["bytes"]["sparse"] < 0.5 * r["bytes"]["sparse_fp32"]
    assert r["verification"]["stages"]["int8_kernels"]["max_rel_diff"] < 0.05
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) >= len(convs)


@pytest.mark.slow
def test_int8_kernel_check_failure_is_exit_3(run_cli, tmp_path, cnn_path):
    """A kernel tolerance ORT's requantization rounding cannot meet: the fp32 stage passes, the int8 kernel
    stage fails, exit 3, and nothing is written."""
    rep = tmp_path / "r.json"
    code, err = run_cli(cnn_path, "-o", tmp_path / "m.onnx", "--report", rep, "--int8-kernel-rtol", "1e-9",
                        "--atol", "1e-9", *CNN)
    assert code == 3, err
    assert "int8 kernels differ from the model's own quantization reference" in err
    r = json.loads(rep.read_text())
    assert r["verification"]["passed"] is False and r["verification"]["precision"] == "int8_kernels"
    assert r["verification"]["stages"]["fp32"]["passed"] is True
    assert not (tmp_path / "m.onnx").exists()


def test_int8_failure_is_found_before_the_fine_tune(run_cli, tmp_path, cnn_path, monkeypatch):
    """A model the int8 pass cannot take fails in the pre-check (exit 2, one line), not after a 100000-step
    fine-tune: the QDQ pass is made to fail as ONNX Runtime's quantizer would on a graph it does not
    support."""
    import time

    import converters.qdq
    from converters import ConverterError

    def refuse(*a, **k):
        raise ConverterError("ONNX Runtime's QDQ quantization failed: unsupported graph")

    monkeypatch.setattr(converters.qdq, "quantize_qdq", refuse)
    t = time.perf_counter()
    code, err = run_cli(cnn_path, "-o", tmp_path / "m.onnx", "--block", "8", "--sparsity", "0.8",
                        "--steps", "100000", "--quantize", "int8")
    assert code == 2, err
    assert time.perf_counter() - t < 60
    assert "cannot quantize the model to int8: ONNX Runtime's QDQ quantization failed" in err
    assert not (tmp_path / "m.onnx").exists()
