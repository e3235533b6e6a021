"""Frozen, validated configuration objects.

Every value is checked when the object is built; errors show expected vs actual.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

_BLOCK_RE = re.compile(r"^\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*$")


@dataclass(frozen=True)
class BlockSpec:
    """A block of ``rows x cols`` on a layer's 2-D view (rows = output side)."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for what, v in (("rows", self.rows), ("cols", self.cols)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"block {what}: expected a positive integer, got {v!r}")

    @classmethod
    def parse(cls, text: str | int | "BlockSpec") -> "BlockSpec":
        """``8`` -> 8x8, ``"4x16"`` -> 4 rows x 16 cols."""
        if isinstance(text, BlockSpec):
            return text
        if isinstance(text, int):
            return cls(text, text)
        m = _BLOCK_RE.match(str(text))
        if not m:
            raise ConfigError(f"block: expected B or RxC with positive integers (e.g. 8, 4x16), got {text!r}")
        r = int(m.group(1))
        c = int(m.group(2)) if m.group(2) else r
        return cls(r, c)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def size(self) -> int:
        return self.rows * self.cols


INDIVISIBLE_POLICIES = ("skip", "pad", "error")
CONV_LAYOUTS = ("channel", "tap")
#: what a pruned unit is: a block of a layer's weight, or a structural group (a head, a neuron, a channel)
STRUCTURES = ("blocks", "channels")

