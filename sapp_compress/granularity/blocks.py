"""``--structure blocks``: blocks of each pruned layer's weight (:mod:`sapp_compress.blocks`), stored in the
ONNX graph as only the kept blocks, in the formulation each layer runs fastest in (:mod:`converters`)."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard

from ..blocks.geometry import LayerPlan, plan_layers
from ..blocks.masks import attach, fold, manifest_entry
from ..config import PruneConfig
from ..engine.units import SkippedLayer
from ..errors import GeometryError, UnsupportedModel, UsageError
from ..io.adapters import OutputInfo, unwrap
from ..io.export import EXPORT_ROWS, export_model
from ..io.feeds import calibration_feed, onnx_feed, rows, to_tensors
from ..report import block_sparsity, int8_sparsity, no_int8_warning
from .base import Converted, Finished, Granularity, Plan

log = logging.getLogger(__name__)

#: rows the pre-check's int8 dry run calibrates on (a dry run: the scales do not matter, the pass must run)
PRECHECK_CALIBRATION_ROWS = 8


class Blocks(Granularity):
    name = "blocks"

    def plan(self, student: nn.Module, train: Shard, cfg: PruneConfig, output: OutputInfo) -> Plan:
        """:func:`~sapp_compress.blocks.geometry.plan_layers`, less the weights the selected output does not
        depend on (:func:`unused_by_output`)."""
        units, skipped = plan_layers(unwrap(student), cfg)
        plan = Plan(self, units, skipped)
        self.require(plan, cfg)
        drop = unused_by_output(student, units, train, output)
        return plan.leave_dense({s.name: s.reason for s in drop}, cfg)

    def require(self, plan: Plan, cfg: PruneConfig) -> None:
        if not plan.units:
            reasons = ("; ".join(f"{s.name}: {s.reason}" for s in plan.skipped)
                       or "the model has no Linear or Conv layer")
            raise GeometryError(f"no layer can be pruned at block {cfg.block}: {reasons}")

    def attach(self, units, *, attention, powerprop, density):
        return attach(units, attention=attention, powerprop=powerprop, density=density)

    def finish(self, student, plan, masked, eval_shard, keep_folded=False) -> Finished:
        layers = fold(masked)
        return Finished(layers=layers, masks=[lb.kept for lb in layers])

    def load_plan(self, path: Path, quantize: str):
        """The plan of the report at ``path`` (:class:`converters.Plan`), checked against ``quantize``. Raises
        :class:`UsageError` (exit 2)."""
        import converters
        from converters.convert import QUANTIZE

        try:
            plan = converters.Plan.from_report(json.loads(Path(path).read_text()))
        except OSError as e:
            raise UsageError(f"--plan {path}: cannot read it ({e.strerror})") from None
        except ValueError as e:
            raise UsageError(f"--plan {path}: not JSON ({e})") from None
        except converters.PlanError as e:
            raise UsageError(f"--plan {path}: {e}") from None
        need = {c.name: c.onnx_format for c in plan.layers
                if converters.FORMULATIONS.get(c.onnx_format) is not None
                and converters.FORMULATIONS[c.onnx_format].precision not in QUANTIZE[quantize]}
        if need:
            name, fmt = next(iter(need.items()))
            raise UsageError(f"--plan {path}: {len(need)} layer(s) in int8 (e.g. {name}: {fmt}): expected "
                             f"--quantize int8 as the run that wrote it, got --quantize {quantize}")
        return plan

    def precheck(self, dense, plan, shard, out, cfg, replay=None, axes=None) -> dict[str, str]:
        """Export the dense model and find every weight to be pruned in its graph, through the same code the
        final export and conversion use; a weight the graph holds only in a computed form (or in several
        different forms) is left dense instead, with the reason (:func:`converters.unplaceable`). With int8
        the int8 rewrites (ONNX Runtime's QDQ pass over the convs included) run once on that graph too. With a
        ``replay`` plan, its layers, shapes and blocks must be the ones to be pruned (its masks are checked
        after the fine-tune). The dense graph runs in the job's runtime first (an op it cannot run is named
        here, not after the fine-tune)."""
        import converters

        model, manifest = dry_run_model(dense, list(plan.units))
        proto = export_model(model, shard, axes)
        run_in_runtime(proto, shard)
        drop = converters.unplaceable(proto, manifest)
        manifest = [lb for lb in manifest if lb.name not in drop]
        if replay is not None:
            try:
                replay.check(manifest, masks=False)
            except converters.PlanError as e:
                raise UsageError(f"--plan: {e}") from None
        if out.quantize == "int8" and manifest:
            try:
                converters.convert(proto, manifest, fmt="compact", quantize="int8",
                                   calibration_inputs=calibration_feed(shard, PRECHECK_CALIBRATION_ROWS))
            except converters.ConverterError as e:
                raise UnsupportedModel(f"cannot quantize the model to int8: {e} (--exclude a layer it names "
                                       "to leave it dense and fp32, or --quantize none)") from None
        return {name: f"{why}: left dense" for name, why in drop.items()}

    def export(self, res):
        """The pruned model's export, which is also the dense original's size (the same shapes, every
        block)."""
        proto = export_model(res.model, res.eval_shard, res.axes)
        return proto, proto

    def convert(self, res, proto, original, out, cfg, feed, calibration, report, replay=None) -> Converted:
        """Each pruned layer in the formulation ``--onnx-format`` names (``auto``: timed here, through the
        timing cache, or replayed from ``replay``); the report's ``layers``, ``achieved_sparsity`` (measured
        from the written weights), ``plan`` and ``bytes``. With int8 layers, the same masks in fp32 too
        (``compact``)."""
        import converters

        cache = converters.TimingCache.open(out.cache)
        for attempt in (1, 2):
            try:
                conv = converters.convert(proto, res.layers, fmt=out.onnx_format, timing_inputs=feed,
                                          threads=out.threads, quantize=out.quantize,
                                          calibration_inputs=calibration, cache=cache, plan=replay)
                break
            except converters.PlanError as e:
                raise UsageError(f"--plan {out.plan}: {e}") from None
            except converters.WeightNotFound as e:
                # the pre-check placed it: the fine-tune changed how it shows
                if attempt == 2 or not _store_unplaceable_dense(res, proto, report):
                    raise UnsupportedModel(f"cannot place a pruned weight in the exported graph: {e}; "
                                           "--exclude that layer to leave it dense") from None
        onnx_bytes = conv.model.SerializeToString()
        sp = converters.measure_sparsity(onnx_bytes, res.layers)
        report.update(onnx_bytes=len(onnx_bytes), achieved_sparsity=sp.overall,
                      layers=_layer_rows(res, conv, sp), block_sparsity=block_sparsity(res.layers))
        report["plan"] = {**conv.timing, "plan": str(out.plan) if replay is not None else None,
                          "cache": str(cache.root) if cache is not None else None, "cache_mode": out.cache}
        report["bytes"] = {"dense_fp32": report["dense_onnx_bytes"], "sparse": len(onnx_bytes)}
        int8 = any(row["precision"] == "int8" for row in report["layers"])
        if not int8:
            if out.quantize == "int8":
                report["warnings"].append(no_int8_warning(report["layers"]))
            return Converted(onnx_bytes, False)
        # the same masks in fp32 (compact: no timing), which the verification checks at the fp32 tolerance
        # first
        fp32 = converters.convert(proto, res.layers, fmt="compact").model.SerializeToString()
        int8_sparsity(report, sp, converters.measure_sparsity(fp32, res.layers))
        return Converted(onnx_bytes, True, fp32)


def unused_by_output(model: nn.Module, plans: list[LayerPlan], shard: Shard, output: OutputInfo
                     ) -> list[SkippedLayer]:
    """The planned weights that the selected output does not depend on (no autograd path from them to it, on
    two samples of ``shard``): e.g. ``BertModel``'s pooler when the output is ``last_hidden_state``. Pruning
    them would change nothing the model is scored or exported on, and the exported graph, which computes only
    that output, does not hold them. Best effort: a model whose backward fails here is left as planned."""
    from converters.export import one_line

    inner = unwrap(model)
    weights = [inner.get_parameter(p.name) for p in plans]
    flags = [w.requires_grad for w in weights]
    xs = to_tensors(tuple(x[:2] for x in shard.inputs), torch.device("cpu"))
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = model(*xs)
            grads = torch.autograd.grad(out.float().sum(), weights, allow_unused=True)
    except Exception as e:  # noqa: BLE001 -- only a shortcut: the pre-check still finds what the graph lacks
        log.info("could not trace which weights the output uses (%s)", one_line(e))
        return []
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    return [SkippedLayer(p.name, f"the selected output {output.key!r} does not depend on it (the exported "
                                 "graph computes only that output, without this weight): left dense")
            for p, g in zip(plans, grads) if g is None]


def run_in_runtime(proto, shard) -> None:
    """Run ``proto`` on a few rows of ``shard`` in the job's runtime; :class:`UnsupportedModel` (exit 2)
    naming the runtime and what it could not run."""
    import converters
    from converters.export import one_line
    from converters.runtimes import current

    try:
        converters.run_onnx(proto, onnx_feed(shard, rows(shard, EXPORT_ROWS)))
    except Exception as e:  # noqa: BLE001 -- the runtime's own errors
        raise UnsupportedModel(f"{current().title} {current().version()} cannot run the model: "
                               f"{one_line(e)}") from None


def dry_run_model(dense: nn.Module, plans: list[LayerPlan], seed: int = 0) -> tuple[nn.Module, list]:
    """A copy of ``dense`` whose planned weights hold fresh random values, and its manifest (all blocks kept).

    Fresh values make every weight unique, as fine-tuned weights are: layers cloned from one another (an
    ``nn.TransformerEncoder`` deep-copies its first layer) start identical, and locating them by value would
    then be ambiguous before the fine-tune although it is not after it."""
    model = copy.deepcopy(dense)
    inner = unwrap(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for p in plans:
            w = inner.get_parameter(p.name)
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype) * 0.02)
            out.append(manifest_entry(p, w, np.ones(p.view.grid, dtype=bool)))
    return model, out


def _store_unplaceable_dense(res, proto, report: dict) -> bool:
    """Pruned layers the exported graph no longer holds as the pre-check found them stay as the exporter
    stored them (dense), with the reason, instead of failing the run after its fine-tune (called when the
    conversion could not place one; True if any was left dense). The exporter stores equal initializers once:
    a layer whose kept blocks are still all zero (SA++ revives a block at zero, and a few-step fine-tune may
    end before it grows) then shares one zero tensor with another such layer, which no longer says which layer
    is which. The graph still computes the pruned model (its values are the pruned ones, zeros included); the
    verification that follows checks it."""
    import converters

    missing = converters.unplaceable(proto, res.layers)
    if not missing:
        return False
    res.layers = [lb for lb in res.layers if lb.name not in missing]
    for name, why in missing.items():
        skip = SkippedLayer(name, f"pruned, but stored dense: after the fine-tune, {why}")
        res.skipped.append(skip)
        report["skipped"].append(skip.to_json())
    report.setdefault("warnings", []).append(
        f"{len(missing)} pruned layer(s) stored dense, the exported graph no longer holding them as a "
        f"separate weight ({', '.join(sorted(missing))}); the model is still the pruned one (see skipped)")
    return True


def _layer_rows(res, conv, sp) -> list[dict]:
    from converters import FORMULATIONS

    outcomes = {o.name: o for o in conv.layers}
    plans = {c.name: c.to_json() for c in conv.plan.layers}
    rows = []
    for lb in res.layers:
        o = outcomes[lb.name]
        rows.append({
            "name": lb.name, "shape": list(lb.weight_shape), "block": f"{lb.block[0]}x{lb.block[1]}",
            "layout": lb.layout, "blocks": lb.n_blocks, "kept_blocks": lb.n_kept,
            "block_sparsity": lb.block_sparsity, "sparsity": sp.per_layer[lb.name], "balanced": lb.balanced,
            "onnx_format": o.fmt, "precision": FORMULATIONS[o.fmt].precision, "reason": o.reason,
            "latencies_ms": o.latencies_ms, "stored_bytes": o.stored_bytes, "dense_bytes": o.dense_bytes,
            **({"int8": o.int8} if getattr(o, "int8", None) else {}), "plan": plans[lb.name],
        })
    return rows


BLOCKS = Blocks()

__all__ = ["BLOCKS", "Blocks", "dry_run_model", "unused_by_output"]
