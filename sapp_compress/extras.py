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

The user's own code gets the same by importing ``sapp_compress`` first: that installs
:class:`TorchvisionOpsFinder`, an import hook that does nothing but, when torchvision's ``_meta_registrations``
is about to be imported (after torchvision tried to load its compiled ops), declare the two schemas if they
are missing. So ``import sapp_compress; import torchvision, timm`` works, and so does unpickling a
``--save-torch`` file of a torchvision model (:func:`sapp_compress.load_pruned`).
"""
from __future__ import annotations

import importlib
import importlib.abc
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


def _declare_missing_ops() -> bool:
    """Declare torchvision's ``nms`` / ``qnms`` schemas (no kernels) unless they exist; True if it declared."""
    import torch

    if _declared or hasattr(torch.ops.torchvision, "nms"):
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        lib.define(schema)
    _declared.append(lib)
    log.info("torchvision's compiled ops do not load with this torch; its models are used without them")
    return True


class TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    """An import hook that finds nothing: on the import of ``torchvision._meta_registrations`` (which registers
    fake kernels for ``torchvision::nms`` and fails when that op does not exist) it first declares the missing
    schemas (:func:`_declare_missing_ops`), then lets the import proceed as usual."""

    TRIGGER = "torchvision._meta_registrations"

    def find_spec(self, name, path=None, target=None):
        if name == self.TRIGGER:
            try:
                _declare_missing_ops()
            except Exception as e:  # noqa: BLE001 -- never break an import the hook only meant to help
                log.debug("could not declare torchvision's ops: %s", e)
        return None


def install_import_hook() -> None:
    """Install :class:`TorchvisionOpsFinder` (once); ``import sapp_compress`` does."""
    if not any(isinstance(f, TorchvisionOpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionOpsFinder())


def import_torchvision() -> ModuleType | None:
    """torchvision, importable even where its compiled ops do not load (see the module docstring); None
    when it is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    install_import_hook()
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _declared:
            raise
    # torchvision failed before the hook was installed: forget its half-imported modules, declare, retry
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _declare_missing_ops()
    return importlib.import_module("torchvision")
