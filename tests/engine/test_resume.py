"""Checkpoint and resume: a run SIGKILLed mid-way and resumed ends bit-identical to an uninterrupted one."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref = _run(tmp_path / "ref.pt", tmp_path / "ckpt_ref")
    assert ref.returncode == 0, ref.stderr
    killed = _run(tmp_path / "res.pt", tmp_path / "ckpt", "--kill-at", 57)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists() and not (tmp_path / "res.pt").exists()
    # the checkpoint is from step 50, mid-way through SA++'s sparsify/sparse cycles
    assert torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["step"] == 50
    resumed = _run(tmp_path / "res.pt", tmp_path / "ckpt", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "ref.pt", weights_only=False)
    b = torch.load(tmp_path / "res.pt", weights_only=False)
    for ka, kb in zip(a["kept"], b["kept"]):
        np.testing.assert_array_equal(ka, kb)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


@pytest.mark.slow
def test_resume_refuses_a_different_run_or_a_broken_file(tmp_path):
    assert _run(tmp_path / "a.pt", tmp_path / "ckpt", "--kill-at", 25).returncode == -signal.SIGKILL
    r = _run(tmp_path / "b.pt", tmp_path / "ckpt", "--resume", "--lr", "1e-3")
    assert r.returncode != 0 and "written by a different run" in r.stderr
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    r = _run(tmp_path / "b.pt", tmp_path / "ckpt", "--resume")
    assert r.returncode != 0 and "cannot be read" in r.stderr
    assert not (tmp_path / "b.pt").exists()
