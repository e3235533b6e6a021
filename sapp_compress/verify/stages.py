"""ONNX Runtime against the pruned PyTorch model (exit 3 when they differ beyond tolerance), stage by stage:
:func:`verify_stages`. The converters' :class:`converters.VerificationError` becomes the tool's
:class:`~sapp_compress.errors.VerificationFailed` here (:func:`stage_failed`), with the measurements for the
report."""
from __future__ import annotations

import torch

from calib_data.shards import Shard

from ..config import OutputConfig
from ..errors import VerificationFailed
from ..io.export import EXPORT_ROWS
from ..io.feeds import PREDICT_ROWS, onnx_feed, predict_arrays, rows


def stage_failed(e, model: str, stage: str, batch_size: int, done: dict) -> None:
    """Raise :class:`VerificationFailed` for verification stage ``stage`` of the ``model`` (precision)
    artifact, with the stages passed before it."""
    failed = e.result.to_json() if e.result is not None else {"passed": False}
    failed.update(batch_size=batch_size, precision=stage, stages=done)
    raise VerificationFailed(f"{model} model: {e}", failed) from None


def verify_stages(res, shard: Shard, stages: list, out: OutputConfig) -> dict:
    """ORT against the pruned PyTorch model for each (precision, bytes, atol, rtol) of ``stages``, at two
    batch sizes other than the export's (the evaluation rows, and one row). The last stage is the artifact;
    the result is its verification, with the earlier stages under ``stages``. Raises
    :class:`VerificationFailed`.

    An fp32 artifact passes when ``max|ORT - torch| <= atol + rtol * max|torch|`` (``--atol``/``--rtol``). An
    int8 artifact cannot match fp32 PyTorch that closely (``converters.int8.error_bound``; measured errors in
    BENCHMARKS.md section 20.1), so it passes three checks:

    1. ``fp32``: the same masks in fp32 at the fp32 tolerance (the weights and masks reached the graph
       intact);
    2. ``int8_kernels``: ORT's integer kernels against the model's own quantize / dequantize reference
       (:func:`converters.verify_kernels`, ``--int8-kernel-rtol``, default 0.1): the int8 computation is the
       one the stored scales define, e.g. no saturating kernel;
    3. the int8 artifact against PyTorch at ``atol + int8_rtol * max|torch|`` (``--int8-rtol``, default 0.2):
       the quantization error stays within bounds; and for a classifier, top-1 agreement with the pruned
       PyTorch model on the evaluation rows at least ``min_top1_agreement`` (``--min-top1-agreement``,
       :data:`MIN_TOP1_AGREEMENT`): a tolerance scaled to the largest logit can pass flipped decisions."""
    import converters

    cpu = torch.device("cpu")
    done = {}
    for precision, data, atol, rtol in stages:
        if precision == "int8":
            vx = rows(shard, out.verify_samples)
            try:
                k = converters.verify_kernels(data, onnx_feed(shard, vx), atol=atol,
                                              rtol=out.int8_kernel_rtol, threads=out.threads,
                                              batch_size=PREDICT_ROWS)
            except converters.VerificationError as e:
                stage_failed(e, "int8", "int8_kernels", len(vx[0]), done)
            done["int8_kernels"] = {**k.to_json(), "batch_sizes": [len(vx[0])], "precision": "int8_kernels"}
        vers = []
        for n in (out.verify_samples, 1):
            vx = rows(shard, n)
            expected = predict_arrays(res.model, vx, cpu)
            try:
                floor = out.min_top1_agreement if precision == "int8" and n == out.verify_samples else None
                vers.append(converters.verify(data, onnx_feed(shard, vx), [expected], atol=atol, rtol=rtol,
                                              classifier=res.task.is_classifier, threads=out.threads,
                                              min_top1=floor, batch_size=PREDICT_ROWS))
            except converters.VerificationError as e:
                stage_failed(e, precision, precision, len(vx[0]), done)
        ver = vers[0].to_json()
        ver.update(max_abs_diff=max(v.max_abs_diff for v in vers),
                   max_rel_diff=max(v.max_rel_diff for v in vers),
                   batch_sizes=[min(out.verify_samples, len(shard), PREDICT_ROWS), 1],
                   export_batch_size=EXPORT_ROWS,
                   precision=precision)
        done[precision] = ver
    final = dict(done[stages[-1][0]])
    final["stages"] = {k: v for k, v in done.items() if k != stages[-1][0]}
    return final


__all__ = ["stage_failed", "verify_stages"]
