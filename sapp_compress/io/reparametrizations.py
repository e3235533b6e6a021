"""The user's own reparametrizations of a weight (``weight_norm``, ``spectral_norm``, ``orthogonal``, ...):
found and folded into plain parameters before pruning (:func:`fold_foreign`), so the tool's masks stack on a
plain weight, the exported graph holds that weight as an initializer, and ``torch.save`` can write the
result."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def is_parametrized(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def _fold_parametrizations(module: nn.Module) -> list[str]:
    """``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``,
    ``orthogonal``...)."""
    if not parametrize.is_parametrized(module):
        return []
    names = list(module.parametrizations.keys())
    # deepcopy shares the generated Parametrized<Module> class between the copies, and removing a
    # parametrization deletes its property from that class: every other copy (the user's model, the
    # pre-check's) would lose its weight. This module gets a class of its own first.
    cls = type(module)
    own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    for name in names:  # not under no_grad: the folded tensor must stay a Parameter
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    # parametrizations.weight_norm also registers a local function (unpicklable, so torch.save would fail)
    # that maps an old weight_g / weight_v state_dict onto the parametrization, which is gone now
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        fn = getattr(hook, "hook", hook)
        if getattr(fn, "__module__", "") == "torch.nn.utils.parametrizations" and \
                getattr(fn, "__qualname__", "").endswith("_weight_norm_compat_hook"):
            del module._load_state_dict_pre_hooks[key]
    return names


def _fold_norm_hooks(module: nn.Module) -> list[str]:
    """The older hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm``."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    removers = {WeightNorm: torch.nn.utils.remove_weight_norm,
                SpectralNorm: torch.nn.utils.remove_spectral_norm}
    found = [(type(h), h.name) for h in module._forward_pre_hooks.values() if type(h) in removers]
    for cls, name in found:
        removers[cls](module, name)
    return [name for _, name in found]


#: the user's own reparametrizations of a weight, each with the function that folds it into a plain parameter
#: of a module (returning the folded parameters' names)
FOREIGN_REPARAMETRIZATIONS = (_fold_parametrizations, _fold_norm_hooks)


def fold_foreign(model: nn.Module) -> list[str]:
    """Fold the model's own reparametrizations (a speech model's ``weight_norm`` positional conv, ...) into
    plain parameters holding their current value, in place; returns the full names folded.

    The module computes exactly what it did (in eval mode; ``spectral_norm``'s power iteration is frozen at
    its current estimate). Done before pruning: the masks then stack on a plain weight, the exported graph
    holds that weight as an initializer (not recomputed from ``g`` and ``v``), and ``torch.save`` can write
    the result, which it refuses for a parametrized module. The fine-tune then trains the folded weight."""
    done = []
    for mname, module in list(model.named_modules()):
        for fold_one in FOREIGN_REPARAMETRIZATIONS:
            done += [f"{mname}.{n}" if mname else n for n in fold_one(module)]
    return done
