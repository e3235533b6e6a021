"""sapp-compress: SequentialAttention++ block pruning for PyTorch, exported to block-sparse ONNX.

The Python API (the CLI is a thin layer over it):

- :func:`prune` -- fine-tune a copy of a model with block pruning; returns it folded, with the block
  manifest (``sapp_compress.pruning``).
- :class:`PruneConfig`, :class:`TrainConfig`, :class:`BlockSpec` -- frozen, validated configs.
- :data:`METHODS` -- the pruning-method registry (sapp, acdc, magnitude, gmp, powerprop).
- :func:`load_pruned` -- read back a ``--save-torch`` file (``sapp_compress.io.saving``).

Importing the package also installs an import hook that lets torchvision (and timm, transformers) import
where the installed torchvision's compiled ops do not load with this torch
(``sapp_compress.io.torchvision_compat``; the install also runs that hook at every interpreter start).
"""
from ._version import __version__  # noqa: E402
from .config import BlockSpec, PruneConfig, TrainConfig  # noqa: E402
from .io.extras import install_import_hook  # noqa: E402

install_import_hook()

__all__ = ["__version__", "BlockSpec", "PruneConfig", "TrainConfig", "prune", "METHODS", "PruneResult",
           "load_pruned"]


def __getattr__(name):  # lazy: keep `import sapp_compress` light for the CLI's --help
    if name in ("prune", "PruneResult"):
        from . import pruning as module

        return getattr(module, name)
    if name == "load_pruned":
        from .io.saving import load_pruned

        return load_pruned
    if name == "METHODS":
        from .engine.methods import METHODS

        return METHODS
    raise AttributeError(name)
