"""Structured pruning's speed in stock ONNX Runtime: the tool's smaller dense graph against the dense model
and against ONNX Runtime's own int8 of the dense model.

    python bench/structured_speed.py [--models encoder,resnet18,llama] [--sparsities 0.5,0.75] [--rounds 9]
                                     [--exact-widths]

Models (random weights from their constructors; which units go does not change the speed, so a random choice
of round((1 - s) n) units per family is removed through the tool's own discover / remove path, no fine-tune):

- ``encoder``: transformers' ``BertModel``, BERT-base-shaped (hidden 768, 12 heads, FFN 3072), 4 layers,
  sequence 128, output ``last_hidden_state``; batch 1 and 8;
- ``resnet18``: torchvision resnet18 at 224x224 (the first conv of each block loses channels; the residual
  width stays); batch 1 and 8;
- ``mobilenet_v3_small``, ``efficientnet_b0``: torchvision's, 224x224 (squeeze-excitation blocks: the
  expansion channels, their depthwise conv and the squeeze units go); batch 1 and 8;
- ``llama``: transformers' ``LlamaModel`` (hidden 768, 12 query / 4 kv heads of 64, SwiGLU 2048, 4 layers),
  prefill of 128 tokens, output ``last_hidden_state`` (no LM head: a vocabulary projection of the last token
  is the same for every width); batch 1 and 8.

Columns, timed in one process, interleaved, 1 ORT thread, medians of ``--rounds`` rounds:

- ``dense``: the dense model's fp32 export;
- ``ort_dyn_s8`` / ``ort_dyn_u8`` / ``ort_static``: ONNX Runtime's ``quantize_dynamic`` (per channel, int8 /
  uint8 weights) and ``quantize_static`` (QDQ, per channel, MinMax on 32 random rows) of the dense export;
  "ORT best int8" is the fastest of those whose error (max |out - fp32| / max |fp32| against the dense fp32
  output) is at most 5e-2 or the tool's own int8 error against its fp32 graph, whichever is larger (random
  weights give some models larger int8 errors than trained ones: a peer is as accurate as the tool's output);
- ``tool_fp32``: what ``--structure channels`` writes: the smaller model's export with the graph passes that
  measure faster here at the larger batch (``converters.passes``: an Add before a LayerNorm as Sum, which
  keeps ORT from fusing them into its slower SkipLayerNormalization);
- ``tool_int8``: what ``--quantize int8`` writes: the same through ``converters.quantize_whole`` (the fastest
  of ORT's int8 forms of the smaller graph, measured at the larger batch);
- ``dense_passes``: the dense export with the same passes, so that the table also says how much of the
  speed-up is the pruning alone (``fp32_vs_dense_passes``); where a pass applies, ORT's three int8 forms of
  that graph too (``ort_dyn_s8+passes``, ...: ``int8_vs_ort_best_passes``), since a pass that helps the
  smaller graph also helps ORT's int8 of the dense one.

Results: bench/results/structured_speed.json; BENCHMARKS.md, section 16.
"""
from __future__ import annotations

import copy
import sys

import harness
import numpy as np
import onnx
import torch
from harness import (
    machine,
    machine_line,
    medians,
    ort_dynamic,
    ort_static,
    parser,
    sessions,
    time_sessions,
    write_results,
)
from torch import nn

from converters import export_onnx, passes, quantize_whole, run_onnx  # noqa: E402
from converters.int8 import default_weight_bits  # noqa: E402
from sapp_compress.io.extras import require  # noqa: E402
from sapp_compress.structure import discover  # noqa: E402
from sapp_compress.structure.remove import random_keep, remove  # noqa: E402

ERR_OK = 5e-2
ORT_NAMES = ("ort_dyn_s8", "ort_dyn_u8", "ort_static")


class Out(nn.Module):
    def __init__(self, inner: nn.Module, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.inner, self.keys = inner, keys

    def forward(self, *xs):
        out = self.inner(**dict(zip(self.keys, xs))) if self.keys else self.inner(*xs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _tokens(n: int, seq: int = 128, vocab: int = 1000, seed: int = 0,
            mask: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(1, vocab, size=(n, seq)).astype(np.int64)}
    if mask:
        feed["attention_mask"] = np.ones((n, seq), dtype=np.int64)
    return feed


def encoder():
    t = require("transformers", "the encoder")
    cfg = t.BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=4,
                       vocab_size=30522, max_position_embeddings=512)
    return (Out(t.BertModel(cfg).eval(), ("input_ids", "attention_mask")), _tokens,
            "BertModel, BERT-base-shaped, 4 layers, sequence 128")


def resnet18():
    tv = require("torchvision", "resnet18")

    def rows(n, seed=0):
        return {"x": np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)}
    return tv.models.resnet18(num_classes=1000).eval(), rows, "torchvision resnet18, 224x224"


