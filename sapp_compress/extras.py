"""Optional libraries (transformers, timm, torchvision), imported only by the code that needs them.

A missing one is a one-line :class:`~sapp_compress.errors.ModelLoadError` naming the extra to install
(``pip install sapp-compress[hf]`` / ``[vision]``).

torchvision on a CPU-only torch: the torchvision wheels of the package index are built against a CUDA torch,
and with a CPU build of torch their compiled ops (``torchvision::nms`` ...) fail to load; torchvision's import
then fails because it registers fake kernels for ``nms``/``qnms``, which no longer exist. The models need none
of those ops (only detection does), so :func:`import_torchvision` declares the two schemas (no kernels) and
imports torchvision again (transformers and timm import it too, so they go through :func:`require`): every
classification model builds and runs; calling ``torchvision.ops.nms`` still
fails, loudly. With a matching torchvision build nothing is declared.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType

from .errors import ModelLoadError

log = logging.getLogger(__name__)

#: module -> the extra of this package that installs it.
EXTRAS = {"transformers": "hf", "tokenizers": "hf", "safetensors": "hf", "timm": "vision", "torchvision": "vision"}
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_declared = []  # the torch.library.Library that holds the declared schemas must stay alive


def require(module: str, why: str) -> ModuleType:
    """Import ``module`` (an optional dependency) or fail with one line naming the extra to install."""
    if module.split(".")[0] in ("torchvision", "timm", "transformers"):
        import_torchvision()  # transformers and timm import torchvision when it is installed
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0], "hf")
        raise ModelLoadError(f"{why} needs {module.split('.')[0]} ({e.msg}): pip install "
                             f"'sapp-compress[{extra}]'") from None


def import_torchvision() -> ModuleType | None:
    """torchvision, importable even where its compiled ops do not load (see the module docstring); None
    when it is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _declared:
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        lib.define(schema)
    _declared.append(lib)
    log.info("torchvision's compiled ops do not load with this torch; its models are used without them")
    return importlib.import_module("torchvision")
