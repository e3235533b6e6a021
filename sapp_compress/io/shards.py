"""Which shard a run trains on: the one given, or the first shipped shard whose inputs the model accepts."""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from calib_data.shards import Shard, load_shard, shipped_shards

from ..errors import DataError
from .adapters import check_fits

log = logging.getLogger(__name__)


def choose_shard(model: nn.Module, data: Path | None) -> Shard:
    """The shard at ``data``, or the first shipped shard whose inputs the model accepts."""
    if data is not None:
        return load_shard(data)
    for name, path in shipped_shards().items():
        shard = load_shard(path)
        try:
            check_fits(model, shard)
        except DataError:
            continue
        log.info("no --data given: using the shipped shard %s", name)
        return shard
    raise DataError("no shipped shard fits this model's inputs; pass --data TRAIN.npz (see README, Data)")


__all__ = ["choose_shard"]
