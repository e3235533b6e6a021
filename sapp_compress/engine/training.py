"""The fine-tuning loop: one flat loop in a fixed order.

Each step: (1) the method applies the mask events due (and says whether a phase boundary was crossed, which
resets the optimizer state); (2) LR from the cosine schedule; (3) forward under autocast on CUDA; (4) loss
against labels or the teacher's outputs; (5) backward; (6) coupled l2 penalty added to the gradients of the
masked weights (and the SA++ logits); (7) gradient clipping; (8) optimizer step; (9) progress event.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard

from ..config import TrainConfig
from ..errors import ConfigError
from ..io.feeds import to_tensors
from ..io.tasks import Task
from . import distributed
from .checkpoint import Checkpointer
from .distill import layer_loss, layer_names, taps
from .methods import PruningMethod
from .schedules import cosine_lr

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for ``cuda`` without one is a usage error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch.cuda.is_available() is False (use --device "
                          "cpu or auto)")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        # an explicit index: under torchrun every rank has set its own device (distributed.init_from_env)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast on CUDA where supported (fp16 otherwise, or as asked); nothing on CPU."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if amp in ("auto", "bf16") and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


class BatchPlan:
    """The mini-batch of every step as a pure function of ``(seed, step)``.

    Epoch ``e`` visits the samples in the order ``default_rng([seed, e]).permutation(n)``; the last, short
    batch of an epoch is dropped when the shard holds at least one full global batch. Resuming at step ``t``
    needs nothing but ``t``. Under data parallelism each of ``world`` ranks takes its own ``batch_size``
    slice of a global batch of ``batch_size * world``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.batch_size = batch_size
        self.global_batch = min(batch_size * world, n) if n >= world else n
        self.per_epoch = max(1, n // self.global_batch)
        self._epoch, self._perm = -1, np.arange(0)

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        batch = self._perm[i * self.global_batch : (i + 1) * self.global_batch]
        if self.world == 1:
            return batch
        return np.array_split(batch, self.world)[self.rank]


@dataclass
class TrainOutcome:
    history: list[dict]
    seconds: float
    steps: int
    #: whether the run continued from ``initial_state`` (the lr probe's dense check), not from step 0 or a
    #: checkpoint
    continued: bool = False


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (a language model's output head tied to its token
    embedding)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return {k for k, n in uses.items() if n > 1}


def _param_groups(model: nn.Module, method: PruningMethod) -> tuple[list, list, list]:
    """(masked weights, SA++ logits, the rest). Tied parameters are frozen: such a weight is the token
    table and the output head at once, the planner leaves it dense for that reason, and training it on a
    small shard would move every row of the vocabulary through the head alone; frozen, its bytes in the
    exported model are the original's, as the report says."""
    logits = [layer.masker.logits for layer in method.layers if layer.masker.logits is not None]
    masked = list({id(t): t for layer in method.layers for t in layer.trained()}.values())
    special = {id(p) for p in logits + masked} | tied_parameters(model)
    rest = [p for p in model.parameters() if id(p) not in special and p.requires_grad]
    return masked, logits, rest


def fine_tune(
    model: nn.Module,
    teacher: nn.Module | None,
    method: PruningMethod,
    task: Task,
    train: Shard,
    cfg: TrainConfig,
    device: torch.device,
    total_steps: int,
    progress: Progress | None = None,
    stop: int | None = None,
    checkpointer: Checkpointer | None = None,
    lr_at: Callable[[int], float] | None = None,
    initial_state: dict | None = None,
) -> TrainOutcome:
    """Fine-tune ``model`` (already parametrized by ``method``) over a budget of ``total_steps`` steps.

    ``stop`` ends the loop early (the schedule still spans ``total_steps``); the masks are then left where
    the schedule had them, which is what the step-time benchmark needs. Under torchrun the model is wrapped
    in DDP and each rank trains on its slice of every global batch; the ranks' masks are compared at every
    phase boundary. With a ``checkpointer`` the run saves periodically and resumes from its checkpoint.
    ``lr_at(step)`` is the multiple of ``cfg.lr`` at each step (default: :func:`cosine_lr` with warm-up over
    ``total_steps``; the LR range test of :mod:`sapp_compress.engine.lr_probe` gives its own).
    ``initial_state``: a snapshot of this very run's first steps, taken elsewhere (the lr probe's dense check
    runs them), to resume from when the checkpointer has none."""
    masked, logits, rest = _param_groups(model, method)
    logit_lr = method.logit_lr_scale(cfg.lr)
    tensorwise = getattr(method.options, "logit_norm", "element") == "layer"
    opt = LogitAdam([{"params": masked, "lr_scale": 1.0},
                     {"params": logits, "lr_scale": logit_lr, "tensorwise": tensorwise},
                     {"params": rest, "lr_scale": 1.0}], lr=cfg.lr)
    logit_decay = getattr(method.options, "logit_decay", True)
    autocast, amp_dtype = autocast_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    info = distributed.current()
    batches = BatchPlan(len(train), cfg.batch_size, cfg.seed, info.rank, info.world)
    net = model
    if info.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    history: list[dict] = []
    start = 0
    state = checkpointer.load() if checkpointer else None
    if state is not None:
        start = _restore(state, model, opt, method, scaler, history)
        log.info("resumed from %s at step %d", checkpointer.path, start)
    elif initial_state is not None:
        start = _restore(initial_state, model, opt, method, scaler, history)
        log.info("continued from the lr probe's dense check at step %d", start)
    continued = state is None and initial_state is not None
    t0 = time.perf_counter()
    model.train()
    if teacher is not None:
        teacher.eval()
    stop = total_steps if stop is None else min(stop, total_steps)
    skipped = 0
    blocks = layer_names(model) if cfg.layer_distill and teacher is not None else []
    if cfg.layer_distill and not blocks:
        log.warning("layer distillation: %s", "no teacher" if teacher is None else
                    "the model has no run of same-class blocks to hold to the original's: the output only")
    for step in range(start, stop):
        if method.begin_step(step):
            if method.options.reset_optimizer:
                reset_optimizer_state(opt)
            if info.active:
                distributed.check_same_masks(method.masks(), f"step {step + 1}")
        lr = cfg.lr * (lr_at(step) if lr_at is not None
                       else cosine_lr(step / max(1, total_steps), cfg.warmup))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        idx = batches(step)
        opt.zero_grad(set_to_none=True)
        loss = _accumulate(net, teacher, task, train, idx, cfg, device, autocast, scaler, info.active,
                           (model, blocks))
        if scaler:
            scaler.unscale_(opt)
        _coupled_decay(method, cfg.weight_decay, logit_decay)
        if scaler:
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            # A non-finite gradient skips the step (as AMP's scaler does) instead of writing NaN into every
            # weight: an output channel whose block-row is all pruned, normalised by a BatchNorm in training
            # mode, has zero variance, and each such BatchNorm multiplies the gradient by 1/sqrt(eps).
            norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            if torch.isfinite(norm):
                opt.step()
            else:
                skipped += 1
        # Reading the loss synchronises a GPU, so it happens only at logging steps.
        if step % cfg.log_every == 0 or step == total_steps - 1:
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss is {lv} at step {step + 1}; lower --lr")
            row = {"event": "step", "stage": "fine-tune", "step": step + 1, "total": total_steps,
                   "phase": method.phases[method.current_phase].kind, "loss": lv, "lr": lr,
                   "skipped_steps": skipped}
            history.append(row)
            if progress is not None:
                progress(row)
        elif progress is not None:  # every step counts for the estimate; the loss only where it was read
            progress({"event": "step", "stage": "fine-tune", "step": step + 1, "total": total_steps,
                      "phase": method.phases[method.current_phase].kind})
        if checkpointer is not None and checkpointer.due(step + 1, total_steps):
            checkpointer.save(_snapshot(step + 1, model, opt, method, scaler, history))
    if skipped:
        log.warning("%d of %d steps had non-finite gradients and were skipped", skipped, stop - start)
    if stop == total_steps:
        method.finish()
        if info.active:
            distributed.check_same_masks(method.masks(), "the end of fine-tuning")
    return TrainOutcome(history, time.perf_counter() - t0, stop, continued)


def activation_bytes(model: nn.Module, teacher: nn.Module | None, task: Task, train: Shard,
                     cfg: TrainConfig, device: torch.device, rows: int = 2) -> int:
    """Bytes autograd keeps for the backward of ``rows`` rows of ``train`` (each tensor once): a training
    step's activations. The model is left as it was (its gradients cleared)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a functional wrapper)
            pass
        return t

    was = model.training
    model.train()
    idx = np.arange(min(rows, len(train)))
    xs = to_tensors(tuple(x[idx] for x in train.inputs), device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout's draws here leave the fine-tune's as they were
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*xs)
            target = (teacher(*xs).detach().float() if task.distill
                      else to_tensors((train.y[idx],), device)[0])
            loss = task.loss(out, target, cfg.distill_temperature)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    model.train(was)
    weights = {(p.untyped_storage().data_ptr(), p.device.type) for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in weights)


def choose_micro_batch(model: nn.Module, teacher: nn.Module | None, task: Task, train: Shard,
                       cfg: TrainConfig, device: torch.device) -> tuple[int | None, int | None]:
    """(:attr:`TrainConfig.micro_batch` as given, or the most rows whose activations fit
    :attr:`TrainConfig.activation_budget_mb` when a whole batch's do not; the activation bytes per row
    measured, or None where nothing was measured). A model with BatchNorm is never split."""
    if cfg.micro_batch is not None or cfg.activation_budget_mb is None:
        return cfg.micro_batch, None
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None, None
    rows = 2
    per_row = max(1, activation_bytes(model, teacher, task, train, cfg, device, rows) // rows)
    fit = int(cfg.activation_budget_mb * 2**20 // per_row)
    return (max(1, fit) if fit < cfg.batch_size else None), per_row


def micro_batches(idx: np.ndarray, rows: int | None) -> list[np.ndarray]:
    """A batch's rows in parts of at most ``rows`` (None: the whole batch), as even as they come."""
    if not rows or len(idx) <= rows:
        return [idx]
    return np.array_split(idx, math.ceil(len(idx) / rows))


def _accumulate(net, teacher, task: Task, train: Shard, idx: np.ndarray, cfg: TrainConfig, device, autocast,
                scaler, ddp: bool, layers: tuple[nn.Module, list[str]] = (None, [])) -> torch.Tensor:
    """Forward and backward of the batch ``idx``, in :attr:`TrainConfig.micro_batch` parts whose gradients add
    up to the batch's (each part's mean loss weighted by its share of the rows; under DDP the ranks' gradients
    are averaged once, at the last part). With ``layers`` (the student, its block names), the blocks' outputs
    are held to the teacher's too (:mod:`.distill`, weight :attr:`TrainConfig.layer_distill`). Returns the
    batch's loss (detached)."""
    parts = micro_batches(idx, cfg.micro_batch)
    student, blocks = layers
    total = None
    for j, part in enumerate(parts):
        sync = net.no_sync() if ddp and j < len(parts) - 1 else contextlib.nullcontext()
        xs = to_tensors(tuple(x[part] for x in train.inputs), device)
        with sync, taps(student, blocks) as mine, taps(teacher, blocks) as theirs:
            with autocast:
                out = net(*xs)
                if task.distill or blocks:
                    with torch.no_grad():
                        target = teacher(*xs).float()
                if not task.distill:
                    target = to_tensors((train.y[part],), device)[0]
                loss = task.loss(out, target, cfg.distill_temperature)
                if blocks:
                    loss = loss + cfg.layer_distill * layer_loss(mine, theirs)
                if len(parts) > 1:
                    loss = loss * (len(part) / len(idx))
            (scaler.scale(loss) if scaler else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def train_dense(model: nn.Module, train: Shard, task: Task, *, steps: int, batch_size: int, lr: float,
                seed: int = 0, warmup: float = 0.05) -> nn.Module:
    """Plain dense training (Adam, cosine LR, the engine's data path and losses), for the example models
    and the benchmarks' pretrained baselines. Returns ``model`` in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = BatchPlan(len(train), batch_size, seed)
    model.train()
    cpu = torch.device("cpu")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step / steps, warmup)
        idx = batches(step)
        xs = to_tensors(tuple(x[idx] for x in train.inputs), cpu)
        loss = task.loss(model(*xs), to_tensors((train.y[idx],), cpu)[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def _snapshot(next_step, model, opt, method, scaler, history) -> dict:
    return {
        "step": next_step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "method": method.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
    }


def _restore(state, model, opt, method, scaler, history) -> int:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    method.load_state_dict(state["method"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    history.extend(state["history"])
    return int(state["step"])


class LogitAdam(torch.optim.Adam):
    """Adam, except for param groups marked ``tensorwise``: there each tensor (one layer's attention logits)
    shares one second moment, so the step is ``lr * m / sqrt(mean(g^2))`` per layer instead of per element.

    Plain Adam moves every logit by about ``lr`` per step whatever the size of its gradient, so the logits
    rank how *consistently* a block's scale is pushed up, not how much the loss cares: a block revived as
    zeros, whose weights have barely started to grow, gets a small but steady push and outranks the blocks
    the model relies on (BENCHMARKS.md section 20.4). A per-layer normaliser keeps the layer's scale
    invariance (the reason for Adam) and the relative sizes of the blocks' gradients (the importance signal
    SA++'s theory relies on)."""

    @torch.no_grad()
    def step(self, closure=None):
        held = []
        for g in self.param_groups:
            if g.get("tensorwise"):
                for p in g["params"]:
                    if p.grad is not None:
                        held.append((p, p.grad, g))
                        p.grad = None  # Adam skips parameters without a gradient
        loss = super().step(closure)
        for p, grad, g in held:
            p.grad = grad
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros((), dtype=torch.float32, device=p.device)
            b1, b2 = g["betas"]
            st["step"] += 1
            t = float(st["step"])
            st["exp_avg"].lerp_(grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).add_((1 - b2) * grad.float().pow(2).mean())
            denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt().add_(g["eps"])
            p.addcdiv_(st["exp_avg"], denom.to(p.dtype), value=-g["lr"] / (1 - b1**t))
        return loss


@torch.no_grad()
def reset_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Zero every state tensor in place (moments and step counts): the same as a fresh optimizer, without
    reallocating (fresh pages cost more than the zeroing on CPU)."""
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v.zero_()


@torch.no_grad()
def _coupled_decay(method: PruningMethod, wd: float, logit_decay: bool) -> None:
    """grad += wd * (W masked) for every pruned weight (and wd * L for the logits): an l2 penalty in the
    objective, on the weights the mask multiplies. Pruned blocks get no decay, so frozen blocks stay as
    they were and can come back with their values in the next dense phase."""
    if wd <= 0:
        return
    for layer in method.layers:
        layer.decay_(wd)
        L = layer.masker.logits
        if logit_decay and L is not None and L.grad is not None:
            L.grad.add_(L, alpha=wd)
