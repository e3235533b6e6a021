"""The whole job, as one function the CLI wraps: load -> data -> prepare (plan) -> pre-check -> fine-tune ->
export -> convert -> verify in ORT -> accuracy gate -> write outputs -> report. Each stage lives in its
package; this module only calls them in order. What depends on ``--structure`` is the granularity's
(:mod:`sapp_compress.granularity`), resolved once here.

Outputs are atomic (:mod:`sapp_compress.io.outputs`): the ONNX file (and ``save_torch``) are written under
temporary names in their target directories and renamed only once every check has passed, so a failed or
interrupted run leaves no output behind. The report, when asked for, is written in every case and says how the
run ended.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from calib_data.shards import load_shard
from converters import runtimes

from .config import OutputConfig, PruneConfig, TrainConfig
from .engine import distributed
from .errors import RuntimeUnavailable, VerificationFailed, exit_code_of
from .granularity import resolve
from .io.adapters import unwrap
from .io.feeds import calibration_feed, onnx_feed, rows
from .io.loading import load_model
from .io.outputs import check_writable, staged, write_json
from .io.saving import check_picklable, save_pruned
from .io.shards import choose_shard
from .pruning import PruneResult, prepare, run
from .report import empty_report, summary
from .verify.gate import evaluate, gate
from .verify.stages import verify_stages


def compress(
    model,
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

    ``model``: an ``nn.Module``, or a path :func:`~sapp_compress.io.loading.load_model` reads. Raises the
    typed error of the first failure (its ``exit_code`` is in the report too).
    """
    report = empty_report()
    report["config"] = {"prune": {**asdict(prune_cfg), "block": str(prune_cfg.block)},
                        "train": asdict(train_cfg), "output": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in asdict(out).items()}}
    timings = report["timings"]
    report["peak_memory_mb"] = {}  # the peak so far at the end of each stage: where the memory went
    info = distributed.init_from_env(train_cfg.device)
    t = time.perf_counter()
    say = progress if progress is not None and info.is_main else (lambda ev: None)

    def lap(stage: str, then: str | None = None) -> None:
        """Time ``stage`` (ended now), and the process's peak memory by its end; ``then`` names the stage
        starting (a progress event)."""
        nonlocal t
        now = time.perf_counter()
        timings[stage] = round(now - t, 3)
        report["peak_memory_mb"][stage] = _peak_rss_mb()
        t = now
        if then:
            say({"event": "phase", "phase": then})

    in_runtime = contextlib.ExitStack()
    try:
        say({"event": "phase", "phase": "load"})
        runtime = _runtime(out, report)
        in_runtime.enter_context(runtimes.use(runtime))
        for path, what in ((out.output, "output"), (out.report, "report"), (out.save_torch, "--save-torch")):
            if path is not None:
                check_writable(Path(path), what)
        if str(out.output).endswith(".xml"):
            check_writable(Path(out.output).with_suffix(".bin"), "output's weights")
        granularity = resolve(prune_cfg.structure)
        replay = granularity.load_plan(out.plan, out.quantize) if out.plan is not None else None
        if isinstance(model, (str, Path)):
            model = load_model(model, trust=trust_model, arch=arch)
        lap("load", "data")
        shard = choose_shard(model, Path(data) if data else None)
        ev = load_shard(eval_data) if eval_data else None
        report["data"] = {"train": shard.source,
                          "eval": ev.source if ev else f"held out {train_cfg.eval_fraction:g}",
                          "samples": len(shard)}
        lap("data", "plan")
        job = prepare(model, shard, prune_cfg, train_cfg, eval_shard=ev)
        report["peak_memory_mb"]["plan"] = _peak_rss_mb()
        # on every rank: a rank that skipped it would wait in DDP for one that failed it
        say({"event": "phase", "phase": "pre-check"})
        job.plan = _precheck(job, shard, out, prune_cfg, replay, timings)
        report["peak_memory_mb"]["precheck"] = _peak_rss_mb()
        res = run(job, progress=progress, speed=_speed(prune_cfg, out))
        lap("fine_tune", "export")
        # timed on its own
        timings["fine_tune"] = round(timings["fine_tune"] - timings.get("precheck", 0.0), 3)
        _record_fine_tune(res, report)
        if not info.is_main:
            report["exit_code"] = 0
            return report

        ev_shard = res.eval_shard
        proto, original = granularity.export(res)
        report["dense_onnx_bytes"] = original.ByteSize()
        report["input_axes"] = res.axes.to_json()
        report["warnings"] += [f"the ONNX model takes {name} only at the shard's size: {why}"
                               for name, why in res.axes.fixed.items() if why.startswith("the exporter")]
        lap("export", "convert")
        timing_feed = onnx_feed(ev_shard, rows(ev_shard, out.export_batch_size))
        calibration = None
        if out.quantize == "int8":  # static activation scales of int8 convs
            calibration = calibration_feed(res.train_shard)
            report["calibration"] = {"rows": int(len(next(iter(calibration.values())))),
                                     "source": "training rows (the evaluation rows held out), evenly spaced"}
        conv = granularity.convert(res, proto, original, out, prune_cfg, timing_feed, calibration, report,
                                   replay)
        if out.quantize == "int8":
            report["runtime"]["speedup"] = _speedup(original, conv, out, timing_feed, calibration, report)
        lap("convert", "verify")

        stages = []
        if conv.int8:
            # the same masks in fp32 at the fp32 tolerance first: the weights reached the graph intact
            report["bytes"]["sparse_fp32"] = len(conv.fp32)
            stages.append(("fp32", conv.fp32, out.atol, out.rtol))
        stages.append(("int8" if conv.int8 else "fp32", conv.onnx_bytes, out.atol,
                       out.int8_rtol if conv.int8 else out.rtol))
        report["verification"] = verify_stages(res, ev_shard, stages, out)
        lap("verify", "evaluate")
        evaluate(res, conv.onnx_bytes, out, report)
        lap("evaluate")
        gate(res, out, report)
        _write(res, conv.onnx_bytes, out)
        lap("write")
        report["exit_code"] = 0
        return report
    except BaseException as e:
        from converters.export import one_line

        if isinstance(e, VerificationFailed) and e.result is not None:
            report["verification"] = e.result
        report["exit_code"] = exit_code_of(e)
        report["error"] = "interrupted (SIGINT)" if isinstance(e, KeyboardInterrupt) else one_line(e)
        raise
    finally:
        in_runtime.close()
        if out.report is not None and info.is_main:
            with contextlib.suppress(OSError):
                write_json(out.report, report)
        # Ranks > 0 finish after fine-tuning; tearing the group down while rank 0 still works on it can
        # abort the process ("terminate called without an active exception"), so all ranks leave together.
        with contextlib.suppress(Exception):
            distributed.barrier()
        distributed.shutdown()


