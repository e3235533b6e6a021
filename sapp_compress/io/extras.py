"""Optional libraries (transformers, timm, torchvision), imported only by the code that needs them.

A missing one is a one-line :class:`~sapp_compress.errors.ModelLoadError` naming the extra to install
(``pip install sapp-compress[hf]`` / ``[vision]``).

torchvision on a CPU-only torch: the torchvision wheels of the package index are built against a CUDA torch,
and with a CPU build of torch their compiled ops fail to load and torchvision's own import fails;
:mod:`sapp_compress.io.torchvision_compat` declares the two missing schemas from an import hook, which
``import sapp_compress`` installs (and so does the start-up file the install puts in site-packages).
:func:`import_torchvision` also recovers a torchvision whose import failed before the hook was installed:
transformers and timm import it too, so they go through :func:`require`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from ..errors import ModelLoadError
from .torchvision_compat import declare_missing_ops, declared, install_import_hook

#: module -> the extra of this package that installs it.
EXTRAS = {"transformers": "hf", "tokenizers": "hf", "safetensors": "hf", "timm": "vision",
          "torchvision": "vision"}


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
    install_import_hook()
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or declared:
            raise
    # torchvision failed before the hook was installed: forget its half-imported modules, declare, retry
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    declare_missing_ops()
    return importlib.import_module("torchvision")
