"""int8 block-sparse (converters.int8) vs ONNX Runtime's own int8 of the dense model, one process,
interleaved.

    python bench/int8_speed.py [--cases B16s0.8,B32s0.9] [--batches 1,32] [--rounds 15] [--passes 3]

Model: MLP 1024-4096-4096-1024 with ReLU (``zoo.mlp``), random balanced block masks through the engine's own
plan / attach / fold path, no fine-tuning. 1 ORT intra-op thread, CPU EP, ORT_ENABLE_ALL. Variants:

- ``dense``: fp32 export of the unpruned model (the baseline of every speed-up);
- ``ort_*``: onnxruntime.quantization on the dense fp32 ONNX: quantize_dynamic with QInt8 / QUInt8 weights,
  per-tensor or per-channel, reduce_range; quantize_static (QDQ, per-channel, U8 activations / S8 weights,
  MinMax on 8 random batches of 4);
- ``blocked``: the tool's fp32 output, ``converters.convert(pruned export, manifest, fmt="blocked")``;
- ``i8_*``: :func:`converters.int8.blocked_int8` on every pruned linear of the pruned export: layouts ``row``
  (the default: MatMulInteger -> Cast -> Mul, which ORT fuses to MatMulIntegerToFloat), ``rowms``
  (com.microsoft.MatMulIntegerToFloat written directly), ``rowg1`` (input gathered on axis 1) and ``featu8``
  (MatMulInteger with the uint8 weights as first input), dynamic (``dyn``) or static (``st``, scales
  calibrated on 8 random batches of 4) activations, weight bits ``w8`` / ``w7`` (the CPU check picks one; the
  other is timed for its cost), chunks sized for 16 rows (default, :data:`converters.int8.CHUNK_REF`), 8
  (``c8``) or 32 (``c32``); ``i8_compact``:
  :func:`converters.int8.compact_int8` (int8 kept blocks in the file, dense int8 compute after ORT's folding).

Every pass times all variants interleaved (rounds of every session in turn), ``--rounds`` rounds; the table is
printed per pass, and the spread over passes is given. Errors: max |out - ref| / max |ref| on a batch of 32,
ref = fp32 pruned model for the tool's outputs, fp32 dense model for ORT's quantized dense models. "ORT best"
is the fastest ORT int8 variant at that batch among those with error <= 5e-2 (a kernel that saturates is not a
peer). Raw results: bench/results/int8_speed.json.
"""
from __future__ import annotations

import copy
import platform
import statistics
import sys
import time

import harness
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

from converters import convert, export_onnx, locate
from converters.graph import GraphIndex, prune_unused
from converters.int8 import (
    blocked_int8,
    calibrate_activation,
    compact_int8,
    default_weight_bits,
    ensure_ms_opset,
)
from converters.rewrite import apply
from converters.runtime import session
from sapp_compress import zoo

SIZES = [1024, 4096, 4096, 1024]
ERR_OK = 5e-2


def build_pair(block: int, sparsity: float, seed: int = 0):
    torch.manual_seed(seed)
    dense = zoo.mlp(SIZES).eval()
    model = copy.deepcopy(dense)
    _, _, manifest = harness.random_masks(model, block, sparsity, seed=seed)
    return dense, model.eval(), manifest


