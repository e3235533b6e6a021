"""The default ``--onnx-format auto`` is reproducible: two runs with one seed on one machine write the same
bytes (the second reads every timing from the cache and times nothing), ``--plan REPORT.json`` replays a run's
choices on an empty cache, a plan made for another model or other masks is a one-line exit 2, and
``--no-cache`` measures again."""
import json

import pytest
from click.testing import CliRunner

import converters.runtime
from converters.cache import ENV

FAST = ["--steps", "20", "--seed", "3"]


def one_line_error(text: str) -> bool:
    """As tests/cli/conftest.py's (not imported by name: another directory's conftest may hold that name)."""
    lines = [line for line in text.strip().splitlines() if line.startswith("Error:")]
    return len(lines) == 1 and "Traceback" not in text


def _invoke(*args):
    from sapp_compress.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlp_path):
    """Two default runs on one cache, then a --plan replay of the first on an empty cache; ONNX bytes, reports
    and the number of ORT timing runs each made."""
    d = tmp_path_factory.mktemp("reproducible")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        real = converters.runtime.interleaved_samples
        mp.setattr(converters.runtime, "interleaved_samples",
                   lambda *a, **k: calls.append(1) or real(*a, **k))
        for name, cache, extra in (("first", "cache", ()), ("second", "cache", ()),
                                   ("replay", "empty", ("--plan", d / "first.json"))):
            mp.setenv(ENV, str(d / cache))
            before = len(calls)
            code, err = _invoke(mlp_path, "-o", d / f"{name}.onnx", "--report", d / f"{name}.json", *FAST,
                                *extra)
            assert code == 0, err
            out[name] = ((d / f"{name}.onnx").read_bytes(), json.loads((d / f"{name}.json").read_text()),
                         len(calls) - before)
    return d, out


def test_two_default_runs_with_one_seed_write_the_same_bytes_the_second_timing_nothing(runs):
    _, out = runs
    (b1, r1, timed1), (b2, r2, timed2) = out["first"], out["second"]
    assert r1["config"]["output"]["onnx_format"] == "auto"
    assert timed1 > 0 and r1["plan"]["measured"] > 0 and r1["plan"]["from_cache"] == 0
    assert timed2 == 0 and r2["plan"]["measured"] == 0 and r2["plan"]["from_cache"] == r1["plan"]["measured"]
    assert b2 == b1
    assert [lay["plan"] for lay in r2["layers"]] == [lay["plan"] for lay in r1["layers"]]


def test_report_layers_carry_the_plan(runs):
    _, out = runs
    r = out["first"][1]
    assert r["plan"]["choices"] == "timed" and set(r["plan"]["whole_model"]) == {"all_blocked", "int8_convs",
                                                                                  "fallback"}
    for lay in r["layers"]:
        p = lay["plan"]
        assert p["name"] == lay["name"] and p["onnx_format"] == lay["onnx_format"] and \
            p["reason"] == lay["reason"]
        assert p["shape"] == lay["shape"] and "x".join(map(str, p["block"])) == lay["block"]
        assert len(p["mask_digest"]) == 16 and p["layout"] == "linear"


def test_plan_replay_on_an_empty_cache_writes_the_same_bytes_without_timing(runs):
    d, out = runs
    b, r, timed = out["replay"]
    assert timed == 0 and r["plan"]["choices"] == "replayed" and r["plan"]["plan"] == str(d / "first.json")
    assert b == out["first"][0]
    assert not list((d / "empty").rglob("*.json"))  # nothing measured, nothing written


def test_a_plan_for_other_blocks_or_masks_exits_2_in_one_line(runs, tmp_path, mlp_path):
    d, _ = runs
    plan = d / "first.json"
    # other blocks: found by the pre-check, before the fine-tune
    code, err = _invoke(mlp_path, "-o", tmp_path / "m.onnx", *FAST, "--block", "4x16", "--plan", plan)
    assert code == 2 and one_line_error(err), err
    assert "--plan: 0.weight: block: the plan has 8x8, this model 4x16" in err
    assert not (tmp_path / "m.onnx").exists()
    # other masks (another seed): found when the conversion reads the plan
    code, err = _invoke(mlp_path, "-o", tmp_path / "m.onnx", "--steps", "20", "--seed", "4", "--plan", plan)
    assert code == 2 and one_line_error(err), err
    assert "kept blocks: the plan has mask digest" in err
    # a plan is auto's: with a fixed format it is a usage error; a file that is no report too
    code, err = _invoke(mlp_path, "-o", tmp_path / "m.onnx", "--onnx-format", "blocked", "--plan", plan)
    assert code == 2 and one_line_error(err) and "--plan replays auto's choices" in err, err
    (tmp_path / "bad.json").write_text("[1, 2]")
    code, err = _invoke(mlp_path, "-o", tmp_path / "m.onnx", "--plan", tmp_path / "bad.json")
    assert code == 2 and one_line_error(err) and "expected a sapp-compress report" in err, err


def test_no_cache_measures_again_and_refreshes_the_cache(runs, tmp_path, mlp_path, monkeypatch):
    d, out = runs
    monkeypatch.setenv(ENV, str(d / "cache"))
    before = {p: p.read_text() for p in (d / "cache").rglob("*.json")}
    code, err = _invoke(mlp_path, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json", *FAST,
                        "--no-cache")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["plan"]["measured"] == out["first"][1]["plan"]["measured"] and r["plan"]["from_cache"] == 0
    assert r["plan"]["cache_mode"] == "refresh"
    after = {p: p.read_text() for p in (d / "cache").rglob("*.json")}
    assert set(after) == set(before) and all(after[p] != before[p] for p in before)