def llama():
    t = require("transformers", "the decoder")
    cfg = t.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                        num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                        max_position_embeddings=512)
    m = t.LlamaModel(cfg).eval()
    m.config.use_cache = False
    return (Out(m, ("input_ids",)), lambda n, seed=0: _tokens(n, seed=seed, mask=False),
            "LlamaModel, GQA 12/4 heads, SwiGLU, 4 layers, prefill of 128 tokens")


def _images224(n, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)}


def mobilenet_v3_small():
    tv = require("torchvision", "mobilenet_v3_small")
    return (tv.models.mobilenet_v3_small(num_classes=1000).eval(), _images224,
            "torchvision mobilenet_v3_small, 224x224")


def efficientnet_b0():
    tv = require("torchvision", "efficientnet_b0")
    return (tv.models.efficientnet_b0(num_classes=1000).eval(), _images224,
            "torchvision efficientnet_b0, 224x224")


MODELS = {"encoder": encoder, "resnet18": resnet18, "llama": llama, "mobilenet_v3_small": mobilenet_v3_small,
          "efficientnet_b0": efficientnet_b0}


def ort_int8(dense: bytes, kind: str, calib: list[dict]) -> bytes:
    from onnxruntime.quantization import QuantFormat, QuantType

    if kind == "ort_static":
        return ort_static(dense, calib, quant_format=QuantFormat.QDQ, per_channel=True,
                          reduce_range=default_weight_bits() == 7, activation_type=QuantType.QUInt8,
                          weight_type=QuantType.QInt8)
    return ort_dynamic(dense, per_channel=True,
                       weight_type=QuantType.QInt8 if kind == "ort_dyn_s8" else QuantType.QUInt8)


