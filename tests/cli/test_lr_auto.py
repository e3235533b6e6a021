"""--lr auto (the default) through the CLI: the report's lr (value, source, the probe's scores per candidate
and its cost), --lr RATE fixing the rate, and a bad --lr as a usage error."""
import json

from conftest import one_line_error

from sapp_compress.config import LR_CANDIDATES, LRProbeConfig

FAST = ["--steps", "200", "--onnx-format", "compact", "--device", "cpu"]


def test_report_says_what_the_probe_measured(tmp_path, run_cli, mlp_path):
    code, err = run_cli(mlp_path, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json", *FAST)
    assert code == 0, err
    lr = json.loads((tmp_path / "r.json").read_text())["lr"]
    assert lr["source"] == "probe" and lr["value"] in LR_CANDIDATES
    assert set(lr["scores"]) == {f"{c:g}" for c in LR_CANDIDATES}  # every candidate, a held-out loss per rung
    assert all(isinstance(v, list) and v for v in lr["scores"].values())
    p = lr["probe"]
    winner = min(lr["scores"], key=lambda k: (lr["scores"][k][-1] if len(lr["scores"][k]) == 2 else 9e9,
                                              float(k)))
    check = p["dense_check"]  # SA++ (the default method) starts dense: the winner's dense steps were checked
    assert list(check["losses"])[0] == winner and check["vetoed"] == list(check["losses"])[:-1]
    # the best of the last rung, unless the check vetoed it
    assert f"{lr['value']:g}" == list(check["losses"])[-1]
    cfg = LRProbeConfig()  # the budget's steps, the shared priming steps and the dense check's
    assert p["strategy"] == "halving"
    assert (p["anneal"], p["batch_stats"]) == ("program", True)  # SA++ has phases before its final sparse one
    assert p["steps"] <= int(cfg.budget * 200) + round(cfg.prime * 200) + \
        check["steps"] * len(check["losses"])
    assert p["rungs"][-1] == p["program_steps"]
    assert p["seconds"] > 0 and p["fine_tune_seconds"] > 0 and p["fraction_of_fine_tune"] > 0
    assert p["rows"]["scored"] > 0 and len(lr["digests_per_rank"]) == 1


def test_fixed_lr_and_bad_lr(tmp_path, run_cli, mlp_path):
    code, err = run_cli(mlp_path, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json", "--lr", "3e-3",
                        "--steps", "20", "--onnx-format", "compact")
    assert code == 0, err
    lr = json.loads((tmp_path / "r.json").read_text())["lr"]
    assert (lr["value"], lr["source"]) == (3e-3, "--lr") and "scores" not in lr
    code, err = run_cli(mlp_path, "-o", tmp_path / "m.onnx", "--lr", "fast")
    assert code == 2 and one_line_error(err) and "expected auto or a positive number, got 'fast'" in err
