"""Frozen, validated configuration objects.

Every value is checked when the object is built; errors show expected vs actual.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, UsageError

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
        method: a name in :data:`sapp_compress.engine.methods.METHODS`.
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
        target_speedup: with ``channels``, instead of a uniform ``sparsity``: each family's width is chosen so
            the model reaches this measured speed-up in ONNX Runtime on this machine
            (:mod:`sapp_compress.speed.allocate`).
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
                raise ConfigError("--target-speedup needs --structure channels (it chooses how many heads, "
                                  "neurons and channels each layer keeps; block sparsity's speed-up is not a "
                                  "width)")
        s = self.sparsity
        if not isinstance(s, (int, float)) or not (0.0 < float(s) < 1.0):
            raise ConfigError(f"sparsity: expected a number with 0 < s < 1, got {s!r}")
        object.__setattr__(self, "sparsity", float(s))
        if self.indivisible not in INDIVISIBLE_POLICIES:
            raise ConfigError(f"indivisible: expected one of {INDIVISIBLE_POLICIES}, "
                              f"got {self.indivisible!r}")
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
    """How ``lr="auto"`` measures the rate (:mod:`sapp_compress.engine.lr_probe`). BENCHMARKS.md section 15
    measures each default against the alternatives; the sections named below say what chose it.

    Attributes:
        candidates: peak rates tried, each from the same starting weights.
        strategy: a name in :data:`sapp_compress.engine.lr_probe.strategies.STRATEGIES`: ``halving``
            (successive halving), ``grid`` (every candidate for the same number of steps) or ``range`` (an LR
            range test).
        phase: what a candidate runs: ``sparse`` (the method prunes to the target at once, by its own scores,
            then its final sparse phase: masks fixed) or ``program`` (the method's whole program, compressed
            into the probe's steps).
        budget: the probe's optimizer steps, all candidates together, as a fraction of the fine-tune's (the
            candidates' first program step, which their warm-up runs at rate zero, runs once with the
            priming).
        held_out: fraction of the training shard's rows the candidates are scored on (never trained on by the
            probe; the fine-tune then trains on every row), at most ``max_rows`` rows.
        keep: with ``halving``, the fraction of candidates that go on to the next rung (1 / eta).
        warmup: the candidates' warm-up fraction (None: the fine-tune's).
        fallback: the rate used when the budget is too short to probe (the report says so).
        scoring: the held-out rows scored, all evaluations together, at most this many times the rows the
            probe trains on (its steps times the batch size): half to the last rung, the other half shared by
            the earlier evaluations, never fewer than 32 rows an evaluation (nor more than are held out)
            (15.1).
        anneal: where a candidate's rate decays to zero: ``program`` (one warm-up and cosine over the whole
            program, as the fine-tune has), ``rung`` (every rung a warm-up and cosine cycle of its own, so
            every score is taken with the rate annealed) or ``auto`` (the default): ``rung`` when the
            candidates run the method's whole program (``phase="sparse"`` and a method that prunes once at
            step 0, then trains sparse: magnitude), ``program`` otherwise (15.4, 15.10).
        prime: steps at rate zero run once before the candidates branch, shared by all of them, as a fraction
            of the fine-tune's steps: they fill the optimizer's moments (and BatchNorm's statistics) as the
            fine-tune's warm-up does. Counted in the probe's steps, on top of ``budget`` (15.2).
        dense_check: for a method whose program starts with a dense phase (SA++, GMP, ACDC, Powerprop), the
            fine-tune's own first steps (its warm-up and one step at the peak) are run at the winner on a
            copy, and the winner is vetoed when that costs the model more than this share of its held-out
            advantage over a constant prediction (a model with no advantage must not get worse) and ends above
            ``dense_ratio`` times the next lower candidate's loss after the same steps; the next lower
            candidate is then checked in its place. The fine-tune continues from the run of the rate chosen.
            None: no check (15.5).
        dense_ratio: see ``dense_check``.
        batch_stats: score the candidates with BatchNorm normalising by each held-out chunk's own statistics
            instead of its running ones (left as they were), which the one-shot prune leaves stale. The dense
            check always scores this way; models without BatchNorm score the same either way, bit for bit.
            False: the running statistics (15.9, 15.11).
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
            raise ConfigError("lr_probe.candidates: expected at least 2 positive rates, "
                              f"got {self.candidates!r}")
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
        from .engine.lr_probe.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"lr_probe.strategy: expected one of {sorted(STRATEGIES)}, "
                              f"got {self.strategy!r}")
        if self.phase not in ("program", "sparse"):
            raise ConfigError(f"lr_probe.phase: expected program|sparse, got {self.phase!r}")
        if not 0.0 <= self.prime < 1.0:
            raise ConfigError(f"lr_probe.prime: expected a fraction in [0, 1), got {self.prime!r}")
        if self.anneal not in ("auto", "program", "rung"):
            raise ConfigError(f"lr_probe.anneal: expected auto|program|rung, got {self.anneal!r}")
        if self.batch_stats not in (True, False):
            raise ConfigError(f"lr_probe.batch_stats: expected true or false, got {self.batch_stats!r}")
        if self.dense_check is not None and not 0.0 < self.dense_check <= 1.0:
            raise ConfigError("lr_probe.dense_check: expected a share in (0, 1] or None, "
                              f"got {self.dense_check!r}")
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
        lr: the peak learning rate, or ``"auto"`` (the default; ``None`` means the same): measured on the
            training shard before the fine-tune by the probe of :mod:`sapp_compress.engine.lr_probe`,
            configured by ``lr_probe``.
        warmup: fraction of the budget with linear LR warm-up; cosine decay after.
        amp: mixed precision on CUDA: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16``, ``off``.
        eval_fraction: held-out fraction of the training shard when no evaluation shard is given.
        checkpoint_dir / checkpoint_every / resume: write a checkpoint every ``checkpoint_every`` steps
            (0: every 5 % of the budget) and, with ``resume``, continue from the one found there.
        micro_batch: rows per forward and backward; a batch of more rows is run in parts whose gradients add
            up to the batch's (the same step, less memory). None: chosen by ``activation_budget_mb``.
        activation_budget_mb: with ``micro_batch`` None, the most memory a part's activations (what
            autograd keeps for the backward, measured on two rows before the fine-tune) may take; a batch that
            needs more is split (not a model with BatchNorm, whose batch statistics a part would change).
            None: never split. BENCHMARKS.md section 21.
        layer_distill: the weight of layer-wise distillation (each repeated block's output held to the
            original's: :mod:`sapp_compress.engine.distill`) added to the task's loss; 0: off.
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
    micro_batch: int | None = None
    activation_budget_mb: float | None = 512.0
    layer_distill: float = 0.0

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
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise ConfigError(f"micro_batch: expected a positive integer or None, got "
                              f"{self.micro_batch!r}")
        if not (isinstance(self.layer_distill, (int, float)) and self.layer_distill >= 0):
            raise ConfigError(f"layer_distill: expected a weight >= 0, got {self.layer_distill!r}")
        if self.activation_budget_mb is not None and not self.activation_budget_mb > 0:
            raise ConfigError(f"activation_budget_mb: expected a positive number or None, got "
                              f"{self.activation_budget_mb!r}")
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


#: the default top-1 agreement floor of an int8 classifier against the pruned PyTorch model on the evaluation
#: rows: room for near-ties of logits on small evaluation sets (BENCHMARKS.md section 20.2)
MIN_TOP1_AGREEMENT = 0.8


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how they are checked.

    Attributes:
        onnx_format: ``auto`` or a formulation name (``converters.FORMATS``).
        max_accuracy_drop: the gate, in score units (0.01 = one accuracy point); None: no gate.
        atol / rtol: ORT vs pruned PyTorch tolerance: ``max|diff| <= atol + rtol * max|output|``.
        export_batch_size: the batch size ``auto`` times formulations at (set it to your serving batch). The
            exporter itself always traces :data:`EXPORT_ROWS` rows, with the batch axis dynamic.
        verify_samples: evaluation samples compared between ORT and PyTorch.
        quantize: ``none`` or ``int8`` (the pruned linears' kept blocks in int8: :mod:`converters.int8`).
        int8_rtol: with int8, ORT's int8 model passes verification when ``max|int8 - torch| <= atol +
            int8_rtol * max|torch|`` (see :func:`compress`).
        int8_kernel_rtol: with int8, ORT's integer kernels (graph optimizations on) must match the model's own
            quantize / dequantize reference (optimizations off) to
            ``atol + int8_kernel_rtol * max|reference|`` (:func:`converters.verify_kernels`).
        min_top1_agreement: with int8, a classifier's ORT int8 artifact must also agree with the pruned
            PyTorch model's top-1 on at least this share of the evaluation rows (:data:`MIN_TOP1_AGREEMENT`).
        plan: a previous run's report whose per-layer choices are replayed instead of ``auto``'s timing
            (:class:`converters.Plan`; needs ``onnx_format="auto"``).
        cache: ``auto``'s timing cache (:mod:`converters.cache`): ``use`` (read, measure what is missing,
            write), ``refresh`` (measure everything again and overwrite: ``--no-cache``) or ``off``.
        runtime: where everything is timed, verified and put in int8 (:mod:`converters.runtimes`): ``ort``
            (ONNX Runtime) or ``openvino`` (the ``openvino`` extra). An ``output`` ending in ``.xml`` is
            written as OpenVINO IR (needs ``openvino``).
    """

    output: Path
    report: Path | None = None
    save_torch: Path | None = None
    onnx_format: str = "auto"
    max_accuracy_drop: float | None = None
    atol: float = 1e-4
    rtol: float = 1e-3
    threads: int | None = None
    export_batch_size: int = 1
    verify_samples: int = 1024  # at least 2: verification also runs at batch 1, and never at the export's 2
    quantize: str = "none"
    int8_rtol: float = 0.2
    int8_kernel_rtol: float = 0.1
    min_top1_agreement: float = MIN_TOP1_AGREEMENT
    plan: Path | None = None
    cache: str = "use"
    accept_missed_target: bool = False
    runtime: str = "ort"

    def __post_init__(self) -> None:
        from converters import FORMATS
        from converters.cache import MODES
        from converters.runtimes import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise UsageError(f"runtime: expected one of {tuple(RUNTIMES)}, got {self.runtime!r}")
        if self.output is not None and str(self.output).endswith(".xml") and self.runtime != "openvino":
            raise UsageError(f"-o {self.output}: an .xml output is OpenVINO IR, verified in OpenVINO: add "
                             "--runtime openvino")

        if self.onnx_format not in FORMATS:
            raise UsageError(f"onnx format: expected one of {FORMATS}, got {self.onnx_format!r}")
        if self.plan is not None and self.onnx_format != "auto":
            raise UsageError(f"--plan replays auto's choices: expected --onnx-format auto with it, got "
                             f"{self.onnx_format!r}")
        if self.cache not in MODES:
            raise UsageError(f"cache: expected one of {MODES}, got {self.cache!r}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UsageError(f"max accuracy drop: expected >= 0, got {self.max_accuracy_drop}")
        if self.atol < 0 or self.rtol < 0:
            raise UsageError(f"atol/rtol: expected >= 0, got {self.atol}/{self.rtol}")
        from converters.convert import QUANTIZE

        if self.quantize not in QUANTIZE:
            raise UsageError(f"quantize: expected one of {tuple(QUANTIZE)}, got {self.quantize!r}")
        if not (self.int8_rtol > 0):
            raise UsageError(f"int8 rtol: expected > 0, got {self.int8_rtol}")
        if not (self.int8_kernel_rtol > 0):
            raise UsageError(f"int8 kernel rtol: expected > 0, got {self.int8_kernel_rtol}")
        if not (0 <= self.min_top1_agreement <= 1):
            raise UsageError(f"min top-1 agreement: expected 0..1, got {self.min_top1_agreement}")
        if self.export_batch_size < 1 or self.verify_samples < 3:
            raise UsageError("export batch size and verify samples: expected >= 1 and >= 3, "
                             f"got {self.export_batch_size} and {self.verify_samples}")