def _export(model: nn.Module, feed: dict[str, np.ndarray]) -> onnx.ModelProto:
    return export_onnx(model, tuple(torch.from_numpy(v) for v in feed.values()), input_names=list(feed))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def run_model(name: str, sparsities: list[float], batches: list[int], rounds: int,
              exact: bool = False) -> dict:
    torch.manual_seed(0)
    model, rows, desc = MODELS[name]()
    inner = model.inner if isinstance(model, Out) else model
    ex = rows(2)
    plan = discover(model, tuple(torch.from_numpy(v) for v in ex.values()), names_from=inner)
    dense = _export(model, ex).SerializeToString()
    calib = [rows(8, seed=s) for s in range(4)]
    graphs: dict[str, bytes] = {"dense": dense}
    for k in ORT_NAMES:
        graphs[k] = ort_int8(dense, k, calib)
    choices = {}
    calib_rows = {k: np.concatenate([c[k] for c in calib]) for k in ex}
    timing = rows(max(batches), seed=7)
    applied = []
    for s in sparsities:
        keep = random_keep(plan.families, {f.name: f.kept_units(s) for f in plan.families}, seed=0)
        small = copy.deepcopy(model)
        remove(small.inner if isinstance(small, Out) else small, plan, keep)
        chosen = passes.choose(_export(small, ex), timing, threads=1)
        applied += chosen.applied
        proto = chosen.model
        graphs[f"tool_fp32 s{s}"] = proto.SerializeToString()
        whole = quantize_whole(proto, timing_inputs=timing, calibration_inputs=calib_rows, threads=1)
        graphs[f"tool_int8 s{s}"] = whole.model.SerializeToString()
        choices[f"tool_int8 s{s}"] = whole.to_json()
        choices[f"tool_fp32 s{s}"] = chosen.to_json()
        if exact:  # the widths before they were rounded to multiples of 8: round((1 - s) n) for every family
            keep = random_keep(plan.families, {f.name: int(round((1 - s) * f.n_units))
                                               for f in plan.families}, seed=0)
            small = copy.deepcopy(model)
            remove(small.inner if isinstance(small, Out) else small, plan, keep)
            graphs[f"exact_fp32 s{s}"] = passes.choose(_export(small, ex), timing,
                                                       threads=1).model.SerializeToString()
    dense_proto = onnx.load_from_string(dense)
    for name_ in dict.fromkeys(applied):
        dense_proto = passes.PASSES[name_](dense_proto)[0]
    graphs["dense_passes"] = dense_proto.SerializeToString()
    # ORT's int8 of the dense graph with the same passes: how much of the int8 gain is the pruning
    if applied:
        for k in ORT_NAMES:
            graphs[f"{k}+passes"] = ort_int8(graphs["dense_passes"], k, calib)
    out = {"model": desc, "families": len(plan.families), "choices": choices,
           "sizes": {k: len(v) for k, v in graphs.items()}, "batches": {}}
    for b in batches:
        feed = rows(b, seed=3)
        ref = run_onnx(dense, feed, threads=1)[0]
        errs = {k: _rel(run_onnx(v, feed, threads=1)[0], ref) for k, v in graphs.items()
                if k.startswith("ort_")}
        for s in sparsities:
            small = run_onnx(graphs[f"tool_fp32 s{s}"], feed, threads=1)[0]
            errs[f"tool_int8 s{s}"] = _rel(run_onnx(graphs[f"tool_int8 s{s}"], feed, threads=1)[0], small)
        ok = max([ERR_OK] + [errs[f"tool_int8 s{s}"] for s in sparsities])
        med = medians(time_sessions(sessions(graphs, threads=1, spin=False), feed, rounds, loop_s=0.0))
        peers = [k for k in ORT_NAMES if errs[k] <= ok]
        best = min(peers, key=med.get) if peers else None
        peers_p = [f"{k}+passes" for k in ORT_NAMES if errs.get(f"{k}+passes", np.inf) <= ok]
        best_p = min(peers_p, key=med.get) if peers_p else None
        row = {"ms": {k: round(v, 3) for k, v in med.items()}, "int8_error": errs, "ort_best": best,
               "ort_best_passes": best_p}
        for s in sparsities:
            row[f"s{s}"] = {"fp32_vs_dense": med["dense"] / med[f"tool_fp32 s{s}"],
                            "fp32_vs_dense_passes": med["dense_passes"] / med[f"tool_fp32 s{s}"],
                            "int8_vs_ort_best": (med[best] / med[f"tool_int8 s{s}"]) if best else None,
                            "int8_vs_ort_best_passes": (med[best_p] / med[f"tool_int8 s{s}"]) if best_p
                            else None,
                            "int8_vs_dense": med["dense"] / med[f"tool_int8 s{s}"]}
            if exact:
                row[f"s{s}"]["exact_fp32_vs_dense"] = med["dense"] / med[f"exact_fp32 s{s}"]
        out["batches"][str(b)] = row
        print(f"{name} batch {b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()), flush=True)
        for s in sparsities:
            r = row[f"s{s}"]
            ib = f"{r['int8_vs_ort_best']:.2f}x" if r["int8_vs_ort_best"] else "-"
            ip = (f" ({r['int8_vs_ort_best_passes']:.2f}x {best_p})" if r["int8_vs_ort_best_passes"] else "")
            print(f"   s={s}: fp32 {r['fp32_vs_dense']:.2f}x dense fp32 "
                  f"({r['fp32_vs_dense_passes']:.2f}x with the same passes); int8 {ib} ORT's best int8 "
                  f"({best}){ip}, {r['int8_vs_dense']:.2f}x dense fp32" + (
                      f"; unrounded widths: fp32 {r['exact_fp32_vs_dense']:.2f}x dense fp32" if exact
                      else ""), flush=True)
    return out


def main() -> None:
    ap = parser(__doc__, "structured_speed.json")
    ap.add_argument("--models", default="encoder,resnet18,llama", type=harness.names)
    ap.add_argument("--sparsities", default="0.5,0.75", type=harness.floats)
    ap.add_argument("--batches", default="1,8", type=harness.ints)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--exact-widths", action="store_true",
                    help="also time round((1 - s) n) units per family, before the rounding to multiples of 8")
    a = ap.parse_args(sys.argv[1:])
    torch.set_num_threads(1)
    print(f"machine: {machine_line()}; ONNX Runtime 1 thread", flush=True)
    res = {"machine": machine(), "rounds": a.rounds, "exact_widths": a.exact_widths, "models": {}}
    for name in a.models:
        res["models"][name] = run_model(name, a.sparsities, a.batches, a.rounds, a.exact_widths)
    write_results(a.out, res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
