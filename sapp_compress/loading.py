"""Loading the user's model without running code from the file.

A ``torch.save(module)`` file goes through torch's weights-only unpickler, allowed to rebuild torch.nn's own
module classes (and the reference architectures in :mod:`sapp_compress.zoo`) and nothing else: a model built
from torch's layers needs no flag, and a pickle that tries to run code fails to load instead of running it.
A model with classes of its own needs ``trust=True`` (``--trust-model``), which uses the full unpickler and
so runs whatever the file says: only for files you trust, with their code importable.

A state_dict works too, with ``arch="module:callable"`` building the model it fits. A TorchScript archive is
refused with a one-line error: its layers are not nn.Module layers that masks (parametrizations) can attach to.
"""
from __future__ import annotations

import importlib
import inspect
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelLoadError
from .zoo import SAFE_CLASSES

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _nn_classes() -> list[type]:
    out, stack = set(), [nn.Module]
    while stack:
        c = stack.pop()
        for s in c.__subclasses__():
            if s.__module__.startswith("torch.nn.") and "parametriz" not in s.__module__:
                out.add(s)
            stack.append(s)
    return sorted(out, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def safe_globals() -> list:
    """What the weights-only unpickler may rebuild: torch.nn module classes, torch.nn.functional functions
    (modules hold them as attributes, e.g. a TransformerEncoderLayer's activation) and the zoo's classes."""
    fns = [getattr(F, n) for n in dir(F) if inspect.isfunction(getattr(F, n))]
    return [*_nn_classes(), *SAFE_CLASSES, *fns]


def _import_callable(spec: str):
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise ModelLoadError(f"--arch: expected module:callable (e.g. mypkg.models:build), got {spec!r}")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"--arch {spec}: cannot import it ({e})") from None
    if not callable(obj):
        raise ModelLoadError(f"--arch {spec}: expected a callable returning an nn.Module")
    return obj


def load_model(path: str | Path, *, trust: bool = False, arch: str | None = None) -> nn.Module:
    """Load an ``nn.Module`` saved with ``torch.save(module)`` (or a state_dict, with ``arch``).

    Raises:
        ModelLoadError: missing file, not a PyTorch file, a class the safe loader does not allow (the
            message says to pass --trust-model), a state_dict without ``arch``, or not a model at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a PyTorch file (torch.save writes a zip archive)")
    with zipfile.ZipFile(path) as z:
        if any(n.endswith("/constants.pkl") or n.startswith("code/") for n in z.namelist()):
            # Masks are parametrizations of nn.Module layers, which a ScriptModule cannot hold, and the ONNX
            # exporter cannot trace one: say what to pass instead rather than fail later with a riddle.
            raise ModelLoadError(f"{path}: a TorchScript archive, which cannot be fine-tuned here; pass the "
                                 "nn.Module saved with torch.save(module) (or a state_dict with --arch)")
    try:
        if trust:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- every failure of the unpickler gets one line
        text = str(e)
        m = _GLOBAL_RE.search(text)
        if m and not trust:
            raise ModelLoadError(
                f"{path} uses {m.group(1)}, which is not a torch.nn class; pass --trust-model if you trust this "
                "file (it then runs the file's pickle code, and the class must be importable)") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load it ({first[:200]})") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not arch:
            raise ModelLoadError(f"{path}: holds a state_dict, not a module; pass --arch module:callable "
                                 "that builds the model it belongs to")
        model = _import_callable(arch)()
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"--arch {arch}: returned {type(model).__name__}, expected an nn.Module")
        try:
            model.load_state_dict(obj)
        except RuntimeError as e:
            raise ModelLoadError(f"{path}: the state_dict does not fit --arch {arch} "
                                 f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
        return model.eval()
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not an nn.Module (save it with torch.save(module))")
    return obj.eval()
