"""The shard's arrays as the model and ONNX Runtime take them: one dtype rule for both. Floating arrays go in
as float32, integer ones (token ids, categorical features) as int64, which is what the exporter traced
(:func:`to_tensors`) and so what the exported graph's inputs are (:func:`onnx_feed`)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard


def feed_dtype(a: np.ndarray) -> type:
    """The dtype an input array is fed as: ``float32`` for floating arrays, ``int64`` for the rest."""
    return np.float32 if np.issubdtype(np.asarray(a).dtype, np.floating) else np.int64


def to_tensors(arrays: tuple[np.ndarray, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """numpy -> torch in the dtypes of :func:`feed_dtype`, on ``device``."""
    out = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:  # memory-mapped shards are read-only; torch wants to own writable memory
            a = a.copy()
        t = torch.from_numpy(a)
        t = t.float() if feed_dtype(a) is np.float32 else t.long()
        out.append(t.to(device, non_blocking=True))
    return tuple(out)


def rows(shard: Shard, n: int) -> tuple[np.ndarray, ...]:
    """The first ``n`` rows of every input of ``shard``, contiguous."""
    return tuple(np.ascontiguousarray(np.asarray(x[:n])) for x in shard.inputs)


def onnx_feed(shard: Shard, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    """The ONNX inputs for ``arrays`` (one per input of ``shard``), by input name, in :func:`feed_dtype`."""
    return {name: np.asarray(a).astype(feed_dtype(a), copy=False) for name, a in zip(shard.names, arrays)}


def spread(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` row indices spread evenly over ``n`` rows (a shard sorted by class still covers all)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(np.int64))


def onnx_rows(shard: Shard, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``idx`` of ``shard`` as ONNX inputs."""
    return onnx_feed(shard, tuple(np.ascontiguousarray(np.asarray(x)[idx]) for x in shard.inputs))


#: rows of the training shard that calibrate the static activation scales of int8 convs
CALIBRATION_ROWS = 64


def calibration_feed(shard: Shard, n: int | None = None) -> dict[str, np.ndarray]:
    """ONNX inputs of ``n`` (default :data:`CALIBRATION_ROWS`) rows spread evenly over ``shard``: the data the
    static activation scales of int8 convs are calibrated on."""
    return onnx_rows(shard, spread(len(shard), n or CALIBRATION_ROWS))


#: rows a model runs at once when it only predicts: a transformer's activations on 512 rows of 64 tokens took
#: over a GB (BENCHMARKS.md section 21)
PREDICT_ROWS = 64


def predict(model: nn.Module, shard: Shard, device: torch.device,
            batch_size: int = PREDICT_ROWS) -> np.ndarray:
    """Model outputs on a whole shard, in eval mode, as float32 numpy."""
    return predict_arrays(model, tuple(shard.inputs), device, batch_size)


@torch.no_grad()
def predict_arrays(model: nn.Module, arrays: tuple[np.ndarray, ...], device: torch.device,
                   batch_size: int = PREDICT_ROWS) -> np.ndarray:
    """Model outputs on ``arrays`` (one per input, rows first), ``batch_size`` rows at a time, in eval mode,
    as float32 numpy."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(arrays[0]), batch_size):
        xs = to_tensors(tuple(x[i : i + batch_size] for x in arrays), device)
        outs.append(model(*xs).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outs, axis=0)


__all__ = ["CALIBRATION_ROWS", "PREDICT_ROWS", "calibration_feed", "feed_dtype", "onnx_feed", "onnx_rows",
           "predict", "predict_arrays", "rows", "spread", "to_tensors"]
