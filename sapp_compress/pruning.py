"""The fine-tune as a Python function: :func:`prune` fine-tunes a copy of a model with block (or structured)
pruning and returns it folded. The CLI's job (:mod:`sapp_compress.pipeline`) runs its two halves with the
pre-check between them: :func:`prepare` (adapt the model to the shard, infer the task, plan the units) and
:func:`run` (choose the rate, fine-tune, fold).

    >>> from sapp_compress import prune, PruneConfig, TrainConfig
    >>> from calib_data.shards import load_shard
    >>> result = prune(model, load_shard("calib_data/digits.npz"),
    ...                PruneConfig(block="8", sparsity=0.8), TrainConfig(steps=600))
    >>> result.model          # plain nn.Module, pruned blocks exactly 0.0
    >>> result.layers         # the block manifest for the ONNX converters

Data flows once: adapt -> plan units -> (pre-check) -> choose the rate -> attach masks -> fine-tune (method +
schedule) -> fold -> evaluate.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard
from converters.manifest import LayerBlocks

from .config import PruneConfig, TrainConfig
from .engine.checkpoint import Checkpointer, fingerprint
from .engine.distributed import mask_digest
from .engine.lr_probe.probe import ProbeResult, choose_lr
from .engine.methods import METHODS
from .engine.training import Progress, choose_micro_batch, fine_tune, resolve_device
from .engine.units import SkippedLayer
from .errors import ConfigError, DataError
from .granularity import Plan, resolve
from .io.adapters import OutputInfo, adapt, check_fits, unwrap
from .io.export import Axes, probe_axes
from .io.feeds import predict
from .io.reparametrizations import fold_foreign
from .io.tasks import Task, infer_task

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: a folded deep copy (no parametrizations), pruned blocks exactly 0.0 (or, with channels, the
            pruned units removed), eval mode, on CPU; called with the shard's arrays in order and returning
            one tensor (a :class:`~sapp_compress.io.adapters.ModelIO` around the user's model where that
            needed adapting; :func:`~sapp_compress.io.adapters.unwrap` gives the user's own class).
        dense_model: a copy of the model given, in the same form, eval mode, on CPU.
        layers: the block manifest, one entry per pruned weight, with the folded weight filled in (empty with
            channels).
        skipped: weights (or weight axes) left dense, each with its reason.
        metrics: ``{"dense": ..., "pruned_torch": ...}``, the task's metrics on the evaluation shard.
        lr / lr_source / lr_choice: the fine-tune's peak rate, ``--lr`` or what chose it (``probe``, or
            ``fallback`` when the budget was too short to probe), and the probe's measurements.
        structure: with channels, each family's kept units and the sizes before and after
            (:class:`~sapp_compress.structure.groups.StructureResult`).
        masks: the final 0/1 masks (blocks per layer, or units per family), in plan order.
        axes: the input axes the exported graph keeps dynamic (:func:`~sapp_compress.io.export.probe_axes`).
        micro_batch: ``rows`` per forward and backward (None: the whole batch) and the activation MB per row
            measured (:func:`~sapp_compress.engine.training.choose_micro_batch`).
    """

    model: nn.Module
    dense_model: nn.Module
    layers: list[LayerBlocks]
    skipped: list[SkippedLayer]
    task: Task
    train_shard: Shard
    eval_shard: Shard
    metrics: dict
    history: list[dict] = field(default_factory=list)
    dense_eval_outputs: np.ndarray | None = None
    device: str = "cpu"
    seconds: float = 0.0
    total_steps: int = 0
    output: OutputInfo | None = None
    lr: float = 0.0
    lr_source: str = ""
    lr_choice: ProbeResult | None = None
    warnings: list[str] = field(default_factory=list)
    structure: object | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    axes: Axes | None = None
    micro_batch: dict | None = None

    @property
    def mask_digest(self) -> str:
        """sha256 over the final masks in plan order (block grids per layer, or kept units per family): equal
        digests, equal masks."""
        return mask_digest([torch.from_numpy(np.asarray(m)) for m in self.masks])

    @property
    def achieved_block_sparsity(self) -> float:
        """Fraction of pruned layers' weights in dropped blocks (from the masks)."""
        total = sum(int(np.prod(lb.weight_shape)) for lb in self.layers)
        zero = sum(int((lb.weight == 0).sum()) for lb in self.layers if lb.weight is not None)
        return zero / total if total else 0.0


