"""bench/: every script imports and parses its command line (``--help``) through the shared harness, and the
harness's pieces do what the scripts rely on (interleaved samples per session, random masks through the
engine, result files)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ("harness", "render"))


@pytest.fixture(scope="module")
def harness():
    """bench/harness.py, with bench/ on sys.path as when a script runs (sys.path restored afterwards)."""
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("harness")
    finally:
        sys.path[:] = saved


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_parses_its_command_line(harness, script, monkeypatch, capsys):
    # loaded under another name, as ``python bench/<script>.py`` runs it as __main__ (bench/planted.py imports
    # tests/engine/planted.py by the same name)
    spec = importlib.util.spec_from_file_location(f"bench_script_{script}", BENCH / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # as python does for __main__ (dataclasses look it up)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_harness_times_sessions_interleaved_and_writes_results(harness, tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    samples = harness.time_sessions(harness.sessions({"a": m, "b": m}), {"x": np.ones((2, 4), np.float32)}, 3,
                                    loop_s=1e-4)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    assert set(harness.summary(samples)["a"]) == {"median_ms", "min_ms", "max_ms", "n"}
    assert {"cpu", "cpu_flags", "cores", "onnxruntime"} <= set(harness.machine())
    harness.write_results(tmp_path / "sub" / "r.json", {"meta": {"p": tmp_path}})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"meta": {"p": str(tmp_path)}}
    harness.append_row(tmp_path / "rows.jsonl", {"a": 1})
    harness.append_row(tmp_path / "rows.jsonl", {"a": 2})
    assert harness.read_rows(tmp_path / "rows.jsonl") == [{"a": 1}, {"a": 2}] and \
        not harness.read_rows(tmp_path / "x")


def test_harness_random_masks_are_balanced_and_reproducible(harness):
    from sapp_compress import zoo

    masks = [harness.random_masks(zoo.mlp([64, 128, 64]), 16, 0.75, seed=3)[2] for _ in range(2)]
    for lb in masks[0]:
        assert set(lb.kept.sum(axis=1)) == {round(0.25 * lb.kept.shape[1])}
    assert all(np.array_equal(a.kept, b.kept) for a, b in zip(*masks))
    kept = harness.balanced_kept(np.random.default_rng(0), 8, 10, 0.8)
    assert kept.shape == (8, 10) and set(kept.sum(axis=1)) == {2}


def test_claims_give_each_cell_to_one_process(harness, tmp_path):
    """Processes sharing a results file claim a cell before running it: a second claim on a held cell fails, a
    released one can be claimed again, and a claim whose process is gone is taken over."""
    out = tmp_path / "rows.jsonl"
    cell = ("ctr", "abc", "sapp", 8, 0.8, 0, "{}")
    assert harness.claim(out, cell)
    other = tmp_path / "rows.jsonl.claims"
    (held,) = list(other.iterdir())
    held.write_text("1")  # pid 1 (init): alive, not this process
    assert not harness.claim(out, cell)
    assert harness.claim(out, ("ctr", "abc", "sapp", 8, 0.9, 0, "{}"))  # another cell
    held.write_text("999999999")  # no such process: taken over
    assert harness.claim(out, cell) and held.read_text() == str(__import__("os").getpid())
    harness.release(out, cell)
    assert not held.exists() and harness.claim(out, cell)
