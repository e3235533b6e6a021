"""The dense ONNX export of a model form the tool holds (the user's model, or its :class:`~.adapters.ModelIO`
wrapper), on rows of a shard, with the initializers named as the user's parameters."""
from __future__ import annotations

import numpy as np
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
    import converters

    if len(shard) < EXPORT_ROWS:
        raise DataError(f"{shard.source}: the export needs at least {EXPORT_ROWS} samples, got {len(shard)}")
    try:
        proto = export_feed(model, dict(zip(shard.names, rows(shard, EXPORT_ROWS))))
    except converters.ConverterError as e:
        raise UnsupportedModel(f"cannot export the model to ONNX: {e}") from None
    strip_prefix(proto)
    return proto


def export_feed(model: nn.Module, feed: dict[str, np.ndarray]):
    """The ONNX export of ``model`` on the example rows ``feed`` (input name -> array, at least
    :data:`EXPORT_ROWS` rows), in the dtypes of :func:`~.feeds.to_tensors`. Raises
    :class:`converters.ConverterError`."""
    import torch

    import converters

    return converters.export_onnx(model, to_tensors(tuple(feed.values()), torch.device("cpu")),
                                  input_names=list(feed))


__all__ = ["EXPORT_ROWS", "export_feed", "export_model"]
