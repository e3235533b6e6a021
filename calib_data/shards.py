"""Reading data shards: ``.npz`` files with ``x`` (or ``x0``, ``x1``, ... in forward-argument order), or with
arrays named after the model's forward arguments (:data:`NAMED_INPUTS`: ``input_ids``, ``attention_mask``,
``token_type_ids``, ``pixel_values``, ...), passed by keyword, and optional labels: ``y``, or ``labels``
(Hugging Face's name; :data:`LABEL_KEYS`). Any other array is recorded in :attr:`Shard.ignored` (and logged),
so the caller can say so: a user's array is never dropped silently.

Every check happens in :func:`load_shard`, and each failure is a one-line :class:`DataError` naming the file
and what was expected vs found. Uncompressed ``.npz`` members are memory-mapped (``np.load(mmap_mode="r")``
maps ``.npy`` members stored without compression), and a directory of ``.npy`` files (``x.npy``, ``y.npy``,
...) is memory-mapped too, so shards larger than memory stream from disk: only the rows of each mini-batch
are read.
"""
from __future__ import annotations

import logging
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib_data.errors import DataError, first_line

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
_X_RE = re.compile(r"^x(\d*)$")
#: forward-argument names a shard may use for its inputs (Hugging Face conventions), in the order kept.
NAMED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values",
                "input_values", "input_features", "decoder_input_ids", "decoder_attention_mask")
#: names the labels array may have (one of them at most)
LABEL_KEYS = ("y", "labels")
#: integer label value that per-token tasks ignore (Hugging Face's convention for padding positions).
IGNORE_INDEX = -100
_NAN_CHECK_BYTES = 4 << 20  # float inputs are scanned for NaN/Inf in chunks of about this size


@dataclass(frozen=True)
class Shard:
    """Inputs (forward-argument order) and optional labels; arrays may be memory-mapped. ``ignored``: the
    names of the file's other arrays, used neither as inputs nor as labels."""

    inputs: tuple[np.ndarray, ...]
    y: np.ndarray | None
    source: str
    names: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.names:
            n = len(self.inputs)
            object.__setattr__(self, "names", ("x",) if n == 1 else tuple(f"x{i}" for i in range(n)))

    @property
    def by_keyword(self) -> bool:
        """True when the inputs are named after forward arguments (passed as keywords, not positions)."""
        return self.names[0] in NAMED_INPUTS

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def subset(self, idx: np.ndarray, lazy: bool = False) -> "Shard":
        """The samples ``idx``. With ``lazy``, memory-mapped inputs stay on disk behind the index."""
        idx = np.asarray(idx)
        take = (lambda x: _Rows(x, idx) if isinstance(x, np.memmap) else x[idx]) if lazy else \
            (lambda x: x[idx])
        return Shard(tuple(take(x) for x in self.inputs), None if self.y is None else self.y[idx],
                     self.source, self.names, self.ignored)

    def split(self, eval_fraction: float, seed: int) -> tuple["Shard", "Shard"]:
        """Deterministic (train, held-out) split: ``eval_fraction`` of the samples, chosen by ``seed``.

        For memory-mapped shards the training part stays a lazy view: only the index is materialised."""
        n = len(self)
        k = int(round(eval_fraction * n))
        if k < 1 or k >= n:
            raise DataError(f"{self.source}: {n} samples cannot be split with eval fraction "
                            f"{eval_fraction:g}")
        perm = np.random.default_rng([seed, 7919]).permutation(n)
        return self.subset(np.sort(perm[k:]), lazy=True), self.subset(np.sort(perm[:k]))


class _Rows:
    """Rows ``idx`` of an array, read on access (``rows[i]``, ``rows[a:b]``, ``rows[array]``)."""

    def __init__(self, base: np.ndarray, idx: np.ndarray) -> None:
        self.base, self.idx = base, idx
        self.shape = (len(idx), *base.shape[1:])
        self.dtype = base.dtype
        self.ndim = base.ndim

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key):
        rows = self.idx[key]
        if np.ndim(rows) == 0:
            return np.asarray(self.base[int(rows)])
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk
        out = np.empty((len(rows), *self.base.shape[1:]), dtype=self.base.dtype)
        out[order] = self.base[rows[order]]
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[np.arange(len(self.idx))]
        return a.astype(dtype) if dtype is not None else a


def _fail(path: Path, msg: str) -> DataError:
    return DataError(f"{path.name}: {msg}")


def _open(path: Path) -> dict[str, np.ndarray]:
    """Arrays by name; memory-mapped where the storage allows."""
    if path.is_dir():
        members = {p.stem: p for p in sorted(path.glob("*.npy"))}
        if not members:
            raise _fail(path, "expected a directory of .npy files (x.npy, y.npy, ...), found none")
        return {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in members.items()}
    if not zipfile.is_zipfile(path):
        raise _fail(path, "expected an .npz archive (numpy.savez), got a file that is not one")
    try:
        with zipfile.ZipFile(path) as zf:
            stored = {i.filename[:-4]: i for i in zf.infolist()
                      if i.filename.endswith(".npy") and i.compress_type == zipfile.ZIP_STORED}
        with np.load(path, allow_pickle=False) as z:
            return {k: _mmap_member(path, stored[k]) if k in stored else z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, struct.error) as e:
        raise _fail(path, f"unreadable .npz ({first_line(e)})") from None


