"""The whole job, as one function the CLI wraps: load -> data -> prune (fine-tune) -> export -> rewrite ->
verify in ORT -> accuracy gate -> write outputs -> report.

Outputs are atomic: the ONNX file (and ``save_torch``) are written under temporary names in their target
directories and renamed only once every check has passed, so a failed or interrupted run leaves no output
behind. The report, when asked for, is written in every case and says how the run ended.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard, load_shard, shipped_shards

from . import distributed
from .adapters import strip_prefix, unwrap
from .api import PruneResult, check_fits, prune
from .config import PruneConfig, TrainConfig
from .errors import (
    AccuracyGateFailed,
    DataError,
    SappError,
    UnsupportedModel,
    UsageError,
    VerificationFailed,
)
from .geometry import LayerPlan
from .masks import manifest_entry
from .loading import load_model
from .report import block_sparsity, empty_report, int8_sparsity, no_int8_warning, summary, write_json
from .saving import check_picklable, save_pruned
from .training import to_tensors

log = logging.getLogger(__name__)


#: the default top-1 agreement floor of an int8 classifier against the pruned PyTorch model on the evaluation
#: rows. Measured on the repository's int8 tests and models: 0.994 (digits MLP) and 0.997 (digits CNN), 1.0
#: (random-weight efficientnet_b0, DistilBERT, ViT), 0.9 (random-weight resnet18: 1 of 10 rows, near-ties of
#: random logits); 0.8 leaves room for near-ties on small evaluation sets and refuses 10 of 13.
MIN_TOP1_AGREEMENT = 0.8


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how they are checked.

    Attributes:
        onnx_format: ``auto`` or a formulation name (``converters.FORMATS``).
        max_accuracy_drop: the gate, in score units (0.01 = one accuracy point); None: no gate.
        atol / rtol: ORT vs pruned PyTorch tolerance: ``max|diff| <= atol + rtol * max|output|``.
        export_batch_size: the batch size ``auto`` times formulations at (set it to your serving batch). The
            exporter itself always traces :data:`EXPORT_ROWS` rows, with the batch axis dynamic.
        verify_samples: evaluation samples compared between ORT and PyTorch.
        quantize: ``none`` or ``int8`` (the pruned linears' kept blocks in int8: :mod:`converters.int8`).
        int8_rtol: with int8, ORT's int8 model passes verification when ``max|int8 - torch| <= atol +
            int8_rtol * max|torch|`` (see :func:`compress`).
        int8_kernel_rtol: with int8, ORT's integer kernels (graph optimizations on) must match the model's own
            quantize / dequantize reference (optimizations off) to ``atol + int8_kernel_rtol * max|reference|``
            (:func:`converters.verify_kernels`).
        min_top1_agreement: with int8, a classifier's ORT int8 artifact must also agree with the pruned PyTorch
            model's top-1 on at least this share of the evaluation rows (:data:`MIN_TOP1_AGREEMENT`).
        plan: a previous run's report whose per-layer choices are replayed instead of ``auto``'s timing
            (:class:`converters.Plan`; needs ``onnx_format="auto"``).
        cache: ``auto``'s timing cache (:mod:`converters.cache`): ``use`` (read, measure what is missing, write),
            ``refresh`` (measure everything again and overwrite: ``--no-cache``) or ``off``.
    """

    output: Path
    report: Path | None = None
    save_torch: Path | None = None
    onnx_format: str = "auto"
    max_accuracy_drop: float | None = None
    atol: float = 1e-4
    rtol: float = 1e-3
    threads: int | None = None
    export_batch_size: int = 1
    verify_samples: int = 1024  # at least 2: verification also runs at batch 1, and never at the export's 2
    quantize: str = "none"
    int8_rtol: float = 0.2
    int8_kernel_rtol: float = 0.1
    min_top1_agreement: float = MIN_TOP1_AGREEMENT
    plan: Path | None = None
    cache: str = "use"
    accept_missed_target: bool = False

    def __post_init__(self) -> None:
        from converters import FORMATS
        from converters.cache import MODES

        if self.onnx_format not in FORMATS:
            raise UsageError(f"onnx format: expected one of {FORMATS}, got {self.onnx_format!r}")
        if self.plan is not None and self.onnx_format != "auto":
            raise UsageError(f"--plan replays auto's choices: expected --onnx-format auto with it, got "
                             f"{self.onnx_format!r}")
        if self.cache not in MODES:
            raise UsageError(f"cache: expected one of {MODES}, got {self.cache!r}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UsageError(f"max accuracy drop: expected >= 0, got {self.max_accuracy_drop}")
        if self.atol < 0 or self.rtol < 0:
            raise UsageError(f"atol/rtol: expected >= 0, got {self.atol}/{self.rtol}")
        from converters.convert import QUANTIZE

        if self.quantize not in QUANTIZE:
            raise UsageError(f"quantize: expected one of {tuple(QUANTIZE)}, got {self.quantize!r}")
        if not (self.int8_rtol > 0):
            raise UsageError(f"int8 rtol: expected > 0, got {self.int8_rtol}")
        if not (self.int8_kernel_rtol > 0):
            raise UsageError(f"int8 kernel rtol: expected > 0, got {self.int8_kernel_rtol}")
        if not (0 <= self.min_top1_agreement <= 1):
            raise UsageError(f"min top-1 agreement: expected 0..1, got {self.min_top1_agreement}")
        if self.export_batch_size < 1 or self.verify_samples < 3:
            raise UsageError(f"export batch size and verify samples: expected >= 1 and >= 3, got {self.export_batch_size} "
                             f"and {self.verify_samples}")


def exit_code_of(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, SappError):
        return e.exit_code
    from converters import VerificationError

    if isinstance(e, VerificationError):
        return 3
    return 1


def _check_writable(path: Path, what: str) -> None:
    """Fail before hours of fine-tuning, not after: the directory must exist and take a file."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a directory, expected a file path")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot write there ({e.strerror})") from None


@contextlib.contextmanager
def _staged(final: Path):
    """A temporary path next to ``final``; renamed onto it by :func:`_commit`, removed if never committed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def choose_shard(model: nn.Module, data: Path | None) -> Shard:
    """The given shard, or the first shipped shard whose inputs the model accepts."""
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


def _rows(shard: Shard, n: int) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(np.asarray(x[:n])) for x in shard.inputs)


