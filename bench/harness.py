"""What every benchmark in bench/ shares, so that each script holds only its own experiment.

    import harness                                   # also puts the repository root on sys.path
    from harness import RESULTS, machine_line, parser, random_masks, sessions, time_sessions, write_results

- **arguments**: :func:`parser` (the script's docstring as its help, ``--out`` under bench/results), and
  :func:`ints` / :func:`floats` / :func:`names` for comma-separated lists;
- **the machine**: :func:`machine_line` / :func:`cpu_info` (CPU model, cores, the instruction-set flags MLAS
  dispatches on: AVX2, AVX-512, VNNI, AMX; ONNX Runtime's version): machines differ, and every result file
  says which one measured it;
- **timing**: :func:`sessions` (ORT sessions of several models), :func:`time_sessions` (interleaved rounds:
  every session in turn, so drift hits all alike; each sample a loop of about ``loop_s``), :func:`medians`
  and :func:`summary`; one thread unless asked;
- **masks**: :func:`random_masks` (random block masks through the engine's own plan / attach / fold path, so
  the manifest is the one the CLI would produce) and :func:`balanced_kept` (a random balanced kept grid);
- **ORT's own int8** of a dense model, the peers of the int8 benchmarks: :func:`ort_dynamic`,
  :func:`ort_static`;
- **results**: :func:`write_results` (one JSON file), :func:`read_rows` / :func:`append_row` (JSON lines, for
  the resumable sweeps), :class:`Clock` (elapsed-time log lines, the UTC span of a run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from converters.machine import ISA_FLAGS, Machine, cpu_flags, cpu_model  # noqa: E402
from converters.runtime import interleaved_samples, session  # noqa: E402


# ------------------------------------------------------------------------------------------------ arguments
def parser(doc: str | None, out: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose help is the script's docstring; with ``out`` (a file name under
    bench/results), an ``--out`` option defaulting to that file."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if out is not None:
        ap.add_argument("--out", default=str(RESULTS / out), help="results file (default: %(default)s)")
    return ap


def ints(text: str) -> list[int]:
    """``"1,32,256"`` -> ``[1, 32, 256]``."""
    return [int(v) for v in text.split(",") if v.strip()]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# -------------------------------------------------------------------------------------------------- machine
def cpu_info() -> dict:
    """CPU model name, each flag of interest (avx2, avx512f, avx512_vnni, avx_vnni, amx_int8) as a bool, and
    the int8 weight bits this CPU gets (8 with VNNI, 7 without)."""
    from converters.int8 import default_weight_bits

    f = cpu_flags()
    return {"model_name": cpu_model(), **{k: k in f
                                          for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                    "amx_int8")},
            "int8_weight_bits_default": default_weight_bits()}


def machine_line() -> str:
    """``"<CPU model>, <n> cores, flags: avx2 avx512f ..., onnxruntime <version>"``."""
    return Machine.current().line()


def machine() -> dict:
    """The machine as a dict (CPU model, its flags of :data:`converters.machine.ISA_FLAGS`, cores, ORT)."""
    return Machine.current().to_json()


# --------------------------------------------------------------------------------------------------- timing
def sessions(models: dict, threads: int = 1, spin: bool = True) -> dict:
    """An ORT session (CPU, all graph optimizations) of every model (bytes or ModelProto) by name."""
    return {k: session(m, threads=threads, spin=spin) for k, m in models.items()}


def time_sessions(sess: dict, feed: dict[str, np.ndarray], rounds: int, loop_s: float = 0.05,
                  pause_s: float = 0.0, *, budget_s: float = 0.0, max_rounds: int | None = None
                  ) -> dict[str, list[float]]:
    """``rounds`` interleaved rounds over ``sess`` on ``feed`` (more, up to ``max_rounds``, while ``budget_s``
    seconds last): latency samples (ms) per session, each sample a loop of about ``loop_s`` seconds.
    ``pause_s`` > 0: a pause and an untimed run before each sample, so the last session's spinning ORT threads
    have parked (sessions timed as deployed, spinning on)."""
    return interleaved_samples(sess, feed, min_rounds=rounds, max_rounds=max(rounds, max_rounds or rounds),
                               budget_s=budget_s, loop_s=loop_s, pause_s=pause_s)


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


def summary(samples: dict[str, list[float]]) -> dict[str, dict]:
    """Median, min, max and count of each session's samples (ms)."""
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}
            for k, v in samples.items()}


