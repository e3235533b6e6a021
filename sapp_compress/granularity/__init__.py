"""The granularity of a prune (``--structure``), decided here once: :func:`resolve` looks the option up in
:data:`GRANULARITIES`, and every stage after it calls the entry's interface (:class:`~.base.Granularity`:
plan, attach, finish, load_plan, precheck, export, convert) without asking which entry it holds."""
from .base import Converted, Finished, Granularity, Plan
from .blocks import BLOCKS
from .channels import CHANNELS

#: ``--structure`` value -> its entry
GRANULARITIES: dict[str, Granularity] = {g.name: g for g in (BLOCKS, CHANNELS)}


def resolve(structure: str) -> Granularity:
    """The entry of ``structure`` (a :data:`GRANULARITIES` key; :class:`~sapp_compress.config.PruneConfig` has
    validated it)."""
    return GRANULARITIES[structure]


__all__ = ["BLOCKS", "CHANNELS", "GRANULARITIES", "Converted", "Finished", "Granularity", "Plan", "resolve"]
