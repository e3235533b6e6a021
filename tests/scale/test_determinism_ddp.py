"""Reproducibility and scale: the same seed gives byte-identical ONNX on CPU; torchrun with 2 CPU processes
(gloo) completes with identical masks on both ranks and one output."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MLP = ROOT / "examples" / "models" / "digits_mlp.pt"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sapp_compress", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["blocked", "compact"])
def test_same_seed_gives_byte_identical_onnx(tmp_path, fmt):
    digests, masks = [], []
    for run in ("a", "b"):
        out, rep = tmp_path / f"{run}.onnx", tmp_path / f"{run}.json"
        proc = _cli(MLP, "-o", out, "--report", rep, "--steps", "60", "--seed", "3", "--onnx-format", fmt,
                    "--device", "cpu", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        masks.append(json.loads(rep.read_text())["mask_digest"])
    assert digests[0] == digests[1]
    assert masks[0] == masks[1] and len(masks[0]) == 64


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    out, rep = tmp_path / "ddp.onnx", tmp_path / "ddp.json"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sapp_compress", str(MLP), "-o", str(out),
         "--report", str(rep), "--steps", "60", "--device", "cpu", "--onnx-format", "compact"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(rep.read_text())
    assert r["exit_code"] == 0
    digests = r["mask_digests_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1] == r["mask_digest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.json", "ddp.onnx"]  # one ONNX, one report
    assert r["verification"]["passed"] and r["accuracy"]["onnx"] is not None