def _runtime(out: OutputConfig, report: dict):
    """The runtime the job measures and verifies in, checked installed (exit 2 in seconds otherwise); its
    name, version and precision go in the report's ``runtime``."""
    rt = runtimes.get(out.runtime)
    try:
        rt.require()
    except runtimes.RuntimeMissing as e:
        raise RuntimeUnavailable(str(e)) from None
    report["runtime"] = rt.describe()
    if rt.name != "ort":  # onnxruntime's version is always there
        report["versions"].update({rt.name: report["runtime"]["version"]},
                                  **{k: report["runtime"][k] for k in ("nncf",) if k in report["runtime"]})
    return rt


def _speedup(original, conv, out: OutputConfig, feed: dict, calibration, report: dict) -> dict:
    """With ``--quantize int8``: the artifact (int8, or fp32 where no int8 form was faster) against the dense
    model and against the runtime's own fastest int8 of it, at the serving batch, paired
    (``--target-speedup`` measured it already: its last round)."""
    if report.get("target_speedup"):
        return report["target_speedup"]["rounds"][-1]
    from .speed.target import measure_speedup

    return measure_speedup(original, None, conv.onnx_bytes, conv.int8, out, feed, calibration, peer_int8=True)


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KB elsewhere


def _speed(prune_cfg: PruneConfig, out: OutputConfig):
    """Where ``--target-speedup`` is measured: the serving batch and threads, in the output's precision."""
    if not prune_cfg.target_speedup:
        return None
    from .speed.table import SpeedTarget

    return SpeedTarget(prune_cfg.target_speedup, out.export_batch_size, out.threads,
                       "int8" if out.quantize == "int8" else "fp32", out.cache)


