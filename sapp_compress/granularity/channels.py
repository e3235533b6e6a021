"""``--structure channels``: whole attention heads, FFN neurons and conv channels
(:mod:`sapp_compress.structure`), removed from every tensor they touch, so the written ONNX is a smaller dense
graph (with ONNX Runtime's own graph passes and int8 where they measure faster here); with
``--target-speedup`` the widths are measured (:mod:`sapp_compress.speed`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import OutputConfig
from ..engine.units import SkippedLayer
from ..errors import UnsupportedModel, UsageError
from ..io.adapters import unwrap
from ..io.export import EXPORT_ROWS, export_model
from ..io.feeds import calibration_feed, onnx_feed, rows, to_tensors
from ..structure.gates import attach, fold
from ..structure.groups import StructureResult
from ..structure.plan import PARITY_RTOL, plan_families
from ..structure.remove import max_rel_diff, random_keep, remove
from .base import Converted, Finished, Granularity, Plan
from .blocks import PRECHECK_CALIBRATION_ROWS


class Channels(Granularity):
    name = "channels"
    ignored_options = ("block", "balanced", "min_blocks", "indivisible", "conv_layout", "onnx_format")

    def plan(self, student, train, cfg, output) -> Plan:
        """The families :func:`~sapp_compress.structure.plan.plan_families` finds on two rows of ``train`` (a
        family's units feed the selected output by construction); every weight axis left whole is skipped,
        with its reason."""
        example = to_tensors(tuple(x[:2] for x in train.inputs), torch.device("cpu"))
        units, structure = plan_families(student, unwrap(student), example, cfg, inner_of=unwrap)
        skipped = [SkippedLayer(f"{w.tensor}[{w.axis}]", w.reason) for w in structure.whole]
        return Plan(self, units, skipped, structure)

    def attach(self, units, *, attention, powerprop, density):
        return attach(units, attention=attention, powerprop=powerprop, density=density)

    def finish(self, student, plan, masked, eval_shard, keep_folded=False) -> Finished:
        """Fold the families' masks, then remove the pruned units from the model (it gets smaller); the
        smaller model must compute what the masked one did. With ``keep_folded``, a copy of the folded model
        before the removal is kept (a corrective round of ``--target-speedup`` removes more units from it)."""
        keep = fold(masked)
        families = [p.family for p in plan.units]
        folded = copy.deepcopy(student) if keep_folded else None
        inner = unwrap(student)
        sizes = {n: t.numel() for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
        xs = to_tensors(rows(eval_shard, min(8, len(eval_shard))), torch.device("cpu"))
        with torch.no_grad():
            before = student(*xs)
        remove(inner, families, keep)
        with torch.no_grad():
            after = student(*xs)
        d = max_rel_diff(before, after)
        if not d <= PARITY_RTOL:
            raise RuntimeError(f"removing the pruned units changed the model's outputs by {d:.1e} of their "
                               "scale")
        after_sizes = {n: t.numel() for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
        st = StructureResult(families, keep, sizes, after_sizes, d,
                             frozenset(n for n, _ in inner.named_buffers()), folded=folded)
        return Finished(structure=st, masks=list(keep.values()))

    def load_plan(self, path, quantize: str) -> Replay:
        """The choices of the structured run whose report is at ``path`` (:class:`Replay`). Raises
        :class:`UsageError` (exit 2)."""
        return Replay.from_report(path, quantize)

    def precheck(self, dense, plan, shard, out, cfg, replay=None, axes=None) -> dict[str, str]:
        """A random removal at the target counts, exported and run in the job's runtime (and put in int8 with
        ``--quantize int8``), so a smaller model that cannot be exported or run fails before the fine-tune;
        with ``replay``, its families must be this run's."""
        import converters

        if replay is not None:
            replay.check_families(plan.units)
        model = copy.deepcopy(dense)
        families = [p.family for p in plan.units]
        remove(unwrap(model), families,
               random_keep(families, {f.name: f.kept_units(cfg.sparsity) for f in families}))
        proto = export_model(model, shard, axes)
        try:
            converters.run_onnx(proto, onnx_feed(shard, rows(shard, EXPORT_ROWS)))
            if out.quantize == "int8":
                converters.quantize_whole(
                    proto, calibration_inputs=calibration_feed(shard, PRECHECK_CALIBRATION_ROWS))
        except converters.ConverterError as e:
            raise UnsupportedModel(f"cannot convert the smaller model: {e}") from None
        except Exception as e:  # noqa: BLE001 -- the runtime's own errors on the smaller graph
            from converters.export import one_line
            from converters.runtimes import current

            raise UnsupportedModel(f"{current().title} cannot run the smaller model: {one_line(e)}") from None
        return {}

    def export(self, res):
        return (export_model(res.model, res.eval_shard, res.axes),
                export_model(res.dense_model, res.eval_shard, res.axes))

    def convert(self, res, proto, original, out, cfg, feed, calibration, report, replay=None) -> Converted:
        """The smaller model's ONNX (:func:`convert_structured`); with ``--target-speedup``, measured against
        the dense model and corrected once if it misses (:func:`sapp_compress.speed.target.reach_target`)."""
        if replay is not None:
            replay.check_kept(res.structure.keep)
            report["plan"] = {"plan": str(replay.path)}
        onnx_bytes, int8 = convert_structured(res, proto, out, feed, calibration, report, replay)
        if cfg.target_speedup:
            from ..speed.target import reach_target

            onnx_bytes, int8, proto = reach_target(res, original, proto, onnx_bytes, int8, cfg, out, feed,
                                                   calibration, report,
                                                   lambda r, p: convert_structured(r, p, out, feed,
                                                                                   calibration, report))
        return Converted(onnx_bytes, int8, proto.SerializeToString() if int8 else None)


