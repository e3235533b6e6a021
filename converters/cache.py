"""A per-machine cache of measured latencies: ``auto`` asks it before timing, so a second run with the same
model and masks on the same machine reuses the first run's measurements (the same choices, the same bytes,
seconds instead of minutes).

**Keys** are :class:`TimingKey`: named fields, everything that decides a measurement. ``kind`` says what was
measured (``layer``: one pruned layer's candidate formulations; ``model``: whole candidate models against
the dense one), then ``op`` (the op type and a digest of its dense graph: attributes, weight and input
shapes, layouts), ``shapes`` (the input shapes timed), ``batch`` (the batch sizes timed), ``mask`` (a
digest of the kept-block pattern: :func:`mask_digest`), ``formulation`` (the candidates timed), ``precision``
(the quantization setting and the int8 weight bits), ``threads`` (ORT intra-op threads; 0 = ORT's default),
``code`` (a digest of the converters' source: a changed graph times differently), ``machine``
(:class:`converters.machine.Machine`: CPU model, instruction-set flags, cores, ORT version) and ``runtime``
(the runtime timed in, its version and precision: :mod:`converters.runtimes`). A field that
does not apply holds ``""``. Other measurements (per-layer latency tables) use the same key with their own
``kind``.

**Location**: ``$SAPP_COMPRESS_CACHE`` if set, else ``$XDG_CACHE_HOME/sapp-compress``, else
``~/.cache/sapp-compress`` (:func:`default_root`); measurements live under ``timings/<kind>/``.

**Format**: one JSON file per key, named by the sha256 of the key's canonical JSON:
``{"format": 1, "key": {...the key's fields...}, "value": {...}, "written": "2026-12-04T10:00:00Z"}``. A file
is written to a temporary name in its directory and renamed over the entry, so readers see a whole old entry
or a whole new one, and concurrent runs cannot corrupt the cache (two runs measuring the same key both write
valid entries; the last rename wins). An entry that does not parse, or whose stored key differs from the one
asked for, is ignored with a warning (and replaced by the next measurement), never an error; a cache
directory that cannot be written is a warning too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .machine import Machine
from .manifest import LayerBlocks
from .runtimes import current

log = logging.getLogger(__name__)

#: the environment variable that overrides the cache's location
ENV = "SAPP_COMPRESS_CACHE"
#: the entry file format
FORMAT = 1
#: ``use``: read and write; ``refresh``: measure again and overwrite (``--no-cache``); ``off``: neither
MODES = ("use", "refresh", "off")


def default_root() -> Path:
    """``$SAPP_COMPRESS_CACHE``, else ``$XDG_CACHE_HOME/sapp-compress``, else ``~/.cache/sapp-compress``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sapp-compress"


def digest(obj) -> str:
    """A short sha256 of ``obj``'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mask_digest(lb: LayerBlocks) -> str:
    """A short sha256 of one layer's kept-block pattern: layout, weight shape, block, padding and the kept
    grid."""
    h = hashlib.sha256(json.dumps([lb.layout, list(lb.weight_shape), list(lb.block), bool(lb.padded),
                                   list(lb.kept.shape)]).encode())
    h.update(np.packbits(lb.kept.reshape(-1)).tobytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A short sha256 of the converters package's source files (the graphs that are timed)."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TimingKey:
    """What decides one measurement (see the module docstring); ``code`` and ``machine`` default to this
    process's."""

    kind: str
    op: str
    shapes: str
    batch: str
    mask: str
    formulation: str
    precision: str
    threads: int
    code: str = field(default_factory=code_digest)
    machine: Machine = field(default_factory=Machine.current)
    runtime: str = field(default_factory=lambda: current().key())

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


class TimingCache:
    """Measurements by :class:`TimingKey`, one JSON file each under ``root/timings/<kind>/`` (module
    docstring).

    ``read=False`` measures again and overwrites (``--no-cache``). ``hits`` / ``misses`` / ``writes`` count
    this object's lookups and stores."""

    def __init__(self, root: str | Path, *, read: bool = True, write: bool = True) -> None:
        self.root = Path(root)
        self.read, self.write = read, write
        self.hits = self.misses = self.writes = 0
        self._warned_write = False

    @classmethod
    def open(cls, mode: str = "use", root: str | Path | None = None) -> "TimingCache | None":
        """The cache at ``root`` (default :func:`default_root`) in ``mode`` (:data:`MODES`; ``off``: None)."""
        if mode not in MODES:
            raise ValueError(f"cache mode: expected one of {MODES}, got {mode!r}")
        if mode == "off":
            return None
        return cls(root or default_root(), read=mode == "use")

    def path(self, key: TimingKey) -> Path:
        return self.root / "timings" / key.kind / f"{key.sha256}.json"

    def get(self, key: TimingKey) -> dict | None:
        """The stored value for ``key``, or None (not stored, not reading, or an unreadable entry: warned)."""
        if not self.read:
            self.misses += 1
            return None
        p = self.path(key)
        try:
            text = p.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as e:
            log.warning("timing cache: cannot read %s (%s): measuring again", p, e.strerror)
            self.misses += 1
            return None
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                got = entry.get("format") if isinstance(entry, dict) else type(entry).__name__
                raise ValueError(f"expected format {FORMAT}, got {got}")
            if entry.get("key") != json.loads(json.dumps(key.to_json())):
                raise ValueError("its stored key differs from the one asked for")
            value = entry["value"]
            if not isinstance(value, dict):
                raise ValueError(f"value: expected an object, got {type(value).__name__}")
        except (ValueError, KeyError) as e:  # a UnicodeDecodeError is a ValueError too
            log.warning("timing cache: ignoring the corrupt entry %s (%s): measuring again", p, e)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: TimingKey, value: dict) -> None:
        """Store ``value`` (JSON-able) for ``key``, atomically (a temporary file, then a rename)."""
        if not self.write:
            return
        p = self.path(key)
        entry = {"format": FORMAT, "key": key.to_json(), "value": value,
                 "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = None
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.stem[:16]}.", suffix=".tmp", dir=p.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, indent=1)
                f.write("\n")
            os.replace(tmp, p)
            tmp = None
            self.writes += 1
        except OSError as e:
            if not self._warned_write:
                log.warning("timing cache: cannot write under %s (%s): timings not cached", self.root,
                            e.strerror)
                self._warned_write = True
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