@dataclass
class Prepared:
    """A prune planned and not yet fine-tuned (:func:`prepare`): the model in the tool's form (``dense``, and
    ``student``, the copy that will be pruned), the task, the shards after the split, and the plan."""

    dense: nn.Module
    student: nn.Module
    output: OutputInfo
    task: Task
    train: Shard
    eval_shard: Shard
    plan: Plan
    prune_cfg: PruneConfig
    train_cfg: TrainConfig
    warnings: list[str]
    started: float
    axes: Axes


#: a fine-tune that keeps less than this share of the dense model's lead over a constant prediction is
#: reported as collapsed.
COLLAPSE_FRACTION = 0.5


def constant_score(task: Task, y: np.ndarray | None, reference: np.ndarray) -> float:
    """The score of the best input-independent prediction: the most frequent class (of the labels, or of the
    dense model's top-1 for fidelity); 0 for R^2, cosine and the rest."""
    if task.name == "classification" and y is not None:
        classes = y[y >= 0] if y.ndim > 1 else y
    elif task.name == "distill_classification":
        classes = reference.argmax(-1).reshape(-1)
    elif task.name == "binary" and y is not None:
        classes = y.reshape(-1)
    else:
        return 0.0
    return float(np.bincount(classes.astype(np.int64)).max() / max(1, classes.size))


def collapse_warning(task: Task, metrics: dict, baseline: float) -> str | None:
    """A loud one-line warning when the pruned model kept less than :data:`COLLAPSE_FRACTION` of the dense
    model's lead over ``baseline`` (a constant prediction's score) on held-out data: e.g. a classifier whose
    outputs no longer depend on its input."""
    dense, pruned = metrics["dense"]["score"], metrics["pruned_torch"]["score"]
    if dense > baseline and pruned < baseline + COLLAPSE_FRACTION * (dense - baseline):
        return (f"the fine-tune collapsed: held-out {task.score_name} {pruned:.3f} against the dense "
                f"model's {dense:.3f}, where a constant prediction scores {baseline:.3f}; more steps "
                "(--steps), a lower --sparsity, a larger shard or another --lr may help")
    return None


def ignored_arrays_warning(shard: Shard) -> str | None:
    """A warning naming the arrays of ``shard`` that are neither inputs nor labels (never dropped
    silently)."""
    if not shard.ignored:
        return None
    return (f"{shard.source}: arrays {list(shard.ignored)} are neither model inputs nor labels and were "
            f"ignored (inputs used: {list(shard.names)}; labels are read from y or labels)")