def convert_structured(res, proto, out: OutputConfig, timing_feed: dict, calibration, report: dict,
                       replay: Replay | None = None) -> tuple[bytes, bool]:
    """The smaller model's ONNX: its plain dense export, with the graph passes that measure faster here
    (:mod:`converters.passes`), and with ``--quantize int8`` in the fastest of ONNX Runtime's own int8 forms
    measured here (:func:`converters.quantize_whole`); with ``replay``, the passes and form of the run it
    replays, untimed. Fills the report's ``structure``, ``graph_passes``, ``layers`` and sizes; returns the
    bytes and whether they are int8."""
    import converters
    from converters import passes

    st = res.structure
    report["structure"] = {"families": len(st.families), "parity": st.parity,
                           "parameters": dict(zip(("dense", "pruned"), st.parameters()))}
    cache = converters.TimingCache.open(out.cache)
    chosen = passes.choose(proto, timing_feed, threads=out.threads, cache=cache,
                           replay=None if replay is None else replay.passes)
    report["graph_passes"] = chosen.to_json()
    model, fmt = chosen.model, "dense"
    if out.quantize == "int8":
        whole = converters.quantize_whole(chosen.model, timing_inputs=timing_feed,
                                          calibration_inputs=calibration, threads=out.threads, cache=cache,
                                          form=None if replay is None else replay.int8_form)
        report["int8"] = whole.to_json()
        model, fmt = whole.model, ("dense" if whole.form == "fp32" else f"dense-int8-{whole.form}")
        if whole.form == "fp32":
            report.setdefault("warnings", []).append(f"--quantize int8: the model stays fp32: {whole.reason}")
    onnx_bytes = model.SerializeToString()
    precision = "int8" if fmt != "dense" else "fp32"
    report.update(onnx_bytes=len(onnx_bytes), achieved_sparsity=st.achieved_sparsity,
                  layers=[{**row, "onnx_format": fmt, "precision": precision} for row in st.rows()])
    report["structure"]["onnx_parameters"] = {"pruned": onnx_parameters(proto)}
    report["bytes"] = {"dense_fp32": report["dense_onnx_bytes"], "sparse": len(onnx_bytes)}
    return onnx_bytes, precision == "int8"


def onnx_parameters(proto) -> int:
    """Elements of the graph's float and int8 initializers (what the file stores as weights)."""
    import onnx

    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                                  onnx.TensorProto.UINT8))


@dataclass(frozen=True)
class Replay:
    """``--plan`` for ``--structure channels``: an earlier run's kept units of each family (which the
    fine-tune must reproduce: the same seed, data and options), its graph passes and its int8 form, replayed
    without timing, so the same run on another machine writes the same bytes."""

    path: Path
    kept: dict[str, tuple[int, ...]]
    units: dict[str, int]
    passes: tuple[str, ...]
    int8_form: str | None

    @classmethod
    def from_report(cls, path: Path, quantize: str) -> Replay:
        import json

        try:
            r = json.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"--plan {path}: cannot read it ({e.strerror})") from None
        except ValueError as e:
            raise UsageError(f"--plan {path}: not JSON ({e})") from None
        if not isinstance(r, dict) or not r.get("structure") or not r.get("layers"):
            raise UsageError(f"--plan {path}: expected the report of a --structure channels run, got one "
                             "without its families")
        if r.get("target_speedup"):
            raise UsageError(f"--plan {path}: the report of a --target-speedup run, whose widths come from "
                             "its timings: run it again without --plan")
        form = (r.get("int8") or {}).get("form")
        if (quantize == "int8") != (form is not None):
            was = "int8" if form else "none"
            raise UsageError(f"--plan {path}: written by a run with --quantize {was}, got --quantize "
                             f"{quantize}")
        try:
            kept = {row["name"]: tuple(int(i) for i in row["kept"]) for row in r["layers"]}
            units = {row["name"]: int(row["units"]) for row in r["layers"]}
            applied = tuple((r.get("graph_passes") or {}).get("applied", ()))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--plan {path}: a family row without its kept units ({e})") from None
        return cls(Path(path), kept, units, applied, form)

    def check_families(self, units) -> None:
        """This run's families (names and unit counts) must be the report's."""
        got = {u.family.name: u.family.n_units for u in units}
        if got != self.units:
            diff = sorted(set(got.items()) ^ set(self.units.items()))[:3]
            raise UsageError(f"--plan {self.path}: its families are not this run's (e.g. {diff}): another "
                             "model, --include or --exclude")

    def check_kept(self, keep: dict[str, np.ndarray]) -> None:
        """The fine-tune must have kept the report's units (the same seed, data and options give them)."""
        for name, k in keep.items():
            got = tuple(int(i) for i in np.flatnonzero(k))
            if got != self.kept.get(name):
                raise UsageError(f"--plan {self.path}: the fine-tune kept other units of {name} than the run "
                                 "that wrote it (another seed, shard or option)")


CHANNELS = Channels()

__all__ = ["CHANNELS", "Channels", "Replay", "convert_structured", "onnx_parameters"]
