"""The tool's output in ONNX Runtime and in OpenVINO, beside each runtime's own int8 of the dense model: the
fastest int8 a user gets without training (BENCHMARKS.md section 23).

    python bench/runtime_peers.py [--models bert,resnet18] [--sparsities 0.5,0.75] [--batches 1,8]
                                  [--rounds 30] [--layers 4] [--work DIR] [--out FILE]

Models (random weights: speed does not depend on them): ``bert``, a BERT-base-shaped encoder (``--layers``
layers, hidden 768, 12 heads, FFN 3072, sequence 128, ``last_hidden_state``); ``resnet18`` (torchvision,
224 x 224). For each sparsity the tool runs twice, ``--structure channels --quantize int8 --threads 1
--export-batch-size 8 --steps 2``, once with ``--runtime ort`` and once with ``--runtime openvino``; each
picks its int8 form (or fp32) by measuring in its runtime. Candidates, all from the same weights, timed in one
process at 1 thread, interleaved round by round (every candidate once per round, in turn), the median of
``--rounds`` rounds, and each ratio paired (the median over rounds of that round's ratio):

- ``ort_dense``: the tool's dense export (torch.export), ONNX Runtime fp32;
- ``ort_int8``: ONNX Runtime's fastest int8 of it (``quantize_dynamic`` per channel, or static QDQ for convs:
  :func:`converters.quantize_whole`, the form the tool compares itself to);
- ``ov_dense``: the same dense ONNX in OpenVINO, f32 (``INFERENCE_PRECISION_HINT`` set explicitly);
- ``ov_int8``: NNCF's post-training int8 of it (32 calibration rows of the shard, the transformer scheme for
  the encoder), in OpenVINO;
- ``tool_ort_s{S}``: the tool's ``--runtime ort`` output in ONNX Runtime; ``tool_ov_s{S}``: its ``--runtime
  openvino`` output in OpenVINO.

Then the block-sparse path's verdict in each runtime: a 3-layer 1024-wide MLP at block 16, s = 0.8 (balanced
random masks), each formulation (``blocked``, ``compact``, ``sparse-initializer``) against the dense graph at
batch 1 and 32.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import numpy as np
import torch
from harness import RESULTS, floats, ints, machine_line, names, write_results

import converters
from converters import runtimes
from converters.export import export_onnx

SEQ, ROWS = 128, 64


class LastHidden(torch.nn.Module):
    """A BertModel's ``last_hidden_state``: the output the tool selects (the pooler left out)."""

    def __init__(self, m) -> None:
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build(name: str, work: Path, layers: int):
    """(model source for the CLI, extra CLI args, the module for the dense export, the shard's arrays)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    if name == "bert":
        from sapp_compress.io.extras import require

        t = require("transformers", "the encoder")
        m = t.BertModel(t.BertConfig(num_hidden_layers=layers, hidden_size=768, intermediate_size=3072,
                                     num_attention_heads=12)).eval()
        m.save_pretrained(work / "bert")
        ids = rng.integers(1000, 30522, size=(ROWS, SEQ)).astype(np.int64)
        ids[:, 0] = 101
        arrays = {"input_ids": ids, "attention_mask": np.ones((ROWS, SEQ), np.int64)}
        return work / "bert", ["--exclude", "pooler*"], LastHidden(m).eval(), arrays
    from sapp_compress.io.extras import require

    tv = require("torchvision", "resnet18")
    m = tv.models.resnet18().eval()
    torch.save(m, work / "resnet18.pt")
    arrays = {"x": rng.standard_normal((ROWS, 3, 224, 224)).astype(np.float32)}
    return work / "resnet18.pt", ["--trust-model"], m, arrays


def run_tool(src: Path, args: list[str], shard: Path, out: Path, sparsity: float, runtime: str) -> dict:
    rep = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "sapp_compress", str(src), "--data", str(shard), *args,
           "--structure", "channels", "--sparsity", str(sparsity), "--quantize", "int8", "--runtime", runtime,
           "--steps", "2", "--batch-size", "4", "--device", "cpu", "--threads", "1",
           "--export-batch-size", "8", "--seed", "0", "-o", str(out), "--report", str(rep), "-q"]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the tool failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    r = json.loads(rep.read_text())
    return {"seconds": round(time.time() - t, 1), "int8_form": (r.get("int8") or {}).get("form"),
            "int8_latencies_ms": (r.get("int8") or {}).get("latencies_ms"),
            "runtime": r["runtime"], "graph_passes": (r.get("graph_passes") or {}).get("applied"),
            "verification": {k: r["verification"][k] for k in ("passed", "max_rel_diff", "precision")}}


def feed_of(arrays: dict, batch: int) -> dict:
    return {k: np.ascontiguousarray(v[:batch]) for k, v in arrays.items() if k != "y"}


def time_mixed(cands: dict, feed: dict, rounds: int) -> dict:
    """``cands``: name -> (runtime, model). One session each in its runtime; interleaved rounds."""
    sess = {k: runtimes.get(rt).session(m, threads=1, spin=False) for k, (rt, m) in cands.items()}
    samples = harness.time_sessions(sess, feed, rounds, loop_s=0.02)
    return samples


def paired(samples: dict, a: str, b: str) -> float:
    return round(statistics.median(x / y for x, y in zip(samples[a], samples[b])), 3)


def run_model(name: str, a, work: Path, log) -> dict:
    src, args, module, arrays = build(name, work, a.layers)
    shard = work / f"{name}_shard.npz"
    np.savez(shard, **arrays)
    res = {"tool": {}, "tables": {}}
    tool = {}
    for s in a.sparsities:
        for rt in ("ort", "openvino"):
            out = work / f"{name}_{rt}_s{s}.onnx"
            res["tool"][f"{rt}_s{s}"] = run_tool(src, args, shard, out, s, rt)
            log(f"{name} tool {rt} s={s}: {res['tool'][f'{rt}_s{s}']}")
            tool[f"tool_{'ov' if rt == 'openvino' else rt}_s{s}"] = (rt, out.read_bytes())
    example = tuple(torch.from_numpy(v[:2]) for v in feed_of(arrays, 2).values())
    dense = export_onnx(module, example, input_names=list(feed_of(arrays, 2)))
    calib = feed_of(arrays, 32)
    with runtimes.use("ort"):
        ort_int8 = converters.quantize_whole(dense, timing_inputs=feed_of(arrays, 8),
                                             calibration_inputs=calib, threads=1)
    with runtimes.use("openvino"):
        ov_int8 = converters.quantize_whole(dense, calibration_inputs=calib, form="nncf")
    res["peers"] = {"ort_int8_form": ort_int8.form, "ort_int8_latencies_ms": ort_int8.latencies_ms}
    cands = {"ort_dense": ("ort", dense), "ort_int8": ("ort", ort_int8.model),
             "ov_dense": ("openvino", dense), "ov_int8": ("openvino", ov_int8.model), **tool}
    for b in a.batches:
        feed = feed_of(arrays, b)
        tables = []
        for _ in range(2):  # two tables back to back: their spread is the drift
            smp = time_mixed(cands, feed, a.rounds)
            row = {"ms": {k: round(statistics.median(v), 3) for k, v in smp.items()}}
            row["ratios"] = {f"{peer}/{t}": paired(smp, peer, t) for t in tool
                             for peer in ("ort_int8", "ov_int8", "ov_dense", "ort_dense")}
            row["ratios"].update({"ort_int8/ov_int8": paired(smp, "ort_int8", "ov_int8"),
                                  "ort_dense/ov_dense": paired(smp, "ort_dense", "ov_dense")})
            tables.append(row)
            log(f"{name} batch {b}: {row}")
        res["tables"][str(b)] = tables
    return res


def blocks_verdict(a, log) -> dict:
    """Each block formulation of a 1024-wide MLP against dense, in each runtime."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(3)]).eval()
    _, _, manifest = harness.random_masks(mlp, 16, 0.8, balanced=True)
    proto = export_onnx(mlp, (torch.randn(2, 1024),))
    name = proto.graph.input[0].name
    graphs = {"dense": proto}
    for fmt in ("blocked", "compact", "sparse-initializer"):
        graphs[fmt] = converters.convert(proto, manifest, fmt=fmt).model
    out = {}
    for rt in ("ort", "openvino"):
        for b in (1, 32):
            feed = {name: np.random.default_rng(0).standard_normal((b, 1024)).astype(np.float32)}
            sess = {k: runtimes.get(rt).session(m, threads=1, spin=False) for k, m in graphs.items()}
            smp = harness.time_sessions(sess, feed, a.rounds, loop_s=0.02)
            row = {f"dense/{k}": paired(smp, "dense", k) for k in graphs if k != "dense"}
            row["dense_ms"] = round(statistics.median(smp["dense"]), 4)
            out[f"{rt} batch {b}"] = row
            log(f"blocks {rt} batch {b}: {row}")
    return out


def main() -> None:
    ap = harness.parser(__doc__, "runtime_peers.json")
    ap.add_argument("--models", type=names, default=["bert", "resnet18"])
    ap.add_argument("--sparsities", type=floats, default=[0.5, 0.75])
    ap.add_argument("--batches", type=ints, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", default=str(RESULTS / "runtime_peers_work"))
    ap.add_argument("--no-blocks", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    clock = harness.Clock()
    log = clock.log if hasattr(clock, "log") else print
    ov = runtimes.get("openvino")
    ov.require()
    import nncf

    res = {"machine": machine_line(), "cpu": harness.cpu_info(), "openvino": ov.version(),
           "nncf": nncf.__version__, "rounds": a.rounds, "threads": 1, "models": {}}
    log(res["machine"])
    for name in a.models:
        res["models"][name] = run_model(name, a, work, log)
        write_results(a.out, res)
    if not a.no_blocks:
        res["blocks"] = blocks_verdict(a, log)
    write_results(a.out, res)


if __name__ == "__main__":
    main()