def onnx_feed(shard: Shard, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    """The ONNX inputs for ``arrays``, in the dtypes the exported graph takes (the exporter saw
    :func:`to_tensors`' float32 / int64): token ids of any integer type are fed as int64."""
    feed = {}
    for name, a in zip(shard.names, arrays):
        a = np.asarray(a)
        feed[name] = a.astype(np.float32 if np.issubdtype(a.dtype, np.floating) else np.int64, copy=False)
    return feed


#: rows of the training shard that calibrate the static activation scales of int8 convs
CALIBRATION_ROWS = 64

def calibration_feed(shard: Shard, rows: int | None = None) -> dict[str, np.ndarray]:
    """ONNX inputs of ``rows`` (default :data:`CALIBRATION_ROWS`) rows spread evenly over ``shard``: the data
    the static activation scales of int8 convs are calibrated on (a shard sorted by class still covers all)."""
    n = min(len(shard), rows or CALIBRATION_ROWS)
    pick = np.unique(np.linspace(0, len(shard) - 1, n).astype(np.int64))
    return onnx_feed(shard, tuple(np.ascontiguousarray(np.asarray(x)[pick]) for x in shard.inputs))


#: rows of the example batch the exporter traces: never 1, which torch.export would fix as a constant.
EXPORT_ROWS = 2


def export_model(model: nn.Module, shard: Shard):
    """The dense ONNX export of ``model`` (a :func:`prune` model form) on ``EXPORT_ROWS`` rows of ``shard``,
    its initializers named as the user's parameters. Raises :class:`UnsupportedModel` (exit 2)."""
    import converters

    if len(shard) < EXPORT_ROWS:
        raise DataError(f"{shard.source}: the export needs at least {EXPORT_ROWS} samples, got {len(shard)}")
    xs = to_tensors(_rows(shard, EXPORT_ROWS), torch.device("cpu"))
    try:
        proto = converters.export_onnx(model, xs, input_names=list(shard.names))
    except converters.ConverterError as e:
        raise UnsupportedModel(f"cannot export the model to ONNX: {e}") from None
    strip_prefix(proto)
    return proto


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


def load_plan(path: Path, quantize: str):
    """The plan of the report at ``path`` (:class:`converters.Plan`), checked against ``quantize``. Raises
    :class:`UsageError` (exit 2)."""
    import json

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
        raise UsageError(f"--plan {path}: {len(need)} layer(s) in int8 (e.g. {name}: {fmt}): expected --quantize "
                         f"int8 as the run that wrote it, got --quantize {quantize}")
    return plan


#: rows the pre-check's int8 dry run calibrates on (a dry run: the scales do not matter, the pass must run)
PRECHECK_CALIBRATION_ROWS = 8


def precheck(shard: Shard, timings: dict, quantize: str = "none", sparsity: float = 0.5, plan=None,
             save_torch: bool = False):
    """What :func:`prune` runs before fine-tuning: export the dense model and find every weight to be pruned
    in its graph, through the same code the final export and conversion use, so a model that cannot be
    converted fails in seconds (exit 2), not after the fine-tune; a weight the graph holds only in a computed
    form (or in several different forms) is left dense instead, with the reason (:func:`converters.unplaceable`).
    With ``quantize="int8"`` the int8 rewrites (ONNX Runtime's QDQ pass over the convs included) run once on
    that graph too. With a ``plan`` to replay, its layers, shapes and blocks must be the ones to be pruned (its
    masks are checked after the fine-tune). With ``save_torch`` the model must pickle (:func:`check_picklable`)."""
    import converters

    def check(dense: nn.Module, plans: list[LayerPlan]) -> dict[str, str]:
        t = time.perf_counter()
        if save_torch:
            check_picklable(unwrap(dense))
        if plans and not isinstance(plans[0], LayerPlan):
            _precheck_structure(dense, plans, shard, quantize, sparsity)
            timings["precheck"] = round(time.perf_counter() - t, 3)
            return {}
        model, manifest = dry_run_model(dense, plans)
        proto = export_model(model, shard)
        drop = converters.unplaceable(proto, manifest)
        manifest = [lb for lb in manifest if lb.name not in drop]
        if plan is not None:
            try:
                plan.check(manifest, masks=False)
            except converters.PlanError as e:
                raise UsageError(f"--plan: {e}") from None
        if quantize == "int8" and manifest:
            try:
                converters.convert(proto, manifest, fmt="compact", quantize="int8",
                                   calibration_inputs=calibration_feed(shard, PRECHECK_CALIBRATION_ROWS))
            except converters.ConverterError as e:
                raise UnsupportedModel(f"cannot quantize the model to int8: {e} (--exclude a layer it names to "
                                       "leave it dense and fp32, or --quantize none)") from None
        timings["precheck"] = round(time.perf_counter() - t, 3)
        return {name: f"{why}: left dense" for name, why in drop.items()}

    return check


def _precheck_structure(dense: nn.Module, plans, shard: Shard, quantize: str, sparsity: float) -> None:
    """The structured pre-check: a random removal at the target counts, exported and run in ORT (and put in
    int8 with ``quantize``), so a smaller model that cannot be exported fails before the fine-tune."""
    import converters

    from .structure.remove import random_keep, remove

    model = copy.deepcopy(dense)
    families = [p.family for p in plans]
    remove(unwrap(model), families, random_keep(families, {f.name: f.kept_units(sparsity) for f in families}))
    proto = export_model(model, shard)
    try:
        converters.run_onnx(proto, onnx_feed(shard, _rows(shard, EXPORT_ROWS)))
        if quantize == "int8":
            converters.quantize_whole(proto, calibration_inputs=calibration_feed(shard, PRECHECK_CALIBRATION_ROWS))
    except converters.ConverterError as e:
        raise UnsupportedModel(f"cannot convert the smaller model: {e}") from None
    except Exception as e:  # noqa: BLE001 -- ORT's own errors on the smaller graph
        raise UnsupportedModel(f"ONNX Runtime cannot run the smaller model: {str(e).strip().splitlines()[0]}") from None


def _stage_failed(e, model: str, stage: str, batch_size: int, done: dict) -> None:
    """Raise :class:`VerificationFailed` for verification stage ``stage`` of the ``model`` (precision) artifact,
    with the stages passed before it."""
    failed = e.result.to_json() if e.result is not None else {"passed": False}
    failed.update(batch_size=batch_size, precision=stage, stages=done)
    raise VerificationFailed(f"{model} model: {e}", failed) from None


def _verify_stages(res: PruneResult, shard: Shard, stages: list, out: OutputConfig) -> dict:
    """ORT against the pruned PyTorch model for each (precision, bytes, atol, rtol) of ``stages``, at two batch
    sizes other than the export's (the evaluation rows, and one row). The last stage is the artifact; the
    result is its verification, with the earlier stages under ``stages``. Raises :class:`VerificationFailed`.

    An fp32 artifact passes when ``max|ORT - torch| <= atol + rtol * max|torch|`` (``--atol``/``--rtol``). An
    int8 artifact cannot match fp32 PyTorch to 1e-4: per-tensor uint8 activations and per-row int8 weights
    put a relative error of about 1e-2 on each layer's output (``converters.int8.error_bound``), static
    activation scales (int8 convs) 2.5e-2 on the digits CNN's logits, 7.7-8.4e-2 on efficientnet_b0 (random
    weights). So an int8 artifact passes three checks:

    1. ``fp32``: the same masks in fp32 at the fp32 tolerance (the weights and masks reached the graph intact);
    2. ``int8_kernels``: ORT's integer kernels against the model's own quantize / dequantize reference
       (:func:`converters.verify_kernels`, ``--int8-kernel-rtol``, default 0.1; measured 6e-4 to 1.7e-2 on five
       library models and the digits CNN, 3.9-4.3e-2 on efficientnet_b0 with random weights): the int8
       computation is the one the stored scales define, e.g. no saturating kernel;
    3. the int8 artifact against PyTorch at ``atol + int8_rtol * max|torch|`` (``--int8-rtol``, default 0.2):
       the quantization error stays within bounds; and for a classifier, top-1 agreement with the pruned
       PyTorch model on the evaluation rows at least ``min_top1_agreement`` (``--min-top1-agreement``,
       :data:`MIN_TOP1_AGREEMENT`): a tolerance scaled to the largest logit can pass flipped decisions."""
    import converters

    cpu = torch.device("cpu")
    done = {}
    for precision, data, atol, rtol in stages:
        if precision == "int8":
            vx = _rows(shard, out.verify_samples)
            try:
                k = converters.verify_kernels(data, onnx_feed(shard, vx), atol=atol, rtol=out.int8_kernel_rtol,
                                              threads=out.threads)
            except converters.VerificationError as e:
                _stage_failed(e, "int8", "int8_kernels", len(vx[0]), done)
            done["int8_kernels"] = {**k.to_json(), "batch_sizes": [len(vx[0])], "precision": "int8_kernels"}
        vers = []
        for n in (out.verify_samples, 1):
            vx = _rows(shard, n)
            with torch.no_grad():
                expected = res.model(*to_tensors(vx, cpu)).float().numpy()
            try:
                floor = out.min_top1_agreement if precision == "int8" and n == out.verify_samples else None
                vers.append(converters.verify(data, onnx_feed(shard, vx), [expected], atol=atol, rtol=rtol,
                                              classifier=res.task.is_classifier, threads=out.threads,
                                              min_top1=floor))
            except converters.VerificationError as e:
                _stage_failed(e, precision, precision, len(vx[0]), done)
        ver = vers[0].to_json()
        ver.update(max_abs_diff=max(v.max_abs_diff for v in vers), max_rel_diff=max(v.max_rel_diff for v in vers),
                   batch_sizes=[min(out.verify_samples, len(shard)), 1], export_batch_size=EXPORT_ROWS,
                   precision=precision)
        done[precision] = ver
    final = dict(done[stages[-1][0]])
    final["stages"] = {k: v for k, v in done.items() if k != stages[-1][0]}
    return final


def _store_unplaceable_dense(res: PruneResult, proto, report: dict) -> bool:
    """Pruned layers the exported graph no longer holds as the pre-check found them stay as the exporter stored
    them (dense), with the reason, instead of failing the run after its fine-tune (called when the conversion
    could not place one; True if any was left dense). The exporter stores equal
    initializers once: a layer whose kept blocks are still all zero (SA++ revives a block at zero, and a
    few-step fine-tune may end before it grows) then shares one zero tensor with another such layer, which no
    longer says which layer is which. The graph still computes the pruned model (its values are the pruned
    ones, zeros included); the verification that follows checks it."""
    import converters

    from .geometry import SkippedLayer

    missing = converters.unplaceable(proto, res.layers)
    if not missing:
        return False
    res.layers = [lb for lb in res.layers if lb.name not in missing]
    for name, why in missing.items():
        skip = SkippedLayer(name, f"pruned, but stored dense: after the fine-tune, {why}")
        res.skipped.append(skip)
        report["skipped"].append(skip.to_json())
    report.setdefault("warnings", []).append(
        f"{len(missing)} pruned layer(s) stored dense, the exported graph no longer holding them as a separate "
        f"weight ({', '.join(sorted(missing))}); the model is still the pruned one (see skipped)")
    return True


def _layer_rows(res: PruneResult, conv, sp) -> list[dict]:
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


def _onnx_parameters(proto) -> int:
    """Elements of the graph's float initializers (what the file stores as weights)."""
    import onnx

    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                                  onnx.TensorProto.UINT8))