#: Default minimum number of blocks for a layer to be pruned. The paper uses 100 on ResNet50, where it
#: skips only a handful of layers; on the small models this tool is also meant for (a 64->256 layer at
#: B = 8 has 256 blocks, a 32x32 conv 16), 100 would leave most layers dense. With 16 blocks a layer at
#: s = 0.8 still keeps 3 and drops 13, which is enough granularity for top-k to mean something.
DEFAULT_MIN_BLOCKS = 16


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    Attributes:
        block: the block shape.
        sparsity: target fraction of blocks removed in each pruned layer, 0 < s < 1.
        method: a name in :data:`sapp_compress.methods.METHODS`.
        balanced: keep the same number of blocks in every block-row (fastest ONNX graph).
        min_blocks: layers with fewer blocks are left dense.
        indivisible: what to do when the block does not divide a layer: ``skip`` (leave dense, with a
            reason), ``pad`` (pad the view with zeros for block arithmetic) or ``error``.
        include / exclude: ``fnmatch`` patterns over full weight names (``"encoder.*.weight"``); an empty
            ``include`` means every supported layer.
        conv_layout: ``channel`` (B_r out x B_c in channels, all taps; fast in ORT) or ``tap`` (the paper's
            (kh*kw*C) x O view).
        method_options: method-specific keyword options (see each method's ``Options``).
        structure: ``blocks`` (blocks of each layer's weight: ``block``, ``balanced``, ``min_blocks``,
            ``indivisible`` and ``conv_layout`` apply) or ``channels`` (whole attention heads, FFN neurons and
            conv channels, removed from every tensor they touch: ``sparsity`` is the fraction of each family's
            units removed, and the block options do not apply). See :mod:`sapp_compress.structure`.
        target_speedup: with ``channels``, instead of a uniform ``sparsity``: each family's width is chosen so the
            model reaches this measured speed-up in ONNX Runtime on this machine
            (:mod:`sapp_compress.structure.allocate`).
    """

    block: BlockSpec
    sparsity: float
    method: str = "sapp"
    balanced: bool = False
    min_blocks: int = DEFAULT_MIN_BLOCKS
    indivisible: str = "skip"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    conv_layout: str = "channel"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    structure: str = "blocks"
    target_speedup: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", BlockSpec.parse(self.block))
        if self.structure not in STRUCTURES:
            raise ConfigError(f"structure: expected one of {STRUCTURES}, got {self.structure!r}")
        if self.target_speedup is not None:
            if not isinstance(self.target_speedup, (int, float)) or not self.target_speedup > 1.0:
                raise ConfigError(f"target speed-up: expected a number > 1, got {self.target_speedup!r}")
            if self.structure != "channels":
                raise ConfigError("--target-speedup needs --structure channels (it chooses how many heads, neurons "
                                  "and channels each layer keeps; block sparsity's speed-up is not a width)")
        s = self.sparsity
        if not isinstance(s, (int, float)) or not (0.0 < float(s) < 1.0):
            raise ConfigError(f"sparsity: expected a number with 0 < s < 1, got {s!r}")
        object.__setattr__(self, "sparsity", float(s))
        if self.indivisible not in INDIVISIBLE_POLICIES:
            raise ConfigError(f"indivisible: expected one of {INDIVISIBLE_POLICIES}, got {self.indivisible!r}")
        if self.conv_layout not in CONV_LAYOUTS:
            raise ConfigError(f"conv_layout: expected one of {CONV_LAYOUTS}, got {self.conv_layout!r}")
        if not isinstance(self.min_blocks, int) or self.min_blocks < 1:
            raise ConfigError(f"min_blocks: expected a positive integer, got {self.min_blocks!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "method_options", dict(self.method_options))

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


#: the probe's candidate peak rates: half-decades from 1e-5 to 1e-2
LR_CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


@dataclass(frozen=True)
class LRProbeConfig:
    """How ``lr="auto"`` measures the rate (:mod:`sapp_compress.lr_probe`; BENCHMARKS.md section 15 says what
    chose these values).

    Attributes:
        candidates: peak rates tried, each from the same starting weights.
        strategy: a name in :data:`sapp_compress.lr_probe.STRATEGIES`: ``halving`` (successive halving),
            ``grid`` (every candidate for the same number of steps) or ``range`` (an LR range test).
        phase: what a candidate runs: ``sparse`` (the method prunes to the target at once, by its own scores,
            then its final sparse phase: masks fixed) or ``program`` (the method's whole program, dense, sparsify,
            sparse, ..., compressed into the probe's steps).
        budget: the probe's optimizer steps, all candidates together, as a fraction of the fine-tune's (the
            candidates' first program step, which their warm-up runs at rate zero, runs once with the priming, so
            ``n - 1`` of them are not spent).
        held_out: fraction of the training shard's rows the candidates are scored on (never trained on by the
            probe; the fine-tune then trains on every row), at most ``max_rows`` rows.
        keep: with ``halving``, the fraction of candidates that go on to the next rung (1 / eta).
        warmup: the candidates' warm-up fraction (None: the fine-tune's).
        fallback: the rate used when the budget is too short to probe (the report says so).
        scoring: the held-out rows scored, all evaluations together, at most this many times the rows the probe
            trains on (its steps times the batch size): half to the last rung, the other half shared by the
            earlier evaluations, never fewer than 32 rows an evaluation (nor more than are held out). A forward
            row costs about a third of a training row, so the scoring adds at most ~40 % to the probe's
            training; on a transformer scored on all 418 held-out rows at every rung it had tripled the probe
            (BENCHMARKS.md section 15).
        anneal: where a candidate's rate decays to zero: ``program`` (one warm-up and cosine over the whole
            program, as the fine-tune has: an early rung scores a candidate at nearly its peak rate), ``rung``
            (every rung is a warm-up and cosine cycle of its own, a warm restart from where the last one stopped,
            so every score is taken with the rate annealed, as the fine-tune's final model is) or ``auto`` (the
            default): ``rung`` when the candidates run the method's whole program (``phase="sparse"`` and a
            method that prunes once at step 0 and then trains sparse: magnitude), ``program`` otherwise. Measured
            (BENCHMARKS.md section 15.10): where the probe reproduces the whole program, annealed rungs see past
            the short horizon (magnitude on the digits MLP and stdlib_bert gets its best fixed rate); where a dense
            and a sparsify phase come first (SA++, GMP, ACDC, Powerprop), the hot first rung is what keeps out
            the rates those phases do not survive (1e-2 on the digits MLP and stdlib_bert, 15.4).
        prime: steps at rate zero run once before the candidates branch, shared by all of them, as a fraction
            of the fine-tune's steps: they fill the optimizer's moments (and BatchNorm's statistics) as the
            fine-tune's warm-up does, so a candidate's first steps are not Adam's first steps at its peak rate.
            Counted in the probe's steps, on top of ``budget``.
        dense_check: for a method whose program starts with a dense phase (SA++, GMP, ACDC, Powerprop), the
            fine-tune's own first steps (its warm-up and one step at the peak) are run at the winner on a copy, and
            the winner is vetoed when that costs the model more than this share of its held-out advantage over a
            constant prediction (a model with no advantage must not get worse) and ends above ``dense_ratio``
            times the next lower candidate's loss after the same steps; the next lower candidate is then checked
            in its place. The fine-tune continues from the run of the rate chosen, so a check that passes costs
            no steps. The probe's candidates train in the final sparse phase, which a rate that wrecks the dense
            model can still win. Measured (BENCHMARKS.md section 15.5): 1e-2 destroys the trained stdlib_bert in
            SA++'s dense phase (every fine-tune there ends at chance) while CTR, whose best rate it is, loses
            about as much at every rate. None: no check.
        dense_ratio: see ``dense_check``.
        batch_stats: score the candidates with BatchNorm normalising by each held-out chunk's own statistics
            instead of its running ones (left as they were). After the one-shot prune the running statistics
            describe the dense model, and a few steps at a high rate move the weights faster than they follow:
            scored by them, a structured resnet18's candidates had held-out losses of 0.08-0.23 that were almost
            all stale statistics (0.002-0.01 by batch statistics) and the probe chose 3e-5 / 1e-4 where 3e-4 is
            best (BENCHMARKS.md section 15.9); on the same resnet18 pruned to 80 % of its 8 x 8 blocks every
            candidate scored worse than a constant prediction and SA++ got 1e-5 and 0.87 accuracy, against 3e-3
            and 0.99 by batch statistics (15.11). The fine-tune's final model has had hundreds of steps to update
            them; the probe's candidates have not. The dense check always scores this way. Models without
            BatchNorm score the same either way, bit for bit. The cost (15.9, 15.11): the higher rates it lets
            through include 1e-2 on the digits CNN at B = 8, s = 0.95, which SA++'s sparsify phase did not
            survive on one seed of three. False: the running statistics.
    """

    candidates: tuple[float, ...] = LR_CANDIDATES
    strategy: str = "halving"
    budget: float = 0.08
    held_out: float = 0.1
    max_rows: int = 512
    phase: str = "sparse"
    keep: float = 1.0 / 3.0
    warmup: float | None = None
    fallback: float = 1e-3
    scoring: float = 0.6
    anneal: str = "auto"
    prime: float = 0.03
    dense_check: float | None = 0.5
    dense_ratio: float = 3.0
    batch_stats: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(float(c) for c in self.candidates))
        if len(self.candidates) < 2 or any(not c > 0 for c in self.candidates):
            raise ConfigError(f"lr_probe.candidates: expected at least 2 positive rates, got {self.candidates!r}")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"lr_probe.candidates: expected distinct rates, got {self.candidates!r}")
        if self.warmup is not None and not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"lr_probe.warmup: expected a fraction in [0, 1), got {self.warmup!r}")
        for name in ("budget", "held_out", "keep"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"lr_probe.{name}: expected a fraction in (0, 1), got {v!r}")
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ConfigError(f"lr_probe.max_rows: expected a positive integer, got {self.max_rows!r}")
        if not self.fallback > 0:
            raise ConfigError(f"lr_probe.fallback: expected a positive rate, got {self.fallback!r}")
        if not self.scoring > 0:
            raise ConfigError(f"lr_probe.scoring: expected a positive multiple, got {self.scoring!r}")
        from .lr_probe import STRATEGIES  # the registry imports this module

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"lr_probe.strategy: expected one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        if self.phase not in ("program", "sparse"):
            raise ConfigError(f"lr_probe.phase: expected program|sparse, got {self.phase!r}")
        if not 0.0 <= self.prime < 1.0:
            raise ConfigError(f"lr_probe.prime: expected a fraction in [0, 1), got {self.prime!r}")
        if self.anneal not in ("auto", "program", "rung"):
            raise ConfigError(f"lr_probe.anneal: expected auto|program|rung, got {self.anneal!r}")
        if self.batch_stats not in (True, False):
            raise ConfigError(f"lr_probe.batch_stats: expected true or false, got {self.batch_stats!r}")
        if self.dense_check is not None and not 0.0 < self.dense_check <= 1.0:
            raise ConfigError(f"lr_probe.dense_check: expected a share in (0, 1] or None, got {self.dense_check!r}")
        if not self.dense_ratio >= 1.0:
            raise ConfigError(f"lr_probe.dense_ratio: expected a ratio >= 1, got {self.dense_ratio!r}")


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """The fine-tuning budget and optimiser.

    Exactly one of ``steps`` / ``epochs`` sets the budget; with neither, 10 epochs but at least 300 steps
    (small shards need more passes for the phase schedule to have room).

    Attributes:
        weight_decay: a *coupled* l2 penalty (added to the loss gradient) on the masked weights and, with
            ``logit_decay``, on SA++ logits; ALGORITHM.md explains why coupled, not decoupled, decay is what
            makes the attention rank blocks by importance.
        lr: the peak learning rate, or ``"auto"`` (the default; ``None`` means the same): measured on the training
            shard before the fine-tune by the probe of :mod:`sapp_compress.lr_probe`, configured by ``lr_probe``.
        warmup: fraction of the budget with linear LR warm-up; cosine decay after.
        amp: mixed precision on CUDA: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16``, ``off``.
        eval_fraction: held-out fraction of the training shard when no evaluation shard is given.
        checkpoint_dir / checkpoint_every / resume: write a checkpoint every ``checkpoint_every`` steps
            (0: every 5 % of the budget) and, with ``resume``, continue from the one found there.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float | str | None = "auto"
    lr_probe: LRProbeConfig = field(default_factory=lambda: LRProbeConfig())
    weight_decay: float = 1e-4
    warmup: float = 0.05
    grad_clip: float | None = 1.0
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    eval_fraction: float = 0.2
    distill_temperature: float = 1.0
    log_every: int = 50
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("budget: give steps or epochs, not both")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps: expected a positive integer, got {self.steps!r}")
        if self.epochs is not None and not (self.epochs > 0):
            raise ConfigError(f"epochs: expected a positive number, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size!r}")
        if self.lr is None:
            object.__setattr__(self, "lr", "auto")
        if self.lr != "auto" and (isinstance(self.lr, (str, bool)) or not isinstance(self.lr, (int, float))
                                  or not self.lr > 0):
            raise ConfigError(f"lr: expected a positive number or 'auto', got {self.lr!r}")
        if not isinstance(self.lr_probe, LRProbeConfig):
            raise ConfigError(f"lr_probe: expected an LRProbeConfig, got {type(self.lr_probe).__name__}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: expected >= 0, got {self.weight_decay!r}")
        if not (0.0 <= self.warmup < 1.0):
            raise ConfigError(f"warmup: expected a fraction in [0, 1), got {self.warmup!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device: expected one of {DEVICES}, got {self.device!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"amp: expected auto|bf16|fp16|off, got {self.amp!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: expected >= 0 steps, got {self.checkpoint_every!r}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume: needs a checkpoint directory (--checkpoint-dir)")
        if not (0.0 < self.eval_fraction < 1.0):
            raise ConfigError(f"eval_fraction: expected 0 < f < 1, got {self.eval_fraction!r}")

    def total_steps(self, n_samples: int) -> int:
        """The budget in optimiser steps for a shard of ``n_samples`` training samples."""
        if self.steps is not None:
            return self.steps
        per_epoch = max(1, -(-n_samples // self.batch_size))
        if self.epochs is None:
            return max(300, 10 * per_epoch)
        return max(1, int(round(float(self.epochs) * per_epoch)))
