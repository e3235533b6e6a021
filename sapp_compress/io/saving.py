"""The ``--save-torch`` file: the pruned, folded model written with ``torch.save(module)``, and
:func:`load_pruned`, which reads it back.

``torch.save`` pickles the module object, so it fails on anything a pickle cannot hold. Two kinds come from
the libraries rather than the user, and are handled here:

- a parametrized module (``torch.nn.utils.parametrizations.weight_norm``, e.g. a speech model's positional
  conv): :func:`sapp_compress.io.reparametrizations.fold_foreign` folds those into plain weights before
  pruning;
- hooks that a library registers as local functions and registers again when they are missing
  (:data:`REINSTALLED_HOOKS`: transformers' output-capturing hooks, installed on the first forward): removed
  before saving, and the library puts them back the next time the model runs.

What remains (the user's own lambdas, local classes, ...) is found before the fine-tune by
:func:`check_picklable`, through the same code as the final save.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModel


def _transformers_capture_hook(fn: Callable) -> bool:
    return getattr(fn, "__module__", "") == "transformers.utils.output_capturing"


def _transformers_reinstall(module: nn.Module) -> None:
    if getattr(module, "_output_capturing_hooks_installed", False):
        module._output_capturing_hooks_installed = False  # the next forward installs them again


#: (is this forward hook one a library re-registers, reset a module so that the library does): hooks of local
#: functions, which the pickle behind ``torch.save`` cannot write
REINSTALLED_HOOKS: list[tuple[Callable[[Callable], bool], Callable[[nn.Module], None]]] = [
    (_transformers_capture_hook, _transformers_reinstall),
]


def strip_reinstalled_hooks(model: nn.Module) -> int:
    """Remove (in place) the forward hooks of :data:`REINSTALLED_HOOKS`; returns how many."""
    removed = 0
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if any(test(getattr(hook, "hook", hook)) for test, _ in REINSTALLED_HOOKS):
                    del hooks[key]
                    m._forward_hooks_with_kwargs.pop(key, None)
                    m._forward_hooks_always_called.pop(key, None)
                    removed += 1
        for _, reset in REINSTALLED_HOOKS:
            reset(m)
    return removed


def save_pruned(model: nn.Module, path: str | Path) -> None:
    """``torch.save(model, path)`` once the library hooks that would stop it are removed."""
    strip_reinstalled_hooks(model)
    torch.save(model, path)


class _Discard(io.RawIOBase):
    """A file that forgets what is written to it."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(memoryview(b))


def check_picklable(model: nn.Module) -> None:
    """:func:`save_pruned` into nothing: what the pre-check runs, so that ``--save-torch`` cannot fail after
    the fine-tune. Raises :class:`UnsupportedModel` (exit 2)."""
    from converters.export import one_line

    try:
        save_pruned(model, _Discard())
    except Exception as e:  # noqa: BLE001 -- pickling fails with many types (lambdas, local classes, hooks)
        raise UnsupportedModel(f"--save-torch: torch.save cannot write this model ({one_line(e)}); drop "
                               "--save-torch, or save the model's state_dict() yourself") from None


def load_pruned(path: str | Path, *, trust: bool = False) -> nn.Module:
    """The model a ``--save-torch`` file holds, in eval mode, on the CPU.

    Like ``torch.load``, but torchvision (and timm and transformers, which import it) import even where the
    installed torchvision's compiled ops do not load with this torch (:mod:`sapp_compress.io.extras`). A model
    of torch.nn's own layers loads with the weights-only unpickler; one of library classes (torchvision, timm,
    transformers) needs ``trust=True``, which runs the file's pickle code: only for files you made.

    Raises:
        ModelLoadError: no such file, not a ``torch.save`` file, or a class that needs ``trust=True``.
    """
    from .loading import load_model

    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path}: a directory; expected the file --save-torch wrote")
    return load_model(path, trust=trust)