def _convert_structured(res: PruneResult, proto, out: OutputConfig, timing_feed: dict, calibration, report: dict
                        ) -> tuple[bytes, bool]:
    """The smaller model's ONNX: its plain dense export, with the graph passes that measure faster here
    (:mod:`converters.passes`), and with ``--quantize int8`` in the fastest of ONNX Runtime's own int8 forms
    measured here (:func:`converters.quantize_whole`). Fills the report's ``structure``, ``graph_passes``,
    ``layers`` and sizes; returns the bytes and whether they are int8."""
    import converters

    from converters import passes

    st = res.structure
    report["structure"] = {"families": len(st.families), "parity": st.parity,
                           "parameters": dict(zip(("dense", "pruned"), st.parameters()))}
    cache = converters.TimingCache.open(out.cache)
    chosen = passes.choose(proto, timing_feed, threads=out.threads, cache=cache)
    report["graph_passes"] = chosen.to_json()
    model, fmt = chosen.model, "dense"
    if out.quantize == "int8":
        whole = converters.quantize_whole(chosen.model, timing_inputs=timing_feed, calibration_inputs=calibration,
                                          threads=out.threads, cache=cache)
        report["int8"] = whole.to_json()
        model, fmt = whole.model, ("dense" if whole.form == "fp32" else f"dense-int8-{whole.form}")
        if whole.form == "fp32":
            report.setdefault("warnings", []).append(f"--quantize int8: the model stays fp32: {whole.reason}")
    onnx_bytes = model.SerializeToString()
    precision = "int8" if fmt != "dense" else "fp32"
    report.update(onnx_bytes=len(onnx_bytes), achieved_sparsity=st.achieved_sparsity,
                  layers=[{**row, "onnx_format": fmt, "precision": precision} for row in st.rows()])
    report["structure"]["onnx_parameters"] = {"pruned": _onnx_parameters(proto)}
    report["bytes"] = {"dense_fp32": report["dense_onnx_bytes"], "sparse": len(onnx_bytes)}
    return onnx_bytes, precision == "int8"