def _precheck(job, shard, out: OutputConfig, prune_cfg: PruneConfig, replay, timings: dict):
    """What would otherwise fail only after the fine-tune, found before it (exit 2 in seconds):
    ``--save-torch``'s pickling, and the granularity's own pre-check (export, weight location, int8,
    ``--plan``); the plan without the units it leaves dense."""
    t = time.perf_counter()
    if out.save_torch is not None:
        check_picklable(unwrap(job.dense))
    drop = job.plan.granularity.precheck(job.dense, job.plan, shard, out, prune_cfg, replay, job.axes)
    timings["precheck"] = round(time.perf_counter() - t, 3)
    return job.plan.leave_dense(drop, prune_cfg)


def _record_fine_tune(res: PruneResult, report: dict) -> None:
    report.update(task=res.task.name, score_name=res.task.score_name, device=res.device,
                  skipped=[s.to_json() for s in res.skipped], mask_digest=res.mask_digest,
                  steps=res.total_steps, history=res.history, output=res.output.to_json(),
                  lr=res.lr_choice.to_json(), warnings=list(res.warnings),
                  inputs=list(res.eval_shard.names))
    report["mask_digests_per_rank"] = distributed.gather_digests(res.mask_digest)
    report["lr"]["digests_per_rank"] = distributed.gather_digests(res.lr_choice.digest())
    report["micro_batch"] = res.micro_batch
    report["accuracy"]["dense"] = res.metrics["dense"]["score"]
    report["accuracy"]["pruned_torch"] = res.metrics["pruned_torch"]["score"]
    report["metrics"] = dict(res.metrics)


def _write(res: PruneResult, onnx_bytes: bytes, out: OutputConfig) -> None:
    """The ONNX file (or OpenVINO IR: ``.xml`` and its ``.bin``) and ``--save-torch``, each staged beside its
    target and renamed onto it."""
    if str(out.output).endswith(".xml"):
        return _write_ir(res, onnx_bytes, out)
    with contextlib.ExitStack() as stack:
        staged_onnx = stack.enter_context(staged(Path(out.output)))
        staged_onnx.write_bytes(onnx_bytes)
        staged_pt = None
        if out.save_torch is not None:
            staged_pt = stack.enter_context(staged(Path(out.save_torch)))
            save_pruned(unwrap(res.model), staged_pt)
        os.replace(staged_onnx, out.output)
        if staged_pt is not None:
            os.replace(staged_pt, out.save_torch)


def _write_ir(res: PruneResult, onnx_bytes: bytes, out: OutputConfig) -> None:
    """OpenVINO IR of the verified ONNX, written into a temporary directory beside the target, then both
    files renamed onto theirs."""
    import shutil
    import tempfile

    from converters.runtimes.openvino import save_ir

    xml = Path(out.output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", dir=xml.parent))
    try:
        with contextlib.ExitStack() as stack:
            staged_pt = None
            if out.save_torch is not None:
                staged_pt = stack.enter_context(staged(Path(out.save_torch)))
                save_pruned(unwrap(res.model), staged_pt)
            written = save_ir(onnx_bytes, tmp / xml.name)
            for f in written:
                os.replace(f, xml.parent / f.name)
            if staged_pt is not None:
                os.replace(staged_pt, out.save_torch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["OutputConfig", "compress", "exit_code_of", "summary"]
