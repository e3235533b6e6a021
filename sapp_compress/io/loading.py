"""Loading the user's model without running code from the file.

A ``torch.save(module)`` file goes through torch's weights-only unpickler, allowed to rebuild torch.nn's own
module classes (and the reference architectures in :mod:`sapp_compress.zoo`) and nothing else: a model built
from torch's layers needs no flag, and a pickle that tries to run code fails to load instead of running it.
A model with classes of its own needs ``trust=True`` (``--trust-model``), which uses the full unpickler and
so runs whatever the file says: only for files you trust, with their code importable.

A state_dict works too, with ``arch="module:callable"`` building the model it fits, or
``"module:callable(num_classes=10)"`` to pass the builder keyword arguments (Python literals only:
:func:`arch_arguments`). A TorchScript archive is refused with a one-line error: its layers are not nn.Module
layers that masks (parametrizations) can attach to.

A directory made by Hugging Face's ``save_pretrained`` (``config.json`` + weights) is built with the
transformers class that its ``config.architectures`` names, from local files only (never the network), and
without the repository's own code unless ``trust=True``.

The sources are a registry, :data:`SOURCES`: the first whose test accepts the path loads it.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import zipfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from ..zoo import SAFE_CLASSES
from .extras import import_torchvision, require

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


def arch_arguments(spec: str) -> tuple[str, dict]:
    """``"module:callable(k=v, ...)"`` -> (``"module:callable"``, ``{k: v}``); the values are Python literals
    (numbers, strings, booleans, None, tuples, lists, dicts), read with ``ast.literal_eval``, never run."""
    spec = spec.strip()
    if not spec.endswith(")") or "(" not in spec:
        return spec, {}
    head = spec[: spec.index("(")]
    try:
        call = ast.parse(f"f{spec[len(head):]}", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("arguments must be given by keyword")
        kwargs = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise ValueError("**kwargs is not accepted")
            try:
                kwargs[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                raise ValueError(f"{kw.arg}={ast.unparse(kw.value)} is not a Python literal") from None
    except (SyntaxError, ValueError) as e:
        raise ModelLoadError(f"--arch {spec}: expected module:callable(name=literal, ...), e.g. "
                             f"torchvision.models:resnet18(num_classes=10) ({e})") from None
    return head, kwargs


def _import_callable(spec: str):
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise ModelLoadError(f"--arch: expected module:callable (e.g. mypkg.models:build), got {spec!r}")
    if mod.split(".")[0] in ("torchvision", "timm"):
        require(mod.split(".")[0], f"--arch {spec}")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"--arch {spec}: cannot import it ({e})") from None
    if not callable(obj):
        raise ModelLoadError(f"--arch {spec}: expected a callable returning an nn.Module")
    return obj


def _load_hf_directory(path: Path, trust: bool, arch: str | None) -> nn.Module:
    """A ``save_pretrained`` directory, built with the class its ``config.architectures`` names."""
    transformers = require("transformers", f"{path} (a Hugging Face directory)")
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types for a bad config
        raise ModelLoadError(f"{path}/config.json: cannot read it ({_first_line(e)})") from None
    names = list(getattr(cfg, "architectures", None) or [])
    if arch and arch_arguments(arch)[1]:
        raise ModelLoadError(f"--arch {arch}: arguments apply to a state_dict's builder; for a Hugging "
                             "Face directory, --arch names the transformers class and config.json holds the "
                             "settings")
    if arch:
        names = [arch]
    if not names:
        raise ModelLoadError(f"{path}/config.json names no architectures; pass --arch with a transformers "
                             "class name (e.g. BertForSequenceClassification)")
    cls = getattr(transformers, names[0], None)
    if cls is None:
        if not trust:
            raise ModelLoadError(f"{path}: architecture {names[0]} is not a transformers class (the "
                                 "directory brings its own code); pass --trust-model to run that code")
        auto = getattr(cfg, "auto_map", {}) or {}
        cls = (transformers.AutoModelForSequenceClassification if "AutoModelForSequenceClassification" in auto
               else transformers.AutoModel)
    try:
        model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 -- missing/corrupt weights, shape mismatches, ...
        raise ModelLoadError(f"{path}: cannot build {names[0]} from it ({_first_line(e)})") from None
    return model.eval()


def _first_line(e: BaseException) -> str:
    from converters.export import one_line

    return one_line(e)[:200]


def _load_torch_file(path: Path, trust: bool, arch: str | None) -> nn.Module:
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a PyTorch file (torch.save writes a zip archive)")
    with zipfile.ZipFile(path) as z:
        if any(n.endswith("/constants.pkl") or n.startswith("code/") for n in z.namelist()):
            # Masks are parametrizations of nn.Module layers, which a ScriptModule cannot hold, and the ONNX
            # exporter cannot trace one: say what to pass instead rather than fail later with a riddle.
            raise ModelLoadError(f"{path}: a TorchScript archive, which cannot be fine-tuned here; pass the "
                                 "nn.Module saved with torch.save(module) (or a state_dict with --arch)")
    if trust:
        import_torchvision()  # a pickled torchvision/timm model imports torchvision while unpickling
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
                f"{path} uses {m.group(1)}, which is not a torch.nn class; pass --trust-model if you trust "
                "this file (it then runs the file's pickle code, and the class must be importable)") from None
        if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in ("transformers", "timm"):
            require(e.name.split(".")[0], str(path))
        raise ModelLoadError(f"{path}: cannot load it ({_first_line(e)})") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not arch:
            raise ModelLoadError(f"{path}: holds a state_dict, not a module; pass --arch module:callable "
                                 "that builds the model it belongs to")
        target, kwargs = arch_arguments(arch)
        build = _import_callable(target)
        try:
            model = build(**kwargs)
        except Exception as e:  # noqa: BLE001 -- a wrong argument, or the builder's own failure
            raise ModelLoadError(f"--arch {arch}: building the model failed ({_first_line(e)})") from None
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"--arch {arch}: returned {type(model).__name__}, expected an nn.Module")
        try:
            model.load_state_dict(obj)
        except RuntimeError as e:
            raise ModelLoadError(f"{path}: the state_dict does not fit --arch {arch} ("
                                 f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
                                 ")") from None
        return model.eval()
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not an nn.Module (save it with "
                             "torch.save(module))")
    return obj.eval()


#: (what the path is, its test, its loader): the first source whose test accepts the path loads it.
SOURCES: list[tuple[str, Callable[[Path], bool], Callable[[Path, bool, str | None], nn.Module]]] = [
    ("Hugging Face save_pretrained directory", lambda p: p.is_dir() and (p / "config.json").is_file(),
     _load_hf_directory),
    ("torch.save file", lambda p: p.is_file(), _load_torch_file),
]


def load_model(path: str | Path, *, trust: bool = False, arch: str | None = None) -> nn.Module:
    """Load an ``nn.Module`` from ``path``: a ``torch.save(module)`` file (or a state_dict, with ``arch``), or
    a Hugging Face ``save_pretrained`` directory (``arch`` may then name the transformers class).

    Raises:
        ModelLoadError: missing path, not a PyTorch file or model directory, a class the safe loader does not
            allow (the message says to pass --trust-model), a state_dict without ``arch``, or not a model.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    for _, test, loader in SOURCES:
        if test(path):
            return loader(path, trust, arch)
    raise ModelLoadError(f"{path}: a directory without config.json; expected a torch.save file or a Hugging "
                         "Face save_pretrained directory")