def layer_inputs(model: onnx.ModelProto, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    sess = session(m, optimize=False)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    out.update(feed)
    return {n: out[n] for n in names}


def int8_model(pruned: onnx.ModelProto, manifest, calib: list[dict] | None = None, **kw):
    """Every located linear of ``pruned`` rewritten by blocked_int8 (compact_int8 for ``layout="compact"``);
    ``calib`` feeds: static activations."""
    m = copy.deepcopy(pruned)
    acts = {}
    if calib is not None:
        sites, _ = locate(m, manifest)
        ins = [s.node.input[0] for s in sites]
        samples = [layer_inputs(m, ins, f) for f in calib]
        acts = {n: calibrate_activation(np.concatenate([s[n].reshape(-1) for s in samples])) for n in ins}
    rws = []
    layout = kw.pop("layout", "row")
    for lb in manifest:
        (site,), _ = locate(m, [lb])
        if layout == "compact":
            rw = compact_int8(site, GraphIndex(m.graph), **kw)
        else:
            rw = blocked_int8(site, GraphIndex(m.graph), layout=layout, act=acts.get(site.node.input[0]),
                              **kw)
        apply(m, rw)
        rws.append(rw)
    ensure_ms_opset(m)
    prune_unused(m.graph)
    assert all(r.layout == ("dense" if layout == "compact" else layout) for r in rws)
    return m, {"weight_bits": sorted({r.weight_bits for r in rws}), "layout": rws[0].layout,
               "activation": rws[0].activation, "kernel": rws[0].kernel, "vnni": rws[0].vnni,
               "act_scales": [r.act_scale for r in rws]}


def rel_err(out, ref) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def run_case(block: int, sparsity: float, batches: list[int], rounds: int, passes: int, loop_s: float,
             log) -> dict:
    dense_m, pruned_m, manifest = build_pair(block, sparsity)
    ex = (torch.randn(2, SIZES[0]),)
    proto_dense = export_onnx(dense_m, ex, input_names=["x"])
    proto_pruned = export_onnx(pruned_m, ex, input_names=["x"])
    g = torch.Generator().manual_seed(100)
    calib = [{"x": torch.randn(4, SIZES[0], generator=g).numpy()} for _ in range(8)]
    models: dict[str, onnx.ModelProto] = {"dense": proto_dense}
    meta: dict[str, dict] = {}
    dense_b = proto_dense.SerializeToString()
    dyn = {"ort_dyn_s8": dict(weight_type=QuantType.QInt8, per_channel=False),
           "ort_dyn_s8pc": dict(weight_type=QuantType.QInt8, per_channel=True),
           "ort_dyn_s8pc_rr": dict(weight_type=QuantType.QInt8, per_channel=True, reduce_range=True),
           "ort_dyn_u8": dict(weight_type=QuantType.QUInt8, per_channel=False),
           "ort_dyn_u8pc": dict(weight_type=QuantType.QUInt8, per_channel=True)}
    for name, kw in dyn.items():
        models[name] = onnx.load_from_string(harness.ort_dynamic(dense_b, **kw))
        meta[name] = {k: str(v) for k, v in kw.items()}
    models["ort_qdq_static"] = onnx.load_from_string(harness.ort_static(
        dense_b, calib, quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax))
    meta["ort_qdq_static"] = {"format": "QDQ", "per_channel": "True", "calibration": "MinMax, 8 x 4 random"}
    t = time.time()
    models["blocked"] = convert(proto_pruned, manifest, fmt="blocked").model
    meta["blocked"] = {"convert_s": round(time.time() - t, 2)}
    bits = default_weight_bits()
    variants = {f"i8_row_dyn_w{bits}": dict(layout="row"),
                f"i8_row_st_w{bits}": dict(layout="row", calib=calib),
                f"i8_rowms_dyn_w{bits}": dict(layout="row-ms"),
                f"i8_rowg1_dyn_w{bits}": dict(layout="row-g1"),
                f"i8_featu8_dyn_w{bits}": dict(layout="feature-u8"),
                f"i8_compact_dyn_w{bits}": dict(layout="compact"),
                f"i8_row_dyn_w{bits}_c8": dict(layout="row", chunk_ref=8),
                f"i8_row_dyn_w{bits}_c32": dict(layout="row", chunk_ref=32)}
    other = 15 - bits  # the other bit width (7 <-> 8): what the CPU check did not pick, for its cost
    variants[f"i8_row_dyn_w{other}"] = dict(layout="row", weight_bits=other)
    for name, kw in variants.items():
        t = time.time()
        kw = dict(kw)
        calib_kw = kw.pop("calib", None)
        models[name], meta[name] = int8_model(proto_pruned, manifest, calib_kw, **kw)
        onnx.checker.check_model(models[name], full_check=True)
        meta[name]["build_s"] = round(time.time() - t, 2)
    log(f"built {len(models)} models")
    dense_bytes = len(proto_dense.SerializeToString())
    res = {"variants": {}, "passes": []}
    xe = torch.randn(32, SIZES[0], generator=torch.Generator().manual_seed(7)).numpy()
    ref = {"dense": session(proto_dense, optimize=False).run(None, {"x": xe})[0].astype(np.float64),
           "pruned": session(proto_pruned, optimize=False).run(None, {"x": xe})[0].astype(np.float64)}
    sessions = {k: session(m, threads=1) for k, m in models.items()}
    for k, m in models.items():
        kind = "pruned" if (k == "blocked" or k.startswith("i8_")) else "dense"
        res["variants"][k] = {"bytes": len(m.SerializeToString()),
                              "bytes_ratio": len(m.SerializeToString()) / dense_bytes, "ref": kind,
                              "err_max_over_maxref": rel_err(sessions[k].run(None, {"x": xe})[0], ref[kind]),
                              **meta.get(k, {})}
    feeds = {n: {"x": torch.randn(n, SIZES[0], generator=torch.Generator().manual_seed(n)).numpy()}
             for n in batches}
    for p in range(passes):
        entry = {}
        for n in batches:
            t = time.time()
            samples = harness.time_sessions(sessions, feeds[n], rounds, loop_s=loop_s)
            med = harness.medians(samples)
            paired = {k: statistics.median(a / b for a, b in zip(samples["dense"], v))
                      for k, v in samples.items()}
            entry[n] = {"median_ms": med, "paired_speedup": paired, "wall_s": round(time.time() - t, 1),
                        "samples_ms": samples}
            log(f"pass {p} N={n} done ({entry[n]['wall_s']} s)")
        res["passes"].append(entry)
    return res


def summarize(case: str, res: dict, batches: list[int]) -> list[str]:
    v = res["variants"]
    ort_ok = [k for k in v if k.startswith("ort_") and v[k]["err_max_over_maxref"] <= ERR_OK]
    lines = [f"## {case}", "| variant | bytes vs dense | err max/maxref | "
             + " | ".join(f"N={n} x dense (pass speed-ups) | N={n} vs ORT best | N={n} vs blocked"
                          for n in batches) + " |"]
    per = {}  # (variant, n) -> list over passes of speed-up vs dense
    best = {}
    for n in batches:
        for pi, ps in enumerate(res["passes"]):
            med = ps[n]["median_ms"]
            b = min(ort_ok, key=lambda k: med[k])
            best.setdefault(n, []).append(b)
            for k in v:
                per.setdefault((k, n), []).append(med["dense"] / med[k])
                per.setdefault((k, n, "ort"), []).append(med[b] / med[k])
                per.setdefault((k, n, "blk"), []).append(med["blocked"] / med[k])
    for k in v:
        cells = []
        for n in batches:
            sp = per[(k, n)]
            cells.append(f"{statistics.median(sp):.2f}x ({', '.join(f'{s:.2f}' for s in sp)})")
            o, bl = per[(k, n, "ort")], per[(k, n, "blk")]
            cells.append(f"{statistics.median(o):.2f}x [{min(o):.2f}-{max(o):.2f}]")
            cells.append(f"{statistics.median(bl):.2f}x [{min(bl):.2f}-{max(bl):.2f}]")
        lines.append(f"| {k} | {v[k]['bytes_ratio']:.3f} | {v[k]['err_max_over_maxref']:.1e} | " +
                     " | ".join(cells) + " |")
    for n in batches:
        ms = [ps[n]["median_ms"]["dense"] for ps in res["passes"]]
        lines.append(f"N={n}: ORT best per pass {best[n]}; dense ms per pass "
                     f"{', '.join(f'{m:.2f}' for m in ms)}")
    # the fastest sample of each variant over all passes: what each reaches when the machine is quiet
    lines.append("fastest sample (ms) over all passes, x dense / x ORT best "
                 "(fastest ORT variant by the same measure):")
    for n in batches:
        lo = {k: min(min(ps[n]["samples_ms"][k]) for ps in res["passes"]) for k in v}
        ob = min(ort_ok, key=lambda k: lo[k])
        lines.append(f"  N={n}: " + ", ".join(f"{k} {lo[k]:.2f} "
                                              f"({lo['dense'] / lo[k]:.2f}x/{lo[ob] / lo[k]:.2f}x)"
                                             for k in v if k != "dense") + f"; ORT best {ob}")
    return lines


def main() -> None:
    ap = harness.parser(__doc__, out="int8_speed.json")
    ap.add_argument("--cases", default="B16s0.8,B32s0.9")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--loop-s", type=float, default=0.03)
    args = ap.parse_args()
    torch.set_num_threads(2)
    clock = harness.Clock()
    log = clock.log
    cpu = harness.cpu_info()
    log("CPU", harness.machine_line())
    batches = harness.ints(args.batches)
    results, tables = {}, []
    for case in harness.names(args.cases):
        block, sparsity = int(case.split("s")[0][1:]), float(case.split("s")[1])
        results[case] = run_case(block, sparsity, batches, args.rounds, args.passes, args.loop_s, log)
        tables += summarize(case, results[case], batches) + [""]
        print("\n".join(summarize(case, results[case], batches)), flush=True)
    meta = {"cpu": cpu, "ort": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": 1, "batches": batches, "rounds": args.rounds,
            "passes": args.passes, "loop_s": args.loop_s, "sizes": SIZES, "err_ok": ERR_OK,
            "utc_end": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "wall_s": clock.elapsed(),
            "command": "python bench/int8_speed.py " + " ".join(sys.argv[1:])}
    harness.write_results(args.out, {"meta": meta, "cases": results, "tables": tables})
    log("wrote", args.out)


if __name__ == "__main__":
    main()