def _mmap_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """Memory-map an uncompressed ``.npy`` member of a zip in place (numpy's own ``np.load(mmap_mode=)``
    ignores ``.npz`` members)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {info.filename} holds Python objects")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _input_keys(path: Path, keys: list[str]) -> list[str]:
    xs = {k: m.group(1) for k in keys if (m := _X_RE.match(k))}
    named = [k for k in NAMED_INPUTS if k in keys]
    if named and xs:
        raise _fail(path, f"expected either forward-argument names ({named}) or x/x0, x1, ..., got both")
    if named:
        return named
    if "x" in xs and len(xs) > 1:
        raise _fail(path, f"expected either x or x0, x1, ..., got both ({sorted(xs)})")
    if "x" in xs:
        return ["x"]
    idx = sorted(int(v) for v in xs.values())
    if not idx:
        raise _fail(path, "expected an input array x "
                          f"(or x0, x1, ..., or named {', '.join(NAMED_INPUTS[:4])}, ...), found "
                          f"{sorted(keys) or 'no arrays'}")
    if idx != list(range(len(idx))):
        raise _fail(path, f"expected inputs x0..x{len(idx) - 1} without gaps, got {['x%d' % i for i in idx]}")
    return [f"x{i}" for i in idx]


def _check_finite(path: Path, name: str, a: np.ndarray) -> None:
    if not np.issubdtype(a.dtype, np.floating):
        return
    rows = max(1, _NAN_CHECK_BYTES // max(1, a[:1].nbytes))
    for i in range(0, a.shape[0], rows):
        chunk = np.asarray(a[i : i + rows])
        if not np.isfinite(chunk).all():
            bad = int(np.argwhere(~np.isfinite(chunk.reshape(chunk.shape[0], -1)))[0][0]) + i
            raise _fail(path, f"{name} has NaN or Inf values (first in sample {bad})")


def load_shard(path: str | Path) -> Shard:
    """Load and validate a shard.

    Raises:
        DataError: missing/unreadable file, no ``x``, inputs of different lengths, an empty shard, NaN or
            Inf, or a ``y`` that is not a 1-D int/float array (or ``[N, k]`` float) of matching length.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    arrays = _open(path)
    keys = _input_keys(path, list(arrays))
    inputs = tuple(arrays[k] for k in keys)
    n = int(inputs[0].shape[0]) if inputs[0].ndim else 0
    for k, a in zip(keys, inputs):
        if a.ndim == 0:
            raise _fail(path, f"{k} must have a first (sample) axis, got a scalar")
        if a.shape[0] != n:
            raise _fail(path, f"{keys[0]} has {n} samples but {k} has {a.shape[0]}")
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise _fail(path, f"{k} must be numeric, got dtype {a.dtype}")
        _check_finite(path, k, a)
    if n == 0:
        raise _fail(path, "the shard has no samples")
    label_keys = [k for k in LABEL_KEYS if k in arrays]
    if len(label_keys) > 1:
        raise _fail(path, f"expected one labels array ({' or '.join(LABEL_KEYS)}), got both")
    ykey = label_keys[0] if label_keys else "y"
    y = arrays.get(ykey)
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != n:
            raise _fail(path, f"{keys[0]} has {n} samples but {ykey} has {y.shape[0] if y.ndim else 'none'}")
        if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            if y.ndim != 1 and not (y.ndim == 2 and len(inputs[0].shape) >= 2 and
                                    y.shape[1] == inputs[0].shape[1]):
                raise _fail(path, f"integer labels {ykey} must be [N] "
                                  f"(or [N, T] per token, T = the inputs' second axis), got shape {y.shape}")
            y = y.astype(np.int64)
        elif np.issubdtype(y.dtype, np.floating):
            if y.ndim > 2:
                raise _fail(path, f"float targets {ykey} must be [N] or [N, k], got shape {y.shape}")
            _check_finite(path, ykey, y)
            y = y.astype(np.float32)
        else:
            raise _fail(path, f"{ykey} must be int (classes) or float (regression), got dtype {y.dtype}")
    ignored = tuple(k for k in arrays if k not in keys and k != ykey)
    if ignored:
        log.info("%s: arrays %s are neither model inputs nor labels: ignored", path.name, list(ignored))
    return Shard(inputs=inputs, y=y, source=str(path), names=tuple(keys), ignored=ignored)


def shipped_shards() -> dict[str, Path]:
    """Name -> path of the shards this package ships (see calib_data/MANIFEST.json)."""
    return {p.stem: p for p in sorted(HERE.glob("*.npz"))}


def shipped_shard(name: str) -> Path:
    shards = shipped_shards()
    if name not in shards:
        raise DataError(f"shipped shard: expected one of {sorted(shards)}, got {name!r}")
    return shards[name]
