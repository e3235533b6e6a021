"""The dense ONNX export of a model form the tool holds (the user's model, or its :class:`~.adapters.ModelIO`
wrapper), on rows of a shard, with the initializers named as the user's parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from calib_data.shards import Shard

from ..errors import DataError, UnsupportedModel
from .adapters import strip_prefix
from .feeds import rows, to_tensors

#: rows of the example batch the exporter traces: never 1, which torch.export would fix as a constant.
EXPORT_ROWS = 2


def export_model(model: nn.Module, shard: Shard, axes: Axes | None = None):
    """The dense ONNX export of ``model`` on :data:`EXPORT_ROWS` rows of ``shard``, its initializers named as
    the user's parameters, with the input axes of ``axes`` dynamic (default: :func:`probe_axes`). When the
    exporter cannot keep them dynamic, the export is made with the batch axes alone and ``axes`` says which
    stayed fixed and why. Raises :class:`UnsupportedModel` (exit 2)."""
    import converters
    from converters.export import one_line

    if len(shard) < EXPORT_ROWS:
        raise DataError(f"{shard.source}: the export needs at least {EXPORT_ROWS} samples, got {len(shard)}")
    axes = axes if axes is not None else probe_axes(model, shard)
    feed = dict(zip(shard.names, rows(shard, EXPORT_ROWS)))
    try:
        proto = export_feed(model, feed, axes.dynamic)
    except converters.ConverterError as e:
        batch = [(0,) for _ in axes.dynamic]
        if axes.dynamic == batch:
            raise UnsupportedModel(f"cannot export the model to ONNX: {e}") from None
        try:
            proto = export_feed(model, feed, batch)
        except converters.ConverterError:
            raise UnsupportedModel(f"cannot export the model to ONNX: {e}") from None
        for name, dyn in zip(axes.names, axes.dynamic):
            for a in dyn[1:]:
                axes.fixed[f"{name} axis {a}"] = f"the exporter cannot keep it dynamic ({one_line(e)})"
        axes.dynamic = batch
    strip_prefix(proto)
    return proto


def export_feed(model: nn.Module, feed: dict[str, np.ndarray], dynamic: list[tuple[int, ...]] | None = None):
    """The ONNX export of ``model`` on the example rows ``feed`` (input name -> array, at least
    :data:`EXPORT_ROWS` rows), in the dtypes of :func:`~.feeds.to_tensors`; ``dynamic``: the axes kept dynamic
    per input (default: :func:`converters.export.dynamic_axes_for`). Raises
    :class:`converters.ConverterError`."""
    import torch

    import converters

    return converters.export_onnx(model, to_tensors(tuple(feed.values()), torch.device("cpu")),
                                  input_names=list(feed), dynamic_axes=dynamic)


@dataclass
class Axes:
    """Which axes of each input the exported graph keeps dynamic: ``dynamic[i]`` for input ``i`` (its batch
    axis always), and ``fixed``: ``"name axis a"`` -> why it stays at the shard's size (the model fails at
    another size, or the exporter could not keep it dynamic). :func:`export_model` moves an axis from
    ``dynamic`` to ``fixed`` when the export with it fails and without it succeeds."""

    names: tuple[str, ...]
    dynamic: list[tuple[int, ...]]
    fixed: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"dynamic": {n: list(d) for n, d in zip(self.names, self.dynamic)}, "fixed": dict(self.fixed)}


#: inputs of more axes than this (images: ``[N, C, H, W]``) keep every non-batch axis at the shard's size:
#: with height and width dynamic, a CNN's export took three times as long (BENCHMARKS.md section 21)
MAX_PROBED_RANK = 3
IMAGE_AXES = "an image's axes stay at the shard's size (resize the images to it)"


def probe_axes(model: nn.Module, shard: Shard) -> Axes:
    """The input axes ``model`` accepts at another size: every non-batch axis of size > 1 of an input of up
    to :data:`MAX_PROBED_RANK` axes (token ids, a mask, audio, a sequence of feature vectors) is tried one
    shorter on :data:`EXPORT_ROWS` rows of ``shard`` (axes of the same size across the inputs together: a
    token input and its attention mask), and one that runs is dynamic. An axis of size 1 stays as it is (the
    exporter specialises it), and so do an image's axes, with the reason (BENCHMARKS.md section 21)."""
    import torch

    xs = rows(shard, EXPORT_ROWS)
    groups: dict[int, list[tuple[int, int]]] = {}
    dynamic = [{0} for _ in xs]
    fixed = {}
    for i, x in enumerate(xs):
        if x.ndim > MAX_PROBED_RANK:
            for a in range(1, x.ndim):
                fixed[f"{shard.names[i]} axis {a}"] = IMAGE_AXES
            continue
        for a in range(1, x.ndim):
            if x.shape[a] > 1:
                groups.setdefault(x.shape[a], []).append((i, a))

    def runs(axes: list[tuple[int, int]]) -> str | None:
        cut = list(xs)
        for i, a in axes:
            cut[i] = np.take(cut[i], np.arange(cut[i].shape[a] - 1), axis=a)
        try:
            with torch.no_grad():
                model(*to_tensors(tuple(cut), torch.device("cpu")))
        except Exception as e:  # noqa: BLE001 -- any failure means: not at another size
            from converters.export import one_line

            return one_line(e)
        return None

    for size, axes in groups.items():
        if runs(axes) is None:
            ok = set(axes)
        else:  # the same size by chance (a square image is not): each alone
            ok = {ax for ax in axes if len(axes) > 1 and runs([ax]) is None}
        for i, a in axes:
            if (i, a) in ok:
                dynamic[i].add(a)
            else:
                why = f"the model does not run with it at {size - 1} instead of {size}"
                fixed[f"{shard.names[i]} axis {a}"] = why
    return Axes(tuple(shard.names), [tuple(sorted(d)) for d in dynamic], fixed)



__all__ = ["EXPORT_ROWS", "Axes", "export_feed", "export_model", "probe_axes"]
