"""The Python API: ``prune`` fine-tunes a copy of a model with block pruning and returns it folded.

    >>> from sapp_compress import prune, PruneConfig, TrainConfig
    >>> from calib_data.shards import load_shard
    >>> result = prune(model, load_shard("calib_data/digits.npz"),
    ...                PruneConfig(block="8", sparsity=0.8), TrainConfig(steps=600))
    >>> result.model          # plain nn.Module, pruned blocks exactly 0.0
    >>> result.layers         # the block manifest for the ONNX converters

Data flows once: plan layers -> attach masks -> fine-tune (method + schedule) -> fold -> evaluate.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard
from converters.manifest import LayerBlocks

from .adapters import OutputInfo, adapt, unwrap
from .checkpoint import Checkpointer, fingerprint
from .config import PruneConfig, TrainConfig
from .distributed import mask_digest
from .errors import ConfigError, DataError, GeometryError
from .geometry import LayerPlan, SkippedLayer, plan_layers
from .lr_probe import ProbeResult, choose_lr
from .masks import fold, fold_foreign
from .methods import METHODS
from .tasks import Task, infer_task
from .structure.groups import StructureResult
from .training import Progress, fine_tune, predict, resolve_device, to_tensors

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: a folded deep copy (no parametrizations), pruned blocks exactly 0.0, eval mode, on CPU; called
            with the shard's arrays in order and returning one tensor (a :class:`~sapp_compress.adapters.ModelIO`
            around the user's model where that needed adapting; :func:`~sapp_compress.adapters.unwrap` gives
            the user's own class).
        dense_model: a copy of the model given, in the same form, eval mode, on CPU.
        layers: the block manifest, one entry per pruned weight, with the folded weight filled in.
        skipped: weight-bearing layers left dense, each with its reason.
        metrics: ``{"dense": ..., "pruned_torch": ...}``, the task's metrics on the evaluation shard.
        lr / lr_source / lr_choice: the fine-tune's peak rate, ``--lr`` or what chose it (``probe``, or
            ``fallback`` when the budget was too short to probe), and the probe's measurements.
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
    structure: StructureResult | None = None

    @property
    def mask_digest(self) -> str:
        """sha256 over the final block masks in layer order (with ``structure="channels"``, over the families'
        kept units): equal digests, equal masks."""
        if self.structure is not None:
            return mask_digest([torch.from_numpy(k) for k in self.structure.keep.values()])
        return mask_digest([torch.from_numpy(lb.kept) for lb in self.layers])

    @property
    def achieved_block_sparsity(self) -> float:
        """Fraction of pruned layers' weights in dropped blocks (from the masks)."""
        total = sum(int(np.prod(lb.weight_shape)) for lb in self.layers)
        zero = sum(int((lb.weight == 0).sum()) for lb in self.layers if lb.weight is not None)
        return zero / total if total else 0.0


def check_fits(model: nn.Module, shard: Shard) -> np.ndarray:
    """Run ``model`` on two samples of ``shard``; a failure becomes a one-line :class:`DataError`."""
    return adapt(model, shard)[2]


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
        return (f"the fine-tune collapsed: held-out {task.score_name} {pruned:.3f} against the dense model's "
                f"{dense:.3f}, where a constant prediction scores {baseline:.3f}; more steps (--steps), a lower "
                "--sparsity, a larger shard or another --lr may help")
    return None


def unused_by_output(model: nn.Module, plans: list[LayerPlan], shard: Shard, output: OutputInfo
                     ) -> list[SkippedLayer]:
    """The planned weights that the selected output does not depend on (no autograd path from them to it, on
    two samples of ``shard``): e.g. ``BertModel``'s pooler when the output is ``last_hidden_state``. Pruning
    them would change nothing the model is scored or exported on, and the exported graph, which computes only
    that output, does not hold them. Best effort: a model whose backward fails here is left as planned."""
    inner = unwrap(model)
    weights = [inner.get_parameter(p.name) for p in plans]
    flags = [w.requires_grad for w in weights]
    xs = to_tensors(tuple(x[:2] for x in shard.inputs), torch.device("cpu"))
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = model(*xs)
            grads = torch.autograd.grad(out.float().sum(), weights, allow_unused=True)
    except Exception as e:  # noqa: BLE001 -- only a shortcut: the pre-check still finds what the graph lacks
        log.info("could not trace which weights the output uses (%s)", str(e).splitlines()[0] if str(e) else e)
        return []
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    return [SkippedLayer(p.name, f"the selected output {output.key!r} does not depend on it (the exported graph "
                                 "computes only that output, without this weight): left dense")
            for p, g in zip(plans, grads) if g is None]


