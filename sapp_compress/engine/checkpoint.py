"""Periodic, atomic checkpoints of a fine-tuning run, and resuming from them.

A checkpoint holds everything the next step depends on: the parametrized model's state (weights, masks,
SA++ logits, BatchNorm statistics), the optimizer, the method's phase, the step, the RNG states and the
history so far. The mini-batch order is a pure function of (seed, step) (``training.BatchPlan``) and the LR
of the step, so a run killed at any point and resumed ends with the same masks and, on CPU, bit-identical
weights to an uninterrupted run. A fingerprint of the run's configuration guards against resuming a
different run from the same directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"


def fingerprint(**parts) -> str:
    """Digest of the run's identity (configs, budget, data size, model structure)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Checkpointer:
    """Writes ``DIR/checkpoint.pt`` every ``every`` steps (atomically: a temporary file, then rename)."""

    def __init__(self, directory: str | os.PathLike, every: int, resume: bool, fingerprint: str) -> None:
        if every < 1:
            raise ConfigError(f"checkpoint_every: expected a positive number of steps, got {every}")
        self.dir = Path(directory)
        self.every = every
        self.resume = resume
        self.fingerprint = fingerprint
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"checkpoint dir {self.dir}: cannot create it ({e.strerror})") from None

    @property
    def path(self) -> Path:
        return self.dir / FILENAME

    def due(self, next_step: int, total: int) -> bool:
        return next_step % self.every == 0 and next_step < total

    def save(self, state: dict) -> None:
        state = {**state, "fingerprint": self.fingerprint}
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self) -> dict | None:
        """The saved state when resuming and a checkpoint exists, else None."""
        if not self.resume or not self.path.exists():
            if self.resume:
                log.info("no checkpoint in %s: starting from step 0", self.dir)
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line error
            raise ConfigError(f"{self.path}: checkpoint cannot be read ({type(e).__name__}); "
                              "delete it to start over") from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"{self.path}: written by a different run (other model, data, or options); "
                "use a fresh --checkpoint-dir or the original options"
            )
        return state