#: ``--target-speedup``: a measured speed-up below this share of the target gets one corrective round, then exit 5
TARGET_TOLERANCE = 0.9


def _measure_speedup(original, proto, artifact: bytes, int8: bool, out: OutputConfig, feed: dict,
                     calibration) -> dict:
    """The written model against the dense model (fp32), timed interleaved at the serving batch on this machine
    (through the timing cache); with int8 also against ORT's own fastest int8 of the dense model."""
    import onnx

    import converters
    from converters.latency import model_ms

    cache = converters.TimingCache.open(out.cache)
    graphs = {"dense": original, "pruned": onnx.load_from_string(artifact)}
    ort_form = None
    if int8:
        whole = converters.quantize_whole(original, timing_inputs=feed, calibration_inputs=calibration,
                                          threads=out.threads, cache=cache)
        ort_form = whole.form
        if whole.form != "fp32":
            graphs["ort_int8"] = whole.model
    ms = model_ms(graphs, feed, threads=out.threads, cache=cache, precision="int8" if int8 else "fp32")
    row = {"batch": len(next(iter(feed.values()))), "threads": out.threads, "ms": ms,
           "measured": ms["dense"] / ms["pruned"]}
    if "ort_int8" in ms:
        row.update(vs_ort_int8=ms["ort_int8"] / ms["pruned"], ort_int8_form=ort_form)
    return row


