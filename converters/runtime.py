"""Running ONNX models in the current runtime (:mod:`converters.runtimes`): sessions, batched inference,
interleaved timing."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from .runtimes import Session, current


def session(model: onnx.ModelProto | bytes, *, threads: int | None = None, optimize: bool = True,
            spin: bool = True) -> Session:
    """A CPU session of the current runtime (:func:`converters.runtimes.current`: ONNX Runtime unless a job
    runs in another). ``optimize=False``: the graph as written (ONNX Runtime's optimizations off; other
    runtimes always optimize). ``spin=False`` stops idle intra-op threads from busy-waiting after a run:
    needed when several sessions are timed interleaved, or one session's spinning threads steal the cores of
    the next."""
    return current().session(model, threads=threads, optimize=optimize, spin=spin)


def run_onnx(model, inputs: dict[str, np.ndarray], *, batch_size: int = 256, threads: int | None = None,
             optimize: bool = True, sess: Session | None = None) -> list[np.ndarray]:
    """All outputs of ``model`` on ``inputs`` (first axis = samples), run ``batch_size`` rows at a time."""
    sess = sess or session(model, threads=threads, optimize=optimize)
    n = len(next(iter(inputs.values())))
    outs: list[list[np.ndarray]] = []
    for i in range(0, n, batch_size):
        feed = {k: np.ascontiguousarray(v[i : i + batch_size]) for k, v in inputs.items()}
        outs.append(sess.run(None, feed))
    return [np.concatenate([o[j] for o in outs], axis=0) for j in range(len(outs[0]))]


def interleaved_samples(sessions: dict[str, Session], feed: dict[str, np.ndarray], *,
                        budget_s: float = 0.4, min_rounds: int = 5, max_rounds: int = 25,
                        loop_s: float = 1e-3, pause_s: float = 0.0) -> dict[str, list[float]]:
    """Latency samples (ms) of each session on ``feed``: a warm-up, then rounds that run every session in
    turn (so drift hits all alike), each sample a loop sized to last about ``loop_s``.

    ``pause_s`` > 0 sleeps that long before each sample and runs one untimed call: sessions left with ONNX
    Runtime's default spinning threads then park their idle workers before the next session is timed, so
    sessions can be timed as deployed (spinning on) without stealing each other's cores."""
    for s in sessions.values():
        for _ in range(2):
            s.run(None, feed)
    reps = {}
    for k, s in sessions.items():
        t0 = time.perf_counter()
        s.run(None, feed)
        reps[k] = max(1, int(loop_s / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        for k, s in sessions.items():
            if pause_s > 0:
                time.sleep(pause_s)
                s.run(None, feed)
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                s.run(None, feed)
            samples[k].append((time.perf_counter() - t0) / reps[k] * 1e3)
        rounds += 1
    return samples


def time_interleaved(sessions: dict[str, Session], feed: dict[str, np.ndarray],
                     **kwargs) -> dict[str, float]:
    """Median latency (ms) of each session (see :func:`interleaved_samples`)."""
    return {k: statistics.median(v) for k, v in interleaved_samples(sessions, feed, **kwargs).items()}
