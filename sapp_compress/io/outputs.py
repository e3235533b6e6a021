"""Writing outputs atomically: every file the tool writes (the ONNX model, ``--save-torch``, the report) is
written under a temporary name in its target directory and renamed onto its name at the end, so a failed or
interrupted run leaves no half-written output behind. And the check, before any expensive work, that each can
be written."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UsageError


def check_writable(path: Path, what: str) -> None:
    """Fail before hours of fine-tuning, not after: the directory must exist and take a file."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a directory, expected a file path")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot write there ({e.strerror})") from None


@contextlib.contextmanager
def staged(final: Path):
    """A temporary path next to ``final`` (the caller renames it onto ``final`` with :func:`os.replace` once
    every check has passed); removed if it was never renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_json(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, atomically (numpy scalars and arrays as numbers and lists)."""
    path = Path(path)
    with staged(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=_default)
            f.write("\n")
        os.replace(tmp, path)


__all__ = ["check_writable", "staged", "write_json"]