def _reach_target(res: PruneResult, original, proto, onnx_bytes: bytes, int8: bool, cfg: PruneConfig,
                  out: OutputConfig, feed: dict, calibration, report: dict):
    """``--target-speedup``: measure the written model; if it misses the target by more than 10 %, one corrective
    round (re-allocate with the prediction corrected by the measurement, remove the lowest-norm units of the
    families that must shrink from the folded model, export and measure again); then :class:`TargetMissed`
    (exit 5) unless ``--accept-missed-target``. Returns the final (bytes, int8, fp32 proto)."""
    from .errors import TargetMissed
    from .structure.allocate import shrink

    st = res.structure
    widths = {f.name: int(st.keep[f.name].sum()) for f in st.families}
    rows = []
    for attempt in range(2):
        table = st.speed["table"]
        m = _measure_speedup(original, proto, onnx_bytes, int8, out, feed, calibration)
        m.update(widths=widths, predicted=table.speedup(widths), round=attempt)
        rows.append(m)
        if m["measured"] >= TARGET_TOLERANCE * cfg.target_speedup or attempt == 1:
            break
        widths = shrink(res, table, widths, cfg.target_speedup, m["ms"]["dense"], m["ms"]["pruned"])
        report["accuracy"]["pruned_torch"] = res.metrics["pruned_torch"]["score"]
        report["metrics"]["pruned_torch"] = res.metrics["pruned_torch"]
        report["mask_digest"] = res.mask_digest
        proto = export_model(res.model, res.eval_shard)
        onnx_bytes, int8 = _convert_structured(res, proto, out, feed, calibration, report)
    final = rows[-1]
    report["timings"]["latency_table"] = st.speed["table"].seconds
    report["timings"]["allocation"] = round(sum(a["seconds"] for a in st.speed["allocations"]), 3)
    report["target_speedup"] = {"target": cfg.target_speedup, "predicted": final["predicted"],
                                "measured": final["measured"], **({"vs_ort_int8": final["vs_ort_int8"]}
                                                                   if "vs_ort_int8" in final else {}),
                                "batch": final["batch"], "threads": out.threads, "rounds": rows,
                                "allocations": st.speed["allocations"], "table": st.speed["table"].to_json()}
    if final["measured"] < TARGET_TOLERANCE * cfg.target_speedup:
        msg = (f"target not reached: measured {final['measured']:.2f}x against the target {cfg.target_speedup:g}x "
               f"(batch {final['batch']}, after one corrective round)")
        if not out.accept_missed_target:
            raise TargetMissed(msg + "; --accept-missed-target writes the model anyway")
        report.setdefault("warnings", []).append(msg)
    return onnx_bytes, int8, proto


