import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def mlp_path():
    return ROOT / "examples" / "models" / "digits_mlp.pt"


@pytest.fixture()
def run_cli(tmp_path):
    """Run the CLI in-process; returns (exit_code, stderr text)."""
    from click.testing import CliRunner

    from sapp_compress.cli import main

    def run(*args):
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        return res.exit_code, res.stderr if hasattr(res, "stderr") else res.output

    return run


def one_line_error(text: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line.startswith("Error:")]
    return len(lines) == 1 and "Traceback" not in text


@pytest.fixture()
def digits_shard(tmp_path):
    d = np.load(ROOT / "calib_data" / "digits.npz")
    return {"x": d["x"], "y": d["y"]}


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path
