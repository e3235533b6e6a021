"""torchvision beside a torch it was not built for: declare its two missing operator schemas when its import
needs them.

The torchvision wheels of the package index are built against a CUDA torch; with a CPU build of torch their
compiled ops (``torchvision::nms`` ...) fail to load, and torchvision's own import then fails, because its
``_meta_registrations`` registers fake kernels for ``nms`` / ``qnms``, which do not exist ("operator
torchvision::nms does not exist"). The models need none of those ops (only detection does), so
:class:`TorchvisionOpsFinder`, an import hook that finds nothing, declares the two schemas (no kernels) just
before ``torchvision._meta_registrations`` is imported, when they are missing: every classification model
builds and runs, calling ``torchvision.ops.nms`` still fails loudly, and with a matching torchvision build
nothing is declared.

This module imports only the standard library (torch only when torchvision's import reaches the hook, when
torch is already imported), because it also runs at interpreter start: installing sapp-compress puts
``sapp_compress_torchvision.pth`` in site-packages (``setup.py``), whose one line loads this *file* (not the
package, which imports torch) and calls :func:`install_import_hook`, so a user's own ``import torchvision``,
``import timm`` or ``torch.load`` of a torchvision model works in that environment without ``import
sapp_compress`` first. ``SAPP_COMPRESS_NO_TORCHVISION_HOOK=1`` turns the start-up hook off; importing
``sapp_compress`` installs the hook in any case (:mod:`sapp_compress.io.extras`).
"""
from __future__ import annotations

import sys

#: the module whose import registers fake kernels for the two ops and fails without them
TRIGGER = "torchvision._meta_registrations"
SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
#: the torch.library.Library holding the declared schemas (it must stay alive); empty until one is declared
declared: list = []


def declare_missing_ops() -> bool:
    """Declare torchvision's ``nms`` / ``qnms`` schemas (no kernels) unless they exist; True if it
    declared."""
    import torch

    if declared or hasattr(torch.ops.torchvision, "nms"):
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in SCHEMAS:
        lib.define(schema)
    declared.append(lib)
    import logging

    logging.getLogger("sapp_compress.io.torchvision_compat").info(
        "torchvision's compiled ops do not load with this torch; its models are used without them")
    return True


class TorchvisionOpsFinder:
    """A meta path finder (an import hook) that finds nothing: on the import of :data:`TRIGGER` it first
    declares the missing schemas (:func:`declare_missing_ops`), then lets the import proceed as usual. Not an
    ``importlib.abc.MetaPathFinder`` subclass: that import would run at every interpreter start in the
    environment, and ``find_spec`` is all the protocol needs."""

    def find_spec(self, name, path=None, target=None):
        if name == TRIGGER:
            try:
                declare_missing_ops()
            except Exception:  # noqa: BLE001 -- never break an import the hook only meant to help
                pass
        return None


def install_import_hook() -> None:
    """Put a :class:`TorchvisionOpsFinder` first on ``sys.meta_path``, unless one is there (the start-up
    hook's copy of this module counts: it is loaded from the same file under another name)."""
    if not any(type(f).__name__ == TorchvisionOpsFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionOpsFinder())
