"""``--target-speedup`` around the fine-tune: the latency table measured before it (an unreachable target is
exit 2, found in seconds), the loss the allocation weighs widths by, and after it the written model measured
against the dense one (:func:`reach_target`: one corrective round, then exit 5 or a warning)."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib_data.shards import Shard

from ..config import OutputConfig, PruneConfig
from ..errors import GeometryError, TargetMissed
from ..io.adapters import unwrap
from ..io.export import export_model
from ..io.feeds import onnx_rows, spread, to_tensors
from .allocate import shrink
from .table import SpeedTarget, WholeTimer, build_table


def default_speed(cfg: PruneConfig) -> SpeedTarget:
    """The target of ``cfg`` measured at batch 1, in fp32 (the Python API's default)."""
    return SpeedTarget(cfg.target_speedup)


#: rows of the training shard the latency-aware allocation measures each family's loss growth on
SENSITIVITY_ROWS = 64


def latency_table(student: nn.Module, splan, train: Shard, cfg: PruneConfig, speed):
    """The latency table of ``--target-speedup`` (before any fine-tuning) and the whole-model timer the
    allocations are measured with; an unreachable target is exit 2."""
    t0 = time.perf_counter()
    speed = speed or default_speed(cfg)
    n = len(train)
    feed = onnx_rows(train, np.arange(speed.batch) % n)
    calibration = onnx_rows(train, spread(n, 32))
    timer = WholeTimer(student, splan, onnx_rows(train, np.arange(2)), feed, speed, calibration,
                       inner_of=unwrap)
    table = build_table(student, splan, timer.export_rows, feed, speed, calibration, inner_of=unwrap,
                        timer=timer)
    table.seconds = round(time.perf_counter() - t0, 3)
    best = table.best_speedup()
    if best < cfg.target_speedup:
        raise GeometryError(f"--target-speedup {cfg.target_speedup:g} cannot be reached here: the most this "
                            "model reaches on this machine (every head, neuron and channel family at its "
                            f"smallest width, batch {speed.batch}, {speed.precision}) is {best:.2f}x by the "
                            "timings of this run or the timing cache (a busy machine can say less: "
                            "--no-cache measures again)")
    return table, timer


def divergence(task, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """How far outputs ``out`` are from the dense model's ``ref``: KL divergence of the class distributions
    for a classifier, binary cross-entropy against the dense model's probabilities for a binary one, else the
    mean squared difference."""
    out, ref = out.float(), ref.float()
    if task.is_classifier:
        n = out.shape[-1]
        return F.kl_div(F.log_softmax(out.reshape(-1, n), -1), F.log_softmax(ref.reshape(-1, n), -1),
                        reduction="batchmean", log_target=True)
    if task.name == "binary":
        return F.binary_cross_entropy_with_logits(out.reshape(-1), torch.sigmoid(ref.reshape(-1)))
    return F.mse_loss(out.reshape(ref.shape), ref)


def loss_on_rows(student: nn.Module, task, train: Shard, device):
    """``loss_of()``: how far ``student``'s outputs on fixed rows of the training shard are from the dense
    model's (``student`` as it is now, before any pruning; :func:`divergence`), without gradients. Against the
    dense outputs rather than the labels: a trained model fits its training rows, so the labels' loss barely
    moves (and its growth, clamped at zero, ties) where the outputs already change."""
    idx = spread(len(train), SENSITIVITY_ROWS)
    xs = to_tensors(tuple(np.asarray(x[idx]) for x in train.inputs), device)

    def outputs() -> torch.Tensor:
        was = student.training
        student.eval()
        with torch.no_grad():
            out = student(*xs).float()
        student.train(was)
        return out

    ref = outputs()

    def loss_of() -> float:
        return float(divergence(task, outputs(), ref))

    return loss_of


#: ``--target-speedup``: a measured speed-up below this share of the target gets one corrective round, then
#: exit 5
TARGET_TOLERANCE = 0.9


def measure_speedup(original, proto, artifact: bytes, int8: bool, out: OutputConfig, feed: dict,
                    calibration, peer_int8: bool | None = None) -> dict:
    """The written model against the dense model (fp32), timed interleaved at the serving batch on this
    machine in the job's runtime (through the timing cache); with int8 also against that runtime's own
    fastest int8 of the dense model (``vs_dense_int8``, its form ``dense_int8_form``; in ONNX Runtime also
    under the older names ``vs_ort_int8`` / ``ort_int8_form``). ``measured`` is the paired speed-up (the
    median over rounds of each round's ratio). ``peer_int8`` (default: ``int8``): measure against the dense
    model's int8 even where the artifact stayed fp32."""
    import onnx

    import converters
    from converters.latency import model_timing
    from converters.runtimes import current

    cache = converters.TimingCache.open(out.cache)
    graphs = {"dense": original, "pruned": onnx.load_from_string(artifact)}
    form = None
    peer_int8 = int8 if peer_int8 is None else peer_int8
    if peer_int8:
        whole = converters.quantize_whole(original, timing_inputs=feed, calibration_inputs=calibration,
                                          threads=out.threads, cache=cache)
        form = whole.form
        if whole.form != "fp32":
            graphs["dense_int8"] = whole.model
    pairs = [("dense", "pruned")] + ([("dense_int8", "pruned")] if "dense_int8" in graphs else [])
    t = model_timing(graphs, feed, pairs, threads=out.threads, cache=cache,
                     precision="int8" if int8 else "fp32")
    row = {"batch": len(next(iter(feed.values()))), "threads": out.threads, "ms": t["ms"],
           "measured": t["ratio"]["dense/pruned"], "paired": True, "runtime": current().name}
    if peer_int8:
        row.update(dense_int8_form=form, vs_dense_int8=t["ratio"].get("dense_int8/pruned"))
        if current().name == "ort" and row["vs_dense_int8"] is not None:
            row.update(vs_ort_int8=row["vs_dense_int8"], ort_int8_form=form)
    return row


def reach_target(res, original, proto, onnx_bytes: bytes, int8: bool, cfg: PruneConfig, out: OutputConfig,
                 feed: dict, calibration, report: dict, convert):
    """``--target-speedup``: measure the written model; if it misses the target by more than 10 %, one
    corrective round (re-allocate with the prediction corrected by the measurement, remove the lowest-norm
    units of the families that must shrink from the folded model, export and measure again); then
    :class:`TargetMissed` (exit 5) unless ``--accept-missed-target``. ``convert(res, proto)`` makes the
    artifact's (bytes, int8) from the smaller model's export. Returns the final (bytes, int8, fp32 proto)."""
    st = res.structure
    widths = {f.name: int(st.keep[f.name].sum()) for f in st.families}
    rows = []
    for attempt in range(2):
        table = st.speed["table"]
        m = measure_speedup(original, proto, onnx_bytes, int8, out, feed, calibration)
        m.update(widths=widths, predicted=table.speedup(widths), round=attempt)
        rows.append(m)
        if m["measured"] >= TARGET_TOLERANCE * cfg.target_speedup or attempt == 1:
            break
        widths = shrink(res, table, widths, cfg.target_speedup, m["ms"]["dense"], m["ms"]["pruned"])
        report["accuracy"]["pruned_torch"] = res.metrics["pruned_torch"]["score"]
        report["metrics"]["pruned_torch"] = res.metrics["pruned_torch"]
        report["mask_digest"] = res.mask_digest
        proto = export_model(res.model, res.eval_shard, res.axes)
        onnx_bytes, int8 = convert(res, proto)
    final = rows[-1]
    report["timings"]["latency_table"] = st.speed["table"].seconds
    report["timings"]["allocation"] = round(sum(a["seconds"] for a in st.speed["allocations"]), 3)
    report["target_speedup"] = {"target": cfg.target_speedup, "predicted": final["predicted"],
                                "measured": final["measured"], **({"vs_ort_int8": final["vs_ort_int8"]}
                                                                   if "vs_ort_int8" in final else {}),
                                **({"vs_dense_int8": final["vs_dense_int8"]}
                                   if final.get("vs_dense_int8") is not None else {}),
                                "batch": final["batch"], "threads": out.threads, "rounds": rows,
                                "allocations": st.speed["allocations"], "table": st.speed["table"].to_json()}
    if final["measured"] < TARGET_TOLERANCE * cfg.target_speedup:
        msg = (f"target not reached: measured {final['measured']:.2f}x against the "
               f"target {cfg.target_speedup:g}x (batch {final['batch']}, after one corrective round)")
        if not out.accept_missed_target:
            raise TargetMissed(msg + "; --accept-missed-target writes the model anyway")
        report.setdefault("warnings", []).append(msg)
    return onnx_bytes, int8, proto


__all__ = ["SENSITIVITY_ROWS", "TARGET_TOLERANCE", "default_speed", "divergence", "latency_table",
           "loss_on_rows", "measure_speedup", "reach_target"]
