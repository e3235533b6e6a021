"""The granularity interface: what is removed (a layer's blocks, or whole heads, neurons and channels),
decided once from ``--structure`` (:func:`sapp_compress.granularity.resolve`). Every stage that depends on it
calls the entry it was handed (or the one a :class:`Plan` carries) and never asks which one it is:

=================  ==========================================================================================
``plan``           the units to prune and the weights left dense, with reasons (before any fine-tuning)
``attach``         the masks on the planned units (:class:`~sapp_compress.engine.units.Masked`, one per layer
                   or family), for the engine's methods
``finish``         after the fine-tune: fold the masks into plain weights (blocks: the block manifest;
                   channels: the pruned units physically removed)
``load_plan``      ``--plan``: an earlier run's report to replay
``precheck``       what can fail after the fine-tune, run before it on a dry run (export, weight location,
                   int8)
``export``         the ONNX of the pruned model and of the dense original
``convert``        the written artifact: the pruned layers' formulations (blocks) or the smaller dense graph
                   (channels), in fp32 or int8; fills the report's ``layers`` and sizes
=================  ==========================================================================================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from calib_data.shards import Shard

from ..config import OutputConfig, PruneConfig
from ..engine.units import Masked, SkippedLayer
from ..io.adapters import OutputInfo


@dataclass(frozen=True)
class Plan:
    """What the engine prunes: ``units`` (one :class:`~sapp_compress.blocks.geometry.LayerPlan` per pruned
    weight, or one :class:`~sapp_compress.structure.gates.FamilyPlan` per family), the weights (or weight
    axes) left ``skipped``, and the ``granularity`` that planned them. ``structure``: with channels, what
    discovery found (:class:`~sapp_compress.structure.groups.StructurePlan`: the latency table's ops); None
    with blocks."""

    granularity: Granularity
    units: tuple = ()
    skipped: tuple[SkippedLayer, ...] = ()
    structure: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "skipped", tuple(self.skipped))

    def attach(self, *, attention: bool, powerprop: bool, density: float) -> list[Masked]:
        """Register the masks (and SA++'s logits, Powerpropagation) on the planned units; one :class:`Masked`
        per unit group, in plan order."""
        return self.granularity.attach(list(self.units), attention=attention, powerprop=powerprop,
                                       density=density)

    def rebind(self, units) -> Plan:
        """This plan over ``units`` (the same units bound to a copy of the model)."""
        return dataclasses.replace(self, units=tuple(units))

    def leave_dense(self, drop: dict[str, str], cfg: PruneConfig) -> Plan:
        """This plan without the units named in ``drop`` (``{name: reason}``), which join ``skipped``; raises
        (via the granularity's ``require``) when nothing is left to prune."""
        if not drop:
            return self
        plan = dataclasses.replace(self, units=tuple(u for u in self.units if u.name not in drop),
                                   skipped=self.skipped + tuple(SkippedLayer(n, r) for n, r in drop.items()))
        self.granularity.require(plan, cfg)
        return plan


@dataclass
class Finished:
    """A fine-tuned model's masks folded: ``layers`` (the block manifest, one entry per pruned weight; empty
    with channels), ``structure`` (with channels: :class:`~sapp_compress.structure.groups.StructureResult`,
    each family's kept units) and ``masks`` (the final 0/1 masks in plan order, for the digest)."""

    layers: list = field(default_factory=list)
    structure: Any = None
    masks: list[np.ndarray] = field(default_factory=list)


@dataclass
class Converted:
    """The written artifact: its bytes, whether it holds int8, and with int8 the same masks in fp32 (``fp32``:
    what the verification checks at the fp32 tolerance first)."""

    onnx_bytes: bytes
    int8: bool
    fp32: bytes | None = None


class Granularity:
    """One entry per ``--structure`` value (see the module docstring for the operations)."""

    name: ClassVar[str]
    #: command-line options that do not apply to this granularity (a warning says so when given)
    ignored_options: ClassVar[tuple[str, ...]] = ()

    def __deepcopy__(self, memo):  # stateless: copies of a plan share the entry
        return self

    def plan(self, student: nn.Module, train: Shard, cfg: PruneConfig, output: OutputInfo) -> Plan:
        raise NotImplementedError

    def require(self, plan: Plan, cfg: PruneConfig) -> None:
        """Raise :class:`~sapp_compress.errors.GeometryError` when ``plan`` has nothing to prune."""

    def attach(self, units: list, *, attention: bool, powerprop: bool, density: float) -> list[Masked]:
        raise NotImplementedError

    def finish(self, student: nn.Module, plan: Plan, masked: list[Masked], eval_shard: Shard,
               keep_folded: bool = False) -> Finished:
        raise NotImplementedError

    def load_plan(self, path: Path, quantize: str):
        raise NotImplementedError

    def precheck(self, dense: nn.Module, plan: Plan, shard: Shard, out: OutputConfig, cfg: PruneConfig,
                 replay=None, axes=None) -> dict[str, str]:
        """``{name: reason}`` for planned units to leave dense; raises on what would fail after the
        fine-tune."""
        raise NotImplementedError

    def export(self, res) -> tuple:
        """(the pruned model's dense ONNX export, the dense original's) for a
        :class:`~sapp_compress.pruning.PruneResult`."""
        raise NotImplementedError

    def convert(self, res, proto, original, out: OutputConfig, cfg: PruneConfig, feed: dict, calibration,
                report: dict, replay=None) -> Converted:
        raise NotImplementedError


__all__ = ["Converted", "Finished", "Granularity", "Plan"]
