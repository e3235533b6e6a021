"""The dense ONNX export of a model form the tool holds (the user's model, or its :class:`~.adapters.ModelIO`
wrapper), on rows of a shard, with the initializers named as the user's parameters."""
from __future__ import annotations

from torch import nn

from calib_data.shards import Shard

from ..errors import DataError, UnsupportedModel
from .adapters import strip_prefix
from .feeds import rows, to_tensors

#: rows of the example batch the exporter traces: never 1, which torch.export would fix as a constant.
EXPORT_ROWS = 2


def export_model(model: nn.Module, shard: Shard):
    """The dense ONNX export of ``model`` on :data:`EXPORT_ROWS` rows of ``shard`` (batch axis dynamic), its
    initializers named as the user's parameters. Raises :class:`UnsupportedModel` (exit 2)."""
    import torch

    import converters

    if len(shard) < EXPORT_ROWS:
        raise DataError(f"{shard.source}: the export needs at least {EXPORT_ROWS} samples, got {len(shard)}")
    xs = to_tensors(rows(shard, EXPORT_ROWS), torch.device("cpu"))
    try:
        proto = converters.export_onnx(model, xs, input_names=list(shard.names))
    except converters.ConverterError as e:
        raise UnsupportedModel(f"cannot export the model to ONNX: {e}") from None
    strip_prefix(proto)
    return proto


__all__ = ["EXPORT_ROWS", "export_model"]
