"""A conversion's plan: the per-layer choices that decide the ONNX bytes, written to the report and replayed.

``convert`` records, per pruned layer, a :class:`LayerChoice`: the formulation (``onnx_format``; for the int8
linears it names the activation scales too: ``...-int8`` dynamic, ``...-int8-static`` static), the int8
weight bits (8, or 7 on a CPU without VNNI: the one machine-dependent choice besides the timings), the
reason (it goes into the model's metadata, so it is part of the bytes), and what identifies the layer it was
made for (weight shape, block, layout and a digest of the kept blocks: :func:`converters.cache.mask_digest`).
The choices of ``auto``'s whole-model stage (every layer blocked, int8 convs off, fallbacks to dense runtime)
are per-layer formats and reasons too, so the plan holds them.

``convert(..., plan=plan)`` replays a plan: no timing, the same formats, reasons and weight bits, hence the
same bytes for the same model and masks, on this machine or another. A plan that does not fit the layers
(other names, shapes, blocks or kept blocks) raises :class:`PlanMismatch`, saying what differs.

JSON form (one object per layer, in the report's ``layers[i]["plan"]``)::

    {"name": "fc1.weight", "onnx_format": "blocked-int8", "reason": null, "weight_bits": 8,
     "activation": "dynamic", "shape": [256, 64], "block": [8, 8], "layout": "linear",
     "mask_digest": "3f0c9a51d2e4b8a7"}
"""
from __future__ import annotations

from dataclasses import dataclass

from .cache import mask_digest
from .errors import ConverterError
from .manifest import LayerBlocks


class PlanError(ConverterError):
    """A plan that cannot be read (not a report, a layer without its plan, a bad field): bad input, exit 2."""

    exit_code = 2


class PlanMismatch(PlanError):
    """A plan written for other layers or masks than the ones being converted: exit 2."""


@dataclass(frozen=True)
class LayerChoice:
    """One layer's entry of a plan (module docstring)."""

    name: str
    onnx_format: str
    reason: str | None
    weight_bits: int | None
    activation: str | None
    shape: tuple[int, ...]
    block: tuple[int, int]
    layout: str
    mask_digest: str

    @classmethod
    def of(cls, lb: LayerBlocks, fmt: str, reason: str | None, int8: dict | None) -> "LayerChoice":
        return cls(lb.name, fmt, reason, (int8 or {}).get("weight_bits"), (int8 or {}).get("activation"),
                   tuple(lb.weight_shape), tuple(lb.block), lb.layout, mask_digest(lb))

    def to_json(self) -> dict:
        return {"name": self.name, "onnx_format": self.onnx_format, "reason": self.reason,
                "weight_bits": self.weight_bits, "activation": self.activation, "shape": list(self.shape),
                "block": list(self.block), "layout": self.layout, "mask_digest": self.mask_digest}

    @classmethod
    def from_json(cls, d) -> "LayerChoice":
        if not isinstance(d, dict):
            raise PlanError(f"a layer's plan: expected an object, got {type(d).__name__}")
        try:
            bits = d.get("weight_bits")
            if bits not in (None, 7, 8):
                raise ValueError(f"weight_bits: expected 7, 8 or null, got {bits!r}")
            return cls(str(d["name"]), str(d["onnx_format"]), d.get("reason"), bits, d.get("activation"),
                       tuple(int(v) for v in d["shape"]), (int(d["block"][0]), int(d["block"][1])),
                       str(d["layout"]), str(d["mask_digest"]))
        except KeyError as e:
            raise PlanError(f"layer {d.get('name', '?')!r}: its plan has no {e.args[0]!r}") from None
        except (TypeError, ValueError, IndexError) as e:
            raise PlanError(f"layer {d.get('name', '?')!r}: bad plan field ({e})") from None


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@dataclass(frozen=True)
class Plan:
    """Every pruned layer's :class:`LayerChoice`, in the manifest's order."""

    layers: tuple[LayerChoice, ...]

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self.layers]

    @classmethod
    def from_json(cls, entries) -> "Plan":
        if not isinstance(entries, list):
            raise PlanError(f"a plan: expected a list of layers, got {type(entries).__name__}")
        return cls(tuple(LayerChoice.from_json(e) for e in entries))

    @classmethod
    def from_report(cls, report) -> "Plan":
        """The plan of a run's JSON report (its ``layers``, each with its ``plan``)."""
        if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
            raise PlanError("expected a sapp-compress report (a JSON object with a list of layers)")
        if not report["layers"]:
            raise PlanError("the report lists no converted layer (the run ended before its conversion)")
        if report.get("structure"):
            raise PlanError("the report is of a structured run (--structure channels): it has no "
                            "block-sparse formulations to replay")
        missing = [str(r.get("name", "?")) for r in report["layers"]
                   if not isinstance(r, dict) or "plan" not in r]
        if missing:
            raise PlanError(f"layers without a plan: {_few(missing)} (a report of an older version, before "
                            "plans)")
        return cls.from_json([r["plan"] for r in report["layers"]])

    def __getitem__(self, name: str) -> LayerChoice:
        return next(c for c in self.layers if c.name == name)

    @property
    def formats(self) -> dict[str, str]:
        return {c.name: c.onnx_format for c in self.layers}

    def check(self, layers: list[LayerBlocks], *, masks: bool = True) -> None:
        """Raise :class:`PlanMismatch` unless the plan was made for ``layers``: the same names, weight shapes,
        blocks and layouts, and (``masks``) the same kept blocks."""
        have = {c.name: c for c in self.layers}
        names = [lb.name for lb in layers]
        missing = [n for n in names if n not in have]
        extra = [n for n in have if n not in set(names)]
        if missing or extra:
            raise PlanMismatch(
                f"the plan is for other layers: this model prunes {len(names)}, the plan has {len(have)}"
                + (f"; not in the plan: {_few(missing)}" if missing else "")
                + (f"; in the plan but not pruned here: {_few(extra)}" if extra else ""))
        for lb in layers:
            c = have[lb.name]
            for what, planned, here in (("weight shape", list(c.shape), list(lb.weight_shape)),
                                        ("block", "x".join(map(str, c.block)), "x".join(map(str, lb.block))),
                                        ("layout", c.layout, lb.layout)):
                if planned != here:
                    raise PlanMismatch(f"{lb.name}: {what}: the plan has {planned}, this model {here}")
            if masks and mask_digest(lb) != c.mask_digest:
                raise PlanMismatch(f"{lb.name}: kept blocks: the plan has mask digest {c.mask_digest}, this "
                                   f"model {mask_digest(lb)} (the plan was written for other masks: another "
                                   "seed, sparsity, method or data)")
