"""--lr auto under torchrun: 2 CPU processes (gloo) run the same probe, compare their scores after every rung
(as the masks are compared), choose the same rate, and report every rank's digest of the probe."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
@pytest.mark.parametrize("model, method, resolved", [
    ("digits_mlp.pt", "sapp", ("program", True)),
    # magnitude's probe anneals every rung (BENCHMARKS 15.10); BatchNorm scored by batch statistics (15.11)
    ("digits_cnn.pt", "magnitude", ("rung", True)),
])
def test_torchrun_two_ranks_choose_the_same_rate(tmp_path, model, method, resolved):
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    out, rep = tmp_path / "ddp.onnx", tmp_path / "ddp.json"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sapp_compress", str(MODELS / model), "-o",
         str(out), "--report", str(rep), "--steps", "200", "--device", "cpu", "--onnx-format", "compact",
         "--seed", "1", "--method", method],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(rep.read_text())
    lr = r["lr"]
    assert lr["source"] == "probe" and len(lr["scores"]) == 7
    assert (lr["probe"]["anneal"], lr["probe"]["batch_stats"]) == resolved
    digests = lr["digests_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert r["mask_digests_per_rank"][0] == r["mask_digests_per_rank"][1]