def _leave_dense(plans: list[LayerPlan], skipped: list[SkippedLayer], drop: list[SkippedLayer]
                 ) -> tuple[list[LayerPlan], list[SkippedLayer]]:
    if not drop:
        return plans, skipped
    names = {s.name for s in drop}
    return [p for p in plans if p.name not in names], [*skipped, *drop]


def _require_plans(plans: list[LayerPlan], skipped: list[SkippedLayer], prune_cfg: PruneConfig) -> None:
    if not plans:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped) or "the model has no Linear or Conv layer"
        raise GeometryError(f"no layer can be pruned at block {prune_cfg.block}: {reasons}")


def ignored_arrays_warning(shard: Shard) -> str | None:
    """A warning naming the arrays of ``shard`` that are neither inputs nor labels (never dropped silently)."""
    if not shard.ignored:
        return None
    return (f"{shard.source}: arrays {list(shard.ignored)} are neither model inputs nor labels and were ignored "
            f"(inputs used: {list(shard.names)}; labels are read from y or labels)")


def _checkpointer(prune_cfg: PruneConfig, train_cfg: TrainConfig, total_steps: int, train: Shard,
                  model: nn.Module) -> Checkpointer | None:
    if not train_cfg.checkpoint_dir:
        return None
    run = dataclasses.replace(train_cfg, checkpoint_dir=None, resume=False, device="auto", log_every=0)
    fp = fingerprint(prune=repr(prune_cfg), train=repr(run), steps=total_steps, n=len(train),
                     params=[(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    every = train_cfg.checkpoint_every or max(1, total_steps // 20)
    return Checkpointer(train_cfg.checkpoint_dir, every, train_cfg.resume, fp)


def prune(
    model: nn.Module,
    train: Shard,
    prune_cfg: PruneConfig,
    train_cfg: TrainConfig = TrainConfig(),
    *,
    eval_shard: Shard | None = None,
    progress: Progress | None = None,
    before_fine_tune: Callable[[nn.Module, list[LayerPlan]], dict[str, str] | None] | None = None,
    speed: "SpeedTarget | None" = None,
) -> PruneResult:
    """Fine-tune a copy of ``model`` with block pruning on ``train`` and return it folded.

    Without ``eval_shard``, ``train_cfg.eval_fraction`` of ``train`` is held out (``Shard.split``). Without
    labels in the shard, the copy is distilled from ``model`` (its outputs are the targets).
    ``before_fine_tune(dense, plans)`` runs once the layers are planned and before any training: the place
    for checks that would otherwise fail only after the fine-tune (export, weight location). It may return
    ``{name: reason}`` for planned weights to leave dense (they join ``skipped``).
    With ``prune_cfg.target_speedup``, ``speed`` says where the speed-up is measured (serving batch, threads,
    precision; default: batch 1, fp32): the latency table is measured before the fine-tune (an unreachable
    target is a :class:`GeometryError` naming the best reachable), and each family's width is allocated at the
    start of the first and the last sparsify phase (:mod:`sapp_compress.structure.allocate`).

    The model's own reparametrizations (``weight_norm``, ``spectral_norm``, ...) are folded into plain weights
    first (:func:`~sapp_compress.masks.fold_foreign`), and planned weights that the selected output does not
    depend on are left dense (:func:`unused_by_output`).

    Raises:
        ConfigError: unknown method or bad method options.
        DataError: the shard does not fit the model, or its labels do not fit the task.
        GeometryError: no layer can be pruned with this block (with the reasons), or ``indivisible="error"``.
    """
    t0 = time.perf_counter()
    if prune_cfg.method not in METHODS:
        raise ConfigError(f"method: expected one of {sorted(METHODS)}, got {prune_cfg.method!r}")
    warnings = [w for w in (ignored_arrays_warning(train),
                            None if eval_shard is None else ignored_arrays_warning(eval_shard)) if w]
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

    student = copy.deepcopy(dense)
    cpu = torch.device("cpu")
    if prune_cfg.structure == "channels":
        from .structure.plan import plan_families

        example = to_tensors(tuple(x[:2] for x in train.inputs), cpu)
        plans, skipped, splan = plan_families(student, unwrap(student), example, prune_cfg, inner_of=unwrap)
    else:
        plans, skipped = plan_layers(unwrap(student), prune_cfg)
    _require_plans(plans, skipped, prune_cfg)
    if prune_cfg.structure != "channels":  # a family's units feed the output by construction
        plans, skipped = _leave_dense(plans, skipped, unused_by_output(student, plans, train, output))
    if before_fine_tune is not None and plans:
        drop = before_fine_tune(dense, plans) or {}
        plans, skipped = _leave_dense(plans, skipped, [SkippedLayer(n, r) for n, r in drop.items()])
    _require_plans(plans, skipped, prune_cfg)

    device = resolve_device(train_cfg.device)
    total_steps = train_cfg.total_steps(len(train))
    table, timer = _latency_table(student, splan, train, prune_cfg, speed) if prune_cfg.target_speedup else (None, None)
    teacher = copy.deepcopy(dense).to(device) if task.distill else None
    lr = choose_lr(student, plans, teacher, task, train, prune_cfg, train_cfg, device, total_steps)
    train_cfg = dataclasses.replace(train_cfg, lr=lr.value)
    if not lr.informative:
        warnings.append(
            f"--lr auto: no candidate rate beat a constant prediction on the probe's held-out rows (the best, "
            f"{lr.value:g}, {lr.scores[lr.value][-1]:.4g} against {lr.constant_loss:.4g}): its {lr.candidate_steps} steps could "
            "not tell the rates apart and the rate is a guess: fix --lr, or give the fine-tune more steps")
    method = METHODS[prune_cfg.method](prune_cfg, plans, total_steps)
    student.to(device)
    allocator = None
    if table is not None:
        from .structure.allocate import Allocator

        allocator = Allocator(table, speed or _default_speed(prune_cfg), _loss_on_rows(student, task, train, device),
                              timer=timer)
        method.before_sparsify = allocator

    dense_out = predict(dense, eval_shard, cpu)
    metrics = {"dense": task.metrics(dense_out, eval_shard.y, dense_out)}
    log.info("pruning %d layers with %s for %d steps on %s at lr %g (%s)", len(plans), prune_cfg.method,
             total_steps, device, lr.value, lr.source)
    cpu_t0 = time.process_time()
    outcome = fine_tune(student, teacher, method, task, train, train_cfg, device, total_steps, progress,
                        checkpointer=_checkpointer(prune_cfg, train_cfg, total_steps, train, dense),
                        initial_state=lr.dense.state if lr.dense is not None else None)  # its first steps at lr.value
    if lr.dense is not None:
        lr.dense.resumed, lr.dense.state = outcome.continued, None  # a model and its optimizer moments: not kept
    lr.fine_tune_seconds, lr.fine_tune_cpu_seconds = outcome.seconds, time.process_time() - cpu_t0

    student.to(cpu).eval()
    structure = None
    if prune_cfg.structure == "channels":
        manifest = []
        structure = _remove_units(student, plans, method.layers, eval_shard, keep_folded=allocator is not None)
        if allocator is not None:
            structure.speed = {"table": allocator.table, "allocations": allocator.history, "loss": allocator.loss}
    else:
        manifest = fold(method.layers)
    metrics["pruned_torch"] = task.metrics(predict(student, eval_shard, cpu), eval_shard.y, dense_out)
    baseline = constant_score(task, eval_shard.y, dense_out)
    warnings += [w for w in (collapse_warning(task, metrics, baseline),) if w]
    for w in warnings:
        log.warning("%s", w)
    return PruneResult(
        model=student, dense_model=dense, layers=manifest, skipped=skipped, task=task,
        train_shard=train, eval_shard=eval_shard, metrics=metrics, history=outcome.history,
        dense_eval_outputs=dense_out,
        device=str(device), seconds=time.perf_counter() - t0, total_steps=total_steps,
        output=output, lr=lr.value, lr_source=lr.source, lr_choice=lr, warnings=warnings, structure=structure,
    )


def _default_speed(cfg: PruneConfig):
    from .structure.allocate import SpeedTarget

    return SpeedTarget(cfg.target_speedup)


def _onnx_rows(shard: Shard, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of ``shard`` as ONNX inputs (float32 / int64), by input name."""
    return {n: np.ascontiguousarray(np.asarray(x[idx])).astype(
        np.float32 if np.issubdtype(np.asarray(x[:1]).dtype, np.floating) else np.int64)
        for n, x in zip(shard.names, shard.inputs)}


#: rows of the training shard the latency-aware allocation measures each family's loss growth on
SENSITIVITY_ROWS = 64


def _latency_table(student: nn.Module, splan, train: Shard, cfg: PruneConfig, speed):
    """The latency table of ``--target-speedup`` (before any fine-tuning) and the whole-model timer the allocations
    are measured with; an unreachable target is exit 2."""
    from .structure.allocate import WholeTimer, build_table

    t0 = time.perf_counter()
    speed = speed or _default_speed(cfg)
    n = len(train)
    feed = _onnx_rows(train, np.arange(speed.batch) % n)
    calibration = _onnx_rows(train, np.unique(np.linspace(0, n - 1, min(n, 32)).astype(np.int64)))
    timer = WholeTimer(student, splan, _onnx_rows(train, np.arange(2)), feed, speed, calibration, inner_of=unwrap)
    table = build_table(student, splan, timer.export_rows, feed, speed, calibration, inner_of=unwrap, timer=timer)
    table.seconds = round(time.perf_counter() - t0, 3)
    best = table.best_speedup()
    if best < cfg.target_speedup:
        raise GeometryError(f"--target-speedup {cfg.target_speedup:g} cannot be reached here: the most this model "
                            f"reaches on this machine (every head, neuron and channel family at its smallest "
                            f"width, batch {speed.batch}, {speed.precision}) is {best:.2f}x")
    return table, timer


def _divergence(task, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """How far outputs ``out`` are from the dense model's ``ref``: KL divergence of the class distributions for a
    classifier, binary cross-entropy against the dense model's probabilities for a binary one, else the mean
    squared difference."""
    import torch.nn.functional as F

    out, ref = out.float(), ref.float()
    if task.is_classifier:
        n = out.shape[-1]
        return F.kl_div(F.log_softmax(out.reshape(-1, n), -1), F.log_softmax(ref.reshape(-1, n), -1),
                        reduction="batchmean", log_target=True)
    if task.name == "binary":
        return F.binary_cross_entropy_with_logits(out.reshape(-1), torch.sigmoid(ref.reshape(-1)))
    return F.mse_loss(out.reshape(ref.shape), ref)


def _loss_on_rows(student: nn.Module, task, train: Shard, device):
    """``loss_of()``: how far ``student``'s outputs on fixed rows of the training shard are from the dense
    model's (``student`` as it is now, before any pruning; :func:`_divergence`), without gradients. Against the
    dense outputs rather than the labels: a trained model fits its training rows, so the labels' loss barely
    moves (and its growth, clamped at zero, ties) where the outputs already change."""
    idx = np.unique(np.linspace(0, len(train) - 1, min(len(train), SENSITIVITY_ROWS)).astype(np.int64))
    xs = to_tensors(tuple(np.asarray(x[idx]) for x in train.inputs), device)

    def outputs() -> torch.Tensor:
        was = student.training
        student.eval()
        with torch.no_grad():
            out = student(*xs).float()
        student.train(was)
        return out

    ref = outputs()

    def loss_of() -> float:
        return float(_divergence(task, outputs(), ref))

    return loss_of


def _remove_units(student: nn.Module, plans, masked, eval_shard: Shard, keep_folded: bool = False) -> StructureResult:
    """Fold the families' masks, then remove the pruned units from the model (it gets smaller); the smaller
    model must compute what the masked one did. With ``keep_folded``, a copy of the folded model before the
    removal is kept in the result (a corrective round of ``--target-speedup`` removes more units from it)."""
    from .structure.gates import fold as fold_families
    from .structure.plan import PARITY_RTOL
    from .structure.remove import max_rel_diff, remove

    keep = fold_families(masked)
    families = [p.family for p in plans]
    folded = copy.deepcopy(student) if keep_folded else None
    inner = unwrap(student)
    sizes = {n: t.numel() for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
    rows = tuple(x[: min(8, len(eval_shard))] for x in eval_shard.inputs)
    xs = to_tensors(rows, torch.device("cpu"))
    with torch.no_grad():
        before = student(*xs)
    remove(inner, families, keep)
    with torch.no_grad():
        after = student(*xs)
    d = max_rel_diff(before, after)
    if not d <= PARITY_RTOL:
        raise RuntimeError(f"removing the pruned units changed the model's outputs by {d:.1e} of their scale")
    after_sizes = {n: t.numel() for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
    return StructureResult(families, keep, sizes, after_sizes, d, frozenset(n for n, _ in inner.named_buffers()),
                           folded=folded)
