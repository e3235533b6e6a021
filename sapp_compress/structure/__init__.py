"""Structured pruning: whole attention heads, FFN neurons and conv channels, removed from every tensor they
touch.

- :mod:`.trace` runs the model once and follows its channels through every op (no per-family rules);
- :mod:`.groups` turns what it found into units and families, with a reason for every weight axis left whole.
"""
from .groups import GroupFamily, StructurePlan, WholeAxis, discover, select

__all__ = ["GroupFamily", "StructurePlan", "WholeAxis", "discover", "select"]