def compress(
    model: nn.Module | str | Path,
    prune_cfg: PruneConfig,
    train_cfg: TrainConfig,
    out: OutputConfig,
    *,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    trust_model: bool = False,
    arch: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run the whole job and return the report (also written to ``out.report`` if set).

    Raises the typed error of the first failure (its ``exit_code`` is in the report too).
    """
    import converters

    report = empty_report()
    report["config"] = {"prune": {**asdict(prune_cfg), "block": str(prune_cfg.block)},
                        "train": asdict(train_cfg), "output": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in asdict(out).items()}}
    timings = report["timings"]
    info = distributed.init_from_env(train_cfg.device)
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[stage] = round(now - t, 3)
        t = now

    try:
        for path, what in ((out.output, "output"), (out.report, "report"), (out.save_torch, "--save-torch")):
            if path is not None:
                _check_writable(Path(path), what)
        if out.plan is not None and prune_cfg.structure != "blocks":
            raise UsageError(f"--plan replays block-sparse formulations: expected --structure blocks with it, got "
                             f"{prune_cfg.structure}")
        plan = load_plan(out.plan, out.quantize) if out.plan is not None else None
        if isinstance(model, (str, Path)):
            model = load_model(model, trust=trust_model, arch=arch)
        lap("load")
        shard = choose_shard(model, Path(data) if data else None)
        ev = load_shard(eval_data) if eval_data else None
        report["data"] = {"train": shard.source, "eval": ev.source if ev else f"held out {train_cfg.eval_fraction:g}",
                          "samples": len(shard)}
        lap("data")
        speed = None
        if prune_cfg.target_speedup:
            from .structure.allocate import SpeedTarget

            speed = SpeedTarget(prune_cfg.target_speedup, out.export_batch_size, out.threads,
                                "int8" if out.quantize == "int8" else "fp32", out.cache)
        res = prune(model, shard, prune_cfg, train_cfg, eval_shard=ev, progress=progress, speed=speed,
                    # on every rank: a rank that skipped it would wait in DDP for one that failed it
                    before_fine_tune=precheck(shard, timings, out.quantize, prune_cfg.sparsity, plan,
                                              out.save_torch is not None))
        lap("fine_tune")
        timings["fine_tune"] = round(timings["fine_tune"] - timings.get("precheck", 0.0), 3)  # timed on its own
        report.update(task=res.task.name, score_name=res.task.score_name, device=res.device,
                      skipped=[s.to_json() for s in res.skipped], mask_digest=res.mask_digest,
                      steps=res.total_steps, history=res.history, output=res.output.to_json(),
                      lr=res.lr_choice.to_json(), warnings=list(res.warnings),
                      inputs=list(res.eval_shard.names))
        report["mask_digests_per_rank"] = distributed.gather_digests(res.mask_digest)
        report["lr"]["digests_per_rank"] = distributed.gather_digests(res.lr_choice.digest())
        report["accuracy"]["dense"] = res.metrics["dense"]["score"]
        report["accuracy"]["pruned_torch"] = res.metrics["pruned_torch"]["score"]
        report["metrics"] = dict(res.metrics)
        if not info.is_main:
            report["exit_code"] = 0
            return report

        ev_shard = res.eval_shard
        dense_proto = export_model(res.model, ev_shard)
        original = dense_proto if res.structure is None else export_model(res.dense_model, ev_shard)
        report["dense_onnx_bytes"] = original.ByteSize()
        lap("export")
        timing_feed = onnx_feed(ev_shard, _rows(ev_shard, out.export_batch_size))
        calibration = None
        if out.quantize == "int8":  # static activation scales of int8 convs
            calibration = calibration_feed(res.train_shard)
            report["calibration"] = {"rows": int(len(next(iter(calibration.values())))),
                                     "source": "training rows (the evaluation rows held out), evenly spaced"}
        if res.structure is not None:
            onnx_bytes, int8 = _convert_structured(res, dense_proto, out, timing_feed, calibration, report)
            if prune_cfg.target_speedup:
                onnx_bytes, int8, dense_proto = _reach_target(res, original, dense_proto, onnx_bytes, int8, prune_cfg,
                                                              out, timing_feed, calibration, report)
        else:
            cache = converters.TimingCache.open(out.cache)
            for attempt in (1, 2):
                try:
                    conv = converters.convert(dense_proto, res.layers, fmt=out.onnx_format,
                                              timing_inputs=timing_feed, threads=out.threads, quantize=out.quantize,
                                              calibration_inputs=calibration, cache=cache, plan=plan)
                    break
                except converters.PlanError as e:
                    raise UsageError(f"--plan {out.plan}: {e}") from None
                except converters.WeightNotFound as e:  # the pre-check placed it: the fine-tune changed how it shows
                    if attempt == 2 or not _store_unplaceable_dense(res, dense_proto, report):
                        raise UnsupportedModel(f"cannot place a pruned weight in the exported graph: {e}; --exclude "
                                               "that layer to leave it dense") from None
            onnx_bytes = conv.model.SerializeToString()
            sp = converters.measure_sparsity(onnx_bytes, res.layers)
            report.update(onnx_bytes=len(onnx_bytes), achieved_sparsity=sp.overall,
                          layers=_layer_rows(res, conv, sp), block_sparsity=block_sparsity(res.layers))
            report["plan"] = {**conv.timing, "plan": str(out.plan) if plan is not None else None,
                              "cache": str(cache.root) if cache is not None else None, "cache_mode": out.cache}
            report["bytes"] = {"dense_fp32": report["dense_onnx_bytes"], "sparse": len(onnx_bytes)}
            int8 = any(row["precision"] == "int8" for row in report["layers"])
        lap("convert")

        stages = []
        if int8:
            # the same masks in fp32 (compact: no timing) checked at the fp32 tolerance first: it proves the
            # weights and masks reached the graph intact, which the int8 tolerance alone could not
            fp32 = (converters.convert(dense_proto, res.layers, fmt="compact").model if res.structure is None
                    else dense_proto).SerializeToString()
            report["bytes"]["sparse_fp32"] = len(fp32)
            stages.append(("fp32", fp32, out.atol, out.rtol))
            if res.structure is None:
                int8_sparsity(report, sp, converters.measure_sparsity(fp32, res.layers))
        elif out.quantize == "int8" and res.structure is None:  # the structured path says so itself
            report["warnings"].append(no_int8_warning(report["layers"]))
        stages.append(("int8" if int8 else "fp32", onnx_bytes, out.atol, out.int8_rtol if int8 else out.rtol))
        report["verification"] = _verify_stages(res, ev_shard, stages, out)
        lap("verify")

        onnx_out = converters.run_onnx(onnx_bytes, onnx_feed(ev_shard, tuple(ev_shard.inputs)), threads=out.threads)[0]
        onnx_metrics = res.task.metrics(onnx_out, res.eval_shard.y, res.dense_eval_outputs)
        report["metrics"]["onnx"] = onnx_metrics
        report["accuracy"]["onnx"] = onnx_metrics["score"]
        lap("evaluate")
        drop = report["accuracy"]["dense"] - report["accuracy"]["onnx"]
        report["accuracy"]["drop"] = drop
        if out.max_accuracy_drop is not None and drop > out.max_accuracy_drop + 1e-12:
            raise AccuracyGateFailed(
                f"accuracy gate failed: {res.task.score_name} dense {report['accuracy']['dense']:.4f} -> onnx "
                f"{report['accuracy']['onnx']:.4f}, a drop of {drop:.4f} > the allowed {out.max_accuracy_drop:g}")

        with contextlib.ExitStack() as stack:
            staged_onnx = stack.enter_context(_staged(Path(out.output)))
            staged_onnx.write_bytes(onnx_bytes)
            staged_pt = None
            if out.save_torch is not None:
                staged_pt = stack.enter_context(_staged(Path(out.save_torch)))
                save_pruned(unwrap(res.model), staged_pt)
            os.replace(staged_onnx, out.output)
            if staged_pt is not None:
                os.replace(staged_pt, out.save_torch)
        lap("write")
        report["exit_code"] = 0
        return report
    except BaseException as e:
        if isinstance(e, VerificationFailed) and e.result is not None:
            report["verification"] = e.result
        report["exit_code"] = exit_code_of(e)
        report["error"] = "interrupted (SIGINT)" if isinstance(e, KeyboardInterrupt) else (
            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise
    finally:
        if out.report is not None and info.is_main:
            with contextlib.suppress(OSError):
                write_json(out.report, report)
        # Ranks > 0 finish after fine-tuning; tearing the group down while rank 0 still works on it can
        # abort the process ("terminate called without an active exception"), so all ranks leave together.
        with contextlib.suppress(Exception):
            distributed.barrier()
        distributed.shutdown()


__all__ = ["OutputConfig", "compress", "exit_code_of", "summary"]
