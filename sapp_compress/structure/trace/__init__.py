"""The channel tracer: :mod:`.core` runs the model once under a ``TorchFunctionMode`` and follows every
channel label through every op; :mod:`.rules` (elementwise, shape, reductions) and :mod:`.layers`
(contractions, norms, convs, attention) hold one rule per op (or family of ops), registered in
:data:`~.core.RULES` when this package is imported."""
from . import layers, rules  # noqa: F401 -- register the op rules
from .core import NONE, RULES, ChannelGraph, Nodes, OpRecord, named_tensors, trace

__all__ = ["ChannelGraph", "NONE", "Nodes", "OpRecord", "RULES", "named_tensors", "trace"]
