"""The accuracy gate (exit 4): the written artifact scored in the job's runtime on the evaluation rows,
against the dense model's score."""
from __future__ import annotations

from ..config import OutputConfig
from ..errors import AccuracyGateFailed
from ..io.feeds import PREDICT_ROWS, onnx_feed


def evaluate(res, onnx_bytes: bytes, out: OutputConfig, report: dict) -> None:
    """Score ``onnx_bytes`` in the job's runtime on the evaluation shard of ``res`` (a
    :class:`~sapp_compress.pruning.PruneResult`) into the report's ``metrics.onnx`` and ``accuracy.onnx``, and
    the fidelity to the original model (``fidelity``: its ``measure``, the pruned PyTorch model's and the
    ONNX model's) next to the task's score."""
    import converters

    ev = res.eval_shard
    onnx_out = converters.run_onnx(onnx_bytes, onnx_feed(ev, tuple(ev.inputs)), threads=out.threads,
                                   batch_size=PREDICT_ROWS)[0]
    metrics = res.task.metrics(onnx_out, ev.y, res.dense_eval_outputs)
    report["metrics"]["onnx"] = metrics
    report["accuracy"]["onnx"] = metrics["score"]
    report["fidelity"] = {"measure": res.task.fidelity_name,
                          "pruned_torch": report["metrics"].get("pruned_torch", {}).get("fidelity"),
                          "onnx": metrics.get("fidelity")}


def gate(res, out: OutputConfig, report: dict) -> None:
    """Record ``accuracy.drop`` (dense score - ONNX score) and raise :class:`AccuracyGateFailed` when it
    exceeds ``out.max_accuracy_drop`` (None: no gate)."""
    acc = report["accuracy"]
    drop = acc["dense"] - acc["onnx"]
    acc["drop"] = drop
    if out.max_accuracy_drop is not None and drop > out.max_accuracy_drop + 1e-12:
        raise AccuracyGateFailed(
            f"accuracy gate failed: {res.task.score_name} dense {acc['dense']:.4f} -> "
            f"onnx {acc['onnx']:.4f}, a drop of {drop:.4f} > the allowed {out.max_accuracy_drop:g}")


__all__ = ["evaluate", "gate"]