def _checkpointer(prune_cfg: PruneConfig, train_cfg: TrainConfig, total_steps: int, train: Shard,
                  model: nn.Module) -> Checkpointer | None:
    if not train_cfg.checkpoint_dir:
        return None
    run = dataclasses.replace(train_cfg, checkpoint_dir=None, resume=False, device="auto", log_every=0)
    fp = fingerprint(prune=repr(prune_cfg), train=repr(run), steps=total_steps, n=len(train),
                     params=[(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    every = train_cfg.checkpoint_every or max(1, total_steps // 20)
    return Checkpointer(train_cfg.checkpoint_dir, every, train_cfg.resume, fp)


def prepare(model: nn.Module, train: Shard, prune_cfg: PruneConfig, train_cfg: TrainConfig = TrainConfig(), *,
            eval_shard: Shard | None = None) -> Prepared:
    """Everything before the fine-tune that needs no training: a copy of ``model`` with its own
    reparametrizations (``weight_norm``, ``spectral_norm``, ...) folded into plain weights
    (:func:`~sapp_compress.io.reparametrizations.fold_foreign`), adapted to the shard's inputs and output
    (:func:`~sapp_compress.io.adapters.adapt`), the task, the evaluation rows (without ``eval_shard``,
    ``train_cfg.eval_fraction`` of ``train`` held out), and the plan of the granularity that
    ``prune_cfg.structure`` names.

    Raises:
        ConfigError: unknown method.
        DataError: the shard does not fit the model, or its labels do not fit the task.
        GeometryError: nothing can be pruned (with the reasons), or ``indivisible="error"``.
    """
    t0 = time.perf_counter()
    if prune_cfg.method not in METHODS:
        raise ConfigError(f"method: expected one of {sorted(METHODS)}, got {prune_cfg.method!r}")
    warnings = [w for w in (ignored_arrays_warning(train),
                            None if eval_shard is None else ignored_arrays_warning(eval_shard)) if w]
    for w in warnings:  # now: the model may fail on the shard next, for want of an array this dropped
        log.warning("%s", w)
    model = copy.deepcopy(model).cpu().eval()
    folded = fold_foreign(model)
    if folded:
        log.info("folded the model's own reparametrizations into plain weights: %s", ", ".join(folded))
    dense, output, out = adapt(model, train)
    torch.manual_seed(train_cfg.seed)
    task = infer_task(train.y, out, output.kind)
    if eval_shard is None:
        train, eval_shard = train.split(train_cfg.eval_fraction, train_cfg.seed)
    else:
        if eval_shard.names != train.names:
            raise DataError(f"{eval_shard.source}: inputs {list(eval_shard.names)} differ from the training "
                            f"shard's {list(train.names)}")
        check_fits(unwrap(dense), eval_shard)
        if eval_shard.y is not None:
            infer_task(eval_shard.y, out, output.kind)
    axes = probe_axes(dense, train)
    student = copy.deepcopy(dense)
    plan = resolve(prune_cfg.structure).plan(student, train, prune_cfg, output)
    return Prepared(dense, student, output, task, train, eval_shard, plan, prune_cfg, train_cfg, warnings, t0,
                    axes)


def run(job: Prepared, *, progress: Progress | None = None, speed=None) -> PruneResult:
    """Fine-tune ``job.student`` by its plan and return it folded.

    With ``prune_cfg.target_speedup``, ``speed`` (:class:`~sapp_compress.speed.table.SpeedTarget`) says where
    the speed-up is measured (serving batch, threads, precision; default: batch 1, fp32): the latency table is
    measured before the fine-tune (an unreachable target is a :class:`GeometryError` naming the best
    reachable), and each family's width is allocated at the start of the first and the last sparsify phase
    (:class:`~sapp_compress.speed.allocate.Allocator`).

    Raises:
        ConfigError: bad method options.
    """
    prune_cfg, train_cfg, plan, student, dense = (job.prune_cfg, job.train_cfg, job.plan, job.student,
                                                  job.dense)
    task, train, eval_shard, warnings = job.task, job.train, job.eval_shard, []
    cpu = torch.device("cpu")
    device = resolve_device(train_cfg.device)
    total_steps = train_cfg.total_steps(len(train))
    say = progress or (lambda ev: None)
    table = timer = None
    if prune_cfg.target_speedup:
        from .speed.target import latency_table

        say({"event": "phase", "phase": "latency table"})
        table, timer = latency_table(student, plan.structure, train, prune_cfg, speed)
    # measured on the CPU, in float32, before any copy of the model is trained: the probe's copies too
    micro, per_row = choose_micro_batch(student, dense if task.distill else None, task, train, train_cfg, cpu)
    train_cfg = dataclasses.replace(train_cfg, micro_batch=micro)
    teacher = copy.deepcopy(dense).to(device) if task.distill or train_cfg.layer_distill else None
    say({"event": "phase", "phase": "lr probe"})
    lr = choose_lr(student, plan, teacher, task, train, prune_cfg, train_cfg, device, total_steps, progress)
    train_cfg = dataclasses.replace(train_cfg, lr=lr.value)
    if not lr.informative:
        warnings.append(
            "--lr auto: no candidate rate beat a constant prediction on the probe's held-out rows (the "
            f"best, {lr.value:g}, {lr.scores[lr.value][-1]:.4g} against {lr.constant_loss:.4g}): "
            f"its {lr.candidate_steps} steps could not tell the rates apart and the rate is a guess: fix "
            "--lr, or give the fine-tune more steps")
    method = METHODS[prune_cfg.method](prune_cfg, plan, total_steps)
    student.to(device)
    allocator = None
    if table is not None:
        from .speed.allocate import Allocator
        from .speed.target import default_speed, loss_on_rows

        allocator = Allocator(table, speed or default_speed(prune_cfg),
                              loss_on_rows(student, task, train, device), timer=timer, progress=progress)
        method.before_sparsify = allocator

    dense_out = predict(dense, eval_shard, cpu)
    metrics = {"dense": task.metrics(dense_out, eval_shard.y, dense_out)}
    log.info("pruning %d layers with %s for %d steps on %s at lr %g (%s)", len(plan.units), prune_cfg.method,
             total_steps, device, lr.value, lr.source)
    cpu_t0 = time.process_time()
    say({"event": "phase", "phase": "fine-tune"})
    outcome = fine_tune(student, teacher, method, task, train, train_cfg, device, total_steps, progress,
                        checkpointer=_checkpointer(prune_cfg, train_cfg, total_steps, train, dense),
                        # its first steps at lr.value
                        initial_state=lr.dense.state if lr.dense is not None else None)
    if lr.dense is not None:
        # a model and its optimizer moments: not kept
        lr.dense.resumed, lr.dense.state = outcome.continued, None
    lr.fine_tune_seconds, lr.fine_tune_cpu_seconds = outcome.seconds, time.process_time() - cpu_t0

    student.to(cpu).eval()
    done = plan.granularity.finish(student, plan, method.layers, eval_shard,
                                   keep_folded=allocator is not None)
    if allocator is not None:
        done.structure.speed = {"table": allocator.table, "allocations": allocator.history,
                                "loss": allocator.loss}
    metrics["pruned_torch"] = task.metrics(predict(student, eval_shard, cpu), eval_shard.y, dense_out)
    baseline = constant_score(task, eval_shard.y, dense_out)
    warnings += [w for w in (collapse_warning(task, metrics, baseline),) if w]
    for w in warnings:
        log.warning("%s", w)
    warnings = [*job.warnings, *warnings]
    return PruneResult(
        model=student, dense_model=dense, layers=done.layers, skipped=list(plan.skipped), task=task,
        train_shard=train, eval_shard=eval_shard, metrics=metrics, history=outcome.history,
        dense_eval_outputs=dense_out, device=str(device), seconds=time.perf_counter() - job.started,
        total_steps=total_steps, output=job.output, lr=lr.value, lr_source=lr.source, lr_choice=lr,
        warnings=warnings, structure=done.structure, masks=done.masks, axes=job.axes,
        micro_batch={"rows": micro,
                     "activation_mb_per_row": None if per_row is None else round(per_row / 2**20, 3)},
    )


def prune(model: nn.Module, train: Shard, prune_cfg: PruneConfig, train_cfg: TrainConfig = TrainConfig(), *,
          eval_shard: Shard | None = None, progress: Progress | None = None, speed=None) -> PruneResult:
    """Fine-tune a copy of ``model`` with pruning on ``train`` and return it folded: :func:`prepare`, then
    :func:`run`. Without labels in the shard, the copy is distilled from ``model`` (its outputs are the
    targets).

    Raises:
        ConfigError: unknown method or bad method options.
        DataError: the shard does not fit the model, or its labels do not fit the task.
        GeometryError: nothing can be pruned (with the reasons), ``indivisible="error"``, or an unreachable
            ``target_speedup``.
    """
    return run(prepare(model, train, prune_cfg, train_cfg, eval_shard=eval_shard), progress=progress,
               speed=speed)


__all__ = ["COLLAPSE_FRACTION", "Prepared", "PruneResult", "collapse_warning", "constant_score",
           "ignored_arrays_warning", "prepare", "prune", "run"]
