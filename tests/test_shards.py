"""Shipped shards match their manifest; bad shards get one-line errors naming what was expected."""
import hashlib
import json

import numpy as np
import pytest

from calib_data.errors import DataError
from calib_data.shards import HERE, Shard, load_shard, shipped_shard, shipped_shards

MANIFEST = json.loads((HERE / "MANIFEST.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_shard_matches_manifest(name):
    entry = MANIFEST[name]
    path = shipped_shard(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    shard = load_shard(path)
    arrays = {f"x{i}" if len(shard.inputs) > 1 else "x": a for i, a in enumerate(shard.inputs)}
    arrays["y"] = shard.y
    assert {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()} == entry["arrays"]
    assert entry["licence"] and entry["source"]


def test_ctr_is_labelled_synthetic_and_shipped_set_is_complete():
    assert MANIFEST["ctr"]["synthetic"] and "SYNTHETIC" in MANIFEST["ctr"]["source"]
    assert set(shipped_shards()) == set(MANIFEST)


def test_split_is_deterministic_and_disjoint():
    s = load_shard(shipped_shard("digits"))
    a_tr, a_ev = s.split(0.2, 3)
    b_tr, b_ev = s.split(0.2, 3)
    np.testing.assert_array_equal(a_ev.inputs[0], b_ev.inputs[0])
    assert len(a_ev) == round(0.2 * len(s)) and len(a_tr) + len(a_ev) == len(s)
    _, c_ev = s.split(0.2, 4)
    assert not np.array_equal(a_ev.y, c_ev.y)


def test_uncompressed_shards_are_memory_mapped_and_split_lazily(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.savez(tmp_path / "u.npz", x=x, y=np.arange(20) % 3)
    s = load_shard(tmp_path / "u.npz")
    assert isinstance(s.inputs[0], np.memmap)
    tr, ev = s.split(0.25, 0)
    assert not isinstance(tr.inputs[0], np.ndarray)  # rows are read per batch, not copied up front
    idx = np.array([3, 0, 7])
    np.testing.assert_array_equal(np.asarray(tr.inputs[0][idx]), np.asarray(tr.inputs[0])[idx])
    assert sorted(np.concatenate([np.asarray(tr.inputs[0])[:, 0], ev.inputs[0][:, 0]])) == list(x[:, 0])


def _save(tmp_path, **arrays):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("make,msg", [
    (lambda t: t / "missing.npz", r"missing\.npz: no such file"),
    (lambda t: (t / "not.npz").write_text("hello") and t / "not.npz", r"not\.npz: expected an \.npz archive"),
    (lambda t: _save(t, y=np.zeros(3)), r"bad\.npz: expected an input array x .*found \['y'\]"),
    (lambda t: _save(t, x=np.zeros((4, 2)), y=np.zeros(3, dtype=np.int64)), r"x has 4 samples but y has 3"),
    (lambda t: _save(t, x0=np.zeros((4, 2)), x1=np.zeros((5, 2))), r"x0 has 4 samples but x1 has 5"),
    (lambda t: _save(t, x0=np.zeros((4, 2)), x2=np.zeros((4, 2))), r"without gaps"),
    (lambda t: _save(t, x=np.array([[0.0, np.nan]] * 3)), r"x has NaN or Inf values \(first in sample 0\)"),
    (lambda t: _save(t, x=np.zeros((3, 2)), y=np.array(["a", "b", "c"])), r"y must be int .* got dtype <U1"),
    (lambda t: _save(t, x=np.zeros((0, 2))), r"no samples"),
])
def test_bad_shards(tmp_path, make, msg):
    with pytest.raises(DataError, match=msg) as e:
        load_shard(make(tmp_path))
    assert "\n" not in str(e.value)


def test_shard_protocol():
    s = Shard(inputs=(np.arange(10)[:, None],), y=None, source="t")
    assert len(s) == 10 and len(s.subset(np.array([1, 2]))) == 2


def test_directory_of_npy_files_is_a_memory_mapped_shard(tmp_path):
    d = tmp_path / "shard"
    d.mkdir()
    np.save(d / "x0.npy", np.arange(12, dtype=np.int64).reshape(6, 2))
    np.save(d / "x1.npy", np.ones((6, 3), np.float32))
    np.save(d / "y.npy", np.array([0, 1, 0, 1, 1, 0]))
    s = load_shard(d)
    assert len(s.inputs) == 2 and all(isinstance(a, np.memmap) for a in s.inputs)
    assert s.y.tolist() == [0, 1, 0, 1, 1, 0]
    with pytest.raises(DataError, match="expected a directory of .npy files"):
        load_shard(tmp_path)  # holds only a sub-directory
