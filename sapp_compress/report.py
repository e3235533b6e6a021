"""The run report (JSON) and its one-screen human summary.

Keys (the contract, which scripts rely on; more are added freely): ``achieved_sparsity`` (measured from the
exported ONNX weights, over the pruned layers), ``layers`` (name, shape, block, sparsity, onnx_format, and
the converter's reason and latencies), ``accuracy`` (``dense``, ``pruned_torch``, ``onnx``: the task's
score, null where unknown), ``verification`` (``max_abs_diff``, ``max_rel_diff``, ``top1_agreement``,
``passed``), ``onnx_bytes``, ``dense_onnx_bytes``, ``exit_code``, ``versions``, ``timings`` (seconds per
stage).
"""
from __future__ import annotations

import platform

import numpy as np


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    from ._version import __version__

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "sapp_compress": __version__, "numpy": np.__version__, "python": platform.python_version()}


def empty_report() -> dict:
    return {
        "exit_code": None, "error": None, "achieved_sparsity": None, "layers": [], "skipped": [],
        "accuracy": {"dense": None, "pruned_torch": None, "onnx": None}, "block_sparsity": None,
        "metrics": {}, "verification": None, "onnx_bytes": None, "dense_onnx_bytes": None,
        "versions": versions(), "timings": {}, "config": {}, "task": None, "device": None,
        "mask_digest": None,
    }


def block_sparsity(layers) -> float:
    """The masks' block sparsity over the pruned layers (:class:`converters.LayerBlocks`): the share of their
    weights in dropped blocks, by element (edge blocks of padded views count what they cover)."""
    from converters.manifest import element_mask

    total = sum(int(np.prod(lb.weight_shape)) for lb in layers)
    return 1.0 - sum(int(element_mask(lb).sum()) for lb in layers) / total if total else 0.0


def int8_sparsity(report: dict, int8, fp32) -> None:
    """With int8 layers: ``achieved_sparsity`` and each layer's ``sparsity`` are measured on the fp32 form of
    the same masks (``fp32``, a :class:`converters.SparsityReport`), as for an fp32 artifact: the masks' zeros
    (and the rare exact zero inside a kept block); the zeros of the int8 weights (``int8``), which add the
    kept weights that rounded to zero, are reported apart, under ``int8_zeros`` and each layer's
    ``int8_zero_fraction``."""
    report["achieved_sparsity"] = fp32.overall
    for row in report["layers"]:
        row["sparsity"] = fp32.per_layer[row["name"]]
        row["int8_zero_fraction"] = int8.per_layer[row["name"]]
    report["int8_zeros"] = {"fraction": int8.overall, "rounded_to_zero": int8.overall - fp32.overall}


def no_int8_warning(layers: list[dict]) -> str:
    """The warning of a ``--quantize int8`` run in which no layer went int8, with the first layer's reason."""
    first = next((row for row in layers if row.get("reason")), layers[0] if layers else None)
    why = f" (e.g. {first['name']}: {first['reason'] or first['onnx_format']})" if first else ""
    return f"--quantize int8: no layer was quantized, the model is written in fp32{why}"


def _fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


#: the widest layer-name column of the summary; longer names are cut in the middle (q, k and v differ at the
#: end)
NAME_WIDTH = 56


def _cut(name: str, width: int) -> str:
    """``name`` in ``width`` characters, cut in the middle so that both ends (the layer's place and its own
    name) stay readable."""
    if len(name) <= width:
        return name
    half = (width - 3) // 2
    return f"{name[:half]}...{name[-(width - 3 - half):]}"


