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
    """The shard at ``data``, or the first shipped shard whose inputs the model accepts. A model that names
    its main input (a Hugging Face model's ``main_input_name``: ``input_ids``, ``pixel_values``) only takes a
    shard with an input of that name: the shipped tabular shards would otherwise be fed to it by position
    (a BERT ran on CTR's columns in PyTorch and failed only at the export)."""
    if data is not None:
        return load_shard(data)
    main = getattr(model, "main_input_name", None)
    for name, path in shipped_shards().items():
        shard = load_shard(path)
        if isinstance(main, str) and main not in shard.names:
            continue
        try:
            check_fits(model, shard)
        except DataError:
            continue
        log.info("no --data given: using the shipped shard %s", name)
        return shard
    how = ("make one from text with this model's tokenizer: sapp-compress-shard MODEL_DIR TEXT_FILE -o "
           "train.npz, then " if main == "input_ids" else "")
    raise DataError(f"no shipped shard fits this model's inputs; {how}pass --data TRAIN.npz (see README, "
                    "Data)")


__all__ = ["choose_shard"]
