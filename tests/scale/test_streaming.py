"""A shard several times larger than the process's peak memory growth streams from disk (memory-mapped)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_finetune_streams_a_memory_mapped_shard(tmp_path):
    n, d = 400_000, 256  # 410 MB of float32 features
    rng = np.random.default_rng(0)
    train = tmp_path / "big.npz"
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for i in range(0, n, 50_000):  # written in chunks: the test itself never holds the shard either
        x[i : i + 50_000] = rng.standard_normal((min(50_000, n - i), d), dtype=np.float32)
    x.flush()
    y = (np.asarray(x[:, :10]).argmax(1)).astype(np.int64)
    import zipfile

    with zipfile.ZipFile(train, "w", compression=zipfile.ZIP_STORED) as z:  # uncompressed: mappable
        z.write(tmp_path / "x.npy", "x.npy")
        np.save(tmp_path / "y.npy", y)
        z.write(tmp_path / "y.npy", "y.npy")
    del x
    os.unlink(tmp_path / "x.npy")
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((2000, d), dtype=np.float32),
             y=rng.integers(0, 10, 2000))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("stream_worker.py")), str(train),
                           str(tmp_path / "eval.npz")], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["peak_mb"] - r["baseline_mb"]
    shard_mb = train.stat().st_size / 2**20
    print(f"\nshard {shard_mb:.0f} MB, peak anonymous memory growth {growth:.0f} MB "
          f"({shard_mb / max(growth, 1):.1f}x); resident incl. mapped page cache "
          f"{r['rss_incl_page_cache_growth_mb']:.0f} MB")
    assert r["memmap"] == "memmap" and r["samples"] == n
    assert shard_mb > 4 * growth, (shard_mb, growth)