def summary(r: dict) -> str:
    """A one-screen summary for stderr."""
    lines = []
    acc = r["accuracy"]
    if r.get("task"):
        lines.append(f"task {r['task']} ({r.get('score_name', 'score')}): dense {_fmt(acc['dense'])}, "
                     f"pruned torch {_fmt(acc['pruned_torch'])}, onnx {_fmt(acc['onnx'])}")
    fid = r.get("fidelity")
    if fid and fid.get("onnx") is not None:
        lines.append(f"fidelity to the original model ({fid['measure']}): pruned torch "
                     f"{_fmt(fid['pruned_torch'])}, onnx {_fmt(fid['onnx'])}")
    if r["layers"] and r.get("structure"):
        lines.append(f"{'family':44s} {'kind':>8s} {'units':>13s} {'sparsity':>8s}  onnx format")
        for lay in r["layers"][:14]:
            lines.append(f"{_cut(lay['name'], 44):44s} {lay['kind']:>8s} "
                         f"{lay['kept_units']:>5d} of {lay['units']:<5d} {lay['sparsity']:8.3f}  "
                         f"{lay['onnx_format']}")
        if len(r["layers"]) > 14:
            lines.append(f"... and {len(r['layers']) - 14} more families (see the report)")
        p = r["structure"]["parameters"]
        lines.append(f"parameters: {p['pruned']:,} of {p['dense']:,} ({p['pruned'] / p['dense']:.2f}x)")
    elif r["layers"]:
        shown = r["layers"][:14]
        width = max(len("layer"), min(NAME_WIDTH, max(len(lay["name"]) for lay in shown)))
        lines.append(f"{'layer':{width}s} {'shape':>16s} {'block':>6s} {'sparsity':>8s}  onnx format")
        for lay in shown:
            lines.append(f"{_cut(lay['name'], width):{width}s} {'x'.join(map(str, lay['shape'])):>16s} "
                         f"{lay['block']:>6s} {lay['sparsity']:8.3f}  {lay['onnx_format']}")
        if len(r["layers"]) > 14:
            lines.append(f"... and {len(r['layers']) - 14} more layers (see the report)")
    if r["skipped"]:
        lines.append(f"left {'whole' if r.get('structure') else 'dense'}: {len(r['skipped'])} "
                     f"{'weight axes' if r.get('structure') else 'layer(s)'}, e.g. "
                     f"{r['skipped'][0]['name']}: {r['skipped'][0]['reason']}")
    if r["achieved_sparsity"] is not None and r.get("structure"):
        lines.append(f"removed: {r['achieved_sparsity']:.4f} of the pruned families' weights")
    elif r["achieved_sparsity"] is not None:
        z = r.get("int8_zeros")
        lines.append(f"achieved sparsity (from the ONNX weights): {r['achieved_sparsity']:.4f}" + (
            f" (int8 weights: {z['fraction']:.4f} zeros, {z['rounded_to_zero']:.4f} rounded to zero)"
            if z else ""))
    quantize = ((r.get("config") or {}).get("output") or {}).get("quantize")
    if quantize == "int8" and r["layers"] and not any(row.get("precision") == "int8" for row in r["layers"]):
        lines.append("precision: fp32 for every layer (--quantize int8 quantized none; see the warning)")
    if r["onnx_bytes"]:
        lines.append(f"onnx size {r['onnx_bytes'] / 1024:.1f} KiB vs dense "
                     f"{r['dense_onnx_bytes'] / 1024:.1f} KiB "
                     f"({r['onnx_bytes'] / r['dense_onnx_bytes']:.2f}x)")
    from converters.runtimes import RUNTIMES

    rt = r.get("runtime") or {}
    name = RUNTIMES[rt.get("name", "ort")].title
    sp = rt.get("speedup")
    if sp:
        lines.append(f"speed in {name} {rt.get('version', '')} ({rt.get('precision', 'f32')}), batch "
                     f"{sp['batch']}: {sp['measured']:.2f}x the dense model"
                     + (f", {sp['vs_dense_int8']:.2f}x its own int8 of the dense model "
                        f"({sp['dense_int8_form']})" if sp.get("vs_dense_int8") else ""))
    v = r["verification"]
    if v:
        k = (v.get("stages") or {}).get("int8_kernels")
        if k:
            lines.append(f"{name} int8 kernels vs the model's quantization reference: max rel diff "
                         f"{k['max_rel_diff']:.2e}, passed {k['passed']}")
        lines.append(f"{name}{' int8' if v.get('precision') == 'int8' else ''} vs pruned torch: max abs diff "
                     f"{v['max_abs_diff']:.2e}, max rel diff {v['max_rel_diff']:.2e}, passed {v['passed']}")
    t = r["timings"]
    if t:
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return "\n".join(lines)