def optimized_ops(model_bytes: bytes, threads: int) -> dict[str, int]:
    """Node types of the graph ORT actually runs (its optimized model, saved by the session), most common
    first."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath)
    return dict(Counter(n.op_type for n in m.graph.node).most_common())


def flop_limit(model, xs: tuple, pruned: set[str], sparsity: float) -> float:
    """Whole-model FLOP limit: multiply-adds of every Linear / Conv (forward hooks) over those left when the
    weights named ``pruned`` keep only 1 - ``sparsity`` of theirs (other ops are not counted: an upper
    bound)."""
    import torch
    from torch import nn

    macs = {"all": 0.0, "pruned": 0.0}

    def hook(name):
        def f(mod, inp, out):
            m = out.numel() * (mod.in_features if isinstance(mod, nn.Linear) else mod.weight[0].numel())
            macs["all"] += m
            macs["pruned"] += m if f"{name}.weight" in pruned else 0
        return f

    hs = [mod.register_forward_hook(hook(n)) for n, mod in model.named_modules()
          if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    with torch.no_grad():
        model(*xs)
    for h in hs:
        h.remove()
    return macs["all"] / (macs["all"] - sparsity * macs["pruned"])


# ---------------------------------------------------------------------------------------------------- masks
def random_masks(model, block, sparsity: float, *, balanced: bool = True, seed: int = 0, min_blocks: int = 1,
                 indivisible: str = "skip"):
    """Random block masks on every layer the planner picks in ``model`` (in place: plan, attach, random top-k,
    fold, as the CLI's engine does): ``(plans, skipped, manifest)``. Balanced: ``round((1 - s) C)`` blocks in
    every block-row; otherwise ``round((1 - s) R C)`` anywhere."""
    import torch

    from sapp_compress import PruneConfig
    from sapp_compress.blocks.geometry import plan_layers
    from sapp_compress.blocks.masks import attach, fold
    from sapp_compress.engine.methods import select_top_k

    cfg = PruneConfig(block=str(block), sparsity=sparsity, balanced=balanced, min_blocks=min_blocks,
                      indivisible=indivisible)
    plans, skipped = plan_layers(model, cfg)
    layers = attach(plans, attention=False, powerprop=False, density=cfg.density)
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        R, C = layer.view.grid
        k = round(cfg.density * (C if balanced else R * C))
        score = torch.rand(R, C, generator=g)
        layer.set_mask(select_top_k(score, score, torch.ones(R, C, dtype=torch.bool), k, per_row=balanced))
    return plans, skipped, fold(layers)


def balanced_kept(rng: np.random.Generator, R: int, C: int, sparsity: float) -> np.ndarray:
    """A random [R, C] block grid keeping ``round((1 - s) C)`` (at least 1) blocks in every block-row."""
    k = max(1, round((1 - sparsity) * C))
    kept = np.zeros((R, C), dtype=bool)
    for r in range(R):
        kept[r, rng.choice(C, k, replace=False)] = True
    return kept


# ------------------------------------------------------------------------------------------ ORT's own int8
class CalibReader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def _quantized(dense: bytes, run) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "dense.onnx", Path(d) / "q.onnx"
        src.write_bytes(dense)
        run(str(src), str(dst))
        return dst.read_bytes()


def ort_dynamic(dense: bytes, **kw) -> bytes:
    """``onnxruntime.quantization.quantize_dynamic`` of the dense model's bytes (``kw``: weight_type,
    per_channel, reduce_range, ...)."""
    from onnxruntime.quantization import quantize_dynamic

    return _quantized(dense, lambda s, d: quantize_dynamic(s, d, **kw))


def ort_static(dense: bytes, calibration: list[dict], **kw) -> bytes:
    """``onnxruntime.quantization.quantize_static`` of the dense model's bytes, calibrated on ``calibration``
    feeds (``kw``: quant_format, per_channel, activation_type, weight_type, ...)."""
    from onnxruntime.quantization import quantize_static

    return _quantized(dense, lambda s, d: quantize_static(s, d, CalibReader(calibration), **kw))


# -------------------------------------------------------------------------------------------------- results
def write_results(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON at ``path`` (its directory made; values JSON does not know written as
    text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines results file (none if it does not exist)."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def append_row(path: str | Path, row: dict) -> None:
    """One row appended to a JSON-lines results file (made with its directory if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _claim_file(path: str | Path, key) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(f"{path}.claims") / digest


def claim(path: str | Path, key) -> bool:
    """Whether this process may run the cell ``key`` of the results file ``path``: an exclusive claim file
    beside it (``<path>.claims/<digest>``, holding the claimant's pid), so that processes sharing one results
    file run each cell once even when they reach it together (re-reading the file before a cell is not enough:
    two processes started together ran every cell twice). A claim whose process is gone is taken over;
    :func:`release` removes the claim once the row is written."""
    f = _claim_file(path, key)
    f.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(f.read_text() or "0")
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ProcessLookupError, ValueError):
                f.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            except (FileNotFoundError, PermissionError):
                return False
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def release(path: str | Path, key) -> None:
    """Remove this process's claim on ``key`` (:func:`claim`)."""
    _claim_file(path, key).unlink(missing_ok=True)


class Clock:
    """Elapsed time since the start of a run: :meth:`log` prints ``[  12.3s] ...`` lines, :meth:`span` the UTC
    span ``"HH:MM-HH:MM"``."""

    def __init__(self) -> None:
        self.t0, self.utc0 = time.time(), time.strftime("%H:%M", time.gmtime())

    def log(self, *args) -> None:
        print(f"[{time.time() - self.t0:6.1f}s]", *args, flush=True)

    def span(self) -> str:
        return f"{self.utc0}-{time.strftime('%H:%M', time.gmtime())}"

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 1)


__all__ = ["ISA_FLAGS", "RESULTS", "ROOT", "CalibReader", "Clock", "append_row", "balanced_kept", "cpu_info",
           "flop_limit", "floats", "ints", "machine", "machine_line", "medians", "names", "optimized_ops",
           "ort_dynamic", "ort_static", "parser", "random_masks", "read_rows", "sessions", "summary",
           "time_sessions", "write_results"]
