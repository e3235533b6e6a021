"""Layer-wise distillation: besides the output, each of the model's repeated blocks (a transformer's layers, a
CNN stage's blocks) is held to the original's output of the same block, as CoFi and ZipLM recover structured
models. ``TrainConfig.layer_distill`` weighs it against the task's loss (0: off).

The blocks are found, not named per model family: the longest ``nn.ModuleList`` or ``nn.Sequential`` whose
children are all of one class (:func:`layer_names`); the student is a copy of the teacher, so a block has the
same name in both. Pruning keeps a block's output width (heads, neurons and channels go inside it; blocks of a
layer's weight keep its shape), so no map is needed between them. The loss of one block is the mean squared
difference of the two outputs over the teacher output's mean square (each block counts alike whatever its
scale), averaged over the blocks: zero for a student that computes what the teacher does.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def layer_names(model: nn.Module) -> list[str]:
    """Full names of the longest run of same-class blocks held in one ``nn.ModuleList`` / ``nn.Sequential``
    (at least two; ties: the first found); [] when there is none."""
    best: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(m.named_children())
        if len(children) < 2 or len({type(c) for _, c in children}) != 1:
            continue
        if isinstance(children[0][1], (nn.ModuleList, nn.Sequential)) or not any(
                True for _ in children[0][1].parameters()):
            continue  # a container of containers, or of parameter-free modules (activations)
        if len(children) > len(best):
            best = [f"{name}.{c}" if name else c for c, _ in children]
    return best


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    if isinstance(out, dict):
        return next((o for o in out.values() if isinstance(o, torch.Tensor)), None)
    return None


@contextlib.contextmanager
def taps(model: nn.Module | None, names: list[str]):
    """Record the output (its first tensor) of each named block of ``model`` while the context is open: yields
    a list the forward fills, in call order (nothing to record without ``names``)."""
    outs: list[torch.Tensor] = []
    mods = dict(model.named_modules()) if model is not None and names else {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o: outs.append(_first_tensor(o)))
             for n in names if n in mods]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def layer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the blocks of ``mse(s, t) / mean(t^2)``; the lists pair the blocks in call order."""
    terms = [torch.mean((s.float() - t.float()) ** 2) / (t.float().pow(2).mean() + 1e-12)
             for s, t in zip(student, teacher) if s is not None and t is not None and s.shape == t.shape]
    if not terms:
        raise ValueError("layer distillation: no block output of the student matches the teacher's in shape")
    return torch.stack(terms).mean()


__all__ = ["layer_loss", "layer_names", "taps"]
