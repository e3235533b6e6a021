"""Compressed vs dense ONNX in ONNX Runtime on this machine: whole-model latency ratios.

Cases: the converters issue's models (an MLP 1024-4096-4096-1024 at B = 32, s = 0.9 and B = 16, s = 0.8; a CNN
of four 3x3 convs with 256 channels on 14x14) and the zoo at the shipped examples' sizes, each at N = 1, 32
and 256 and 1 and 2 threads.
Masks are random and balanced (k blocks in every block-row; ``--unbalanced`` for free masks). For each case
and thread count the dense, blocked and auto models run interleaved in one process (rounds of dense, blocked,
auto, ...), and the medians' ratios are reported beside the FLOP limit 1/d. The auto model's per-layer
choices and latencies are checked against dense (no layer more than 5 % slower).

    python bench/onnx_speed.py [--threads 1,2] [--batches 1,32,256] [--cases mlp,zoo] [--unbalanced]
                               [--out ...]
"""
from __future__ import annotations

import os
import platform

import harness
import torch
from torch import nn

from converters import convert, export_onnx, verify
from sapp_compress import zoo


def conv_stack(c: int = 256, n: int = 4) -> nn.Module:
    layers = []
    for _ in range(n):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class Case:
    """A model, its input(s) without the batch dimension, and the (block, sparsity) pairs to measure."""

    def __init__(self, name, build, inputs, configs, large=False):
        self.name, self.build, self.inputs, self.configs, self.large = name, build, inputs, configs, large

    def feed(self, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randint(0, hi, (n, *shape), generator=g) if kind == "int" else
                     torch.randn(n, *shape, generator=g) for kind, shape, hi in self.inputs)


F, I = "float", "int"
CASES = [
    # the converters issue's models
    Case("mlp-1024-4096-4096-1024", lambda: zoo.mlp([1024, 4096, 4096, 1024]), [(F, (1024,), 0)],
         [(32, 0.9), (16, 0.8)], large=True),
    Case("cnn-4x conv3x3-256ch-14x14", conv_stack, [(F, (256, 14, 14), 0)], [(16, 0.8)], large=True),
    # the zoo at the shipped examples' sizes
    Case("zoo digits_mlp 64-256-256-10", lambda: zoo.mlp([64, 256, 256, 10]), [(F, (64,), 0)],
         [(8, 0.8), (16, 0.8)]),
    Case("zoo digits_cnn ResCNN w64", lambda: zoo.ResCNN(1, 64, 2, 10), [(F, (1, 8, 8), 0)],
         [(8, 0.8), (16, 0.8)]),
    Case("zoo ctr CTRNet", lambda: zoo.CTRNet(), [(I, (26,), 50), (F, (13,), 0)], [(8, 0.8)]),
    Case("zoo TransformerClassifier d64", lambda: zoo.TransformerClassifier(), [(I, (32,), 64)],
         [(8, 0.8), (16, 0.8)]),
]


def pruned(build, block, sparsity, balanced, seed=0):
    torch.manual_seed(seed)
    model = build().eval()
    _, _, manifest = harness.random_masks(model, block, sparsity, balanced=balanced, seed=seed,
                                          indivisible="pad")
    return model, manifest


def measure(case: Case, block: int, s: float, n: int, threads: int, balanced: bool, rounds: int,
            spin: bool = True) -> dict:
    model, manifest = pruned(case.build, block, s, balanced=balanced)
    xs = case.feed(n)
    with torch.no_grad():
        expected = model(*xs).numpy()
    # torch.export fixes an axis of size 1: never export at 1
    dense = export_onnx(model, case.feed(max(n, 2)))
    names = [i.name for i in dense.graph.input]
    feed = {k: x.numpy() for k, x in zip(names, xs)}
    blocked = convert(dense, manifest, fmt="blocked").model.SerializeToString()
    dense_b = dense.SerializeToString()
    auto = convert(dense, manifest, fmt="auto", timing_inputs=feed, threads=threads)
    auto_b = auto.model.SerializeToString()
    for b in (blocked, auto_b):
        verify(b, feed, [expected], atol=1e-4, rtol=1e-4)
    # Sessions as users run them (ORT's default: idle intra-op threads spin before they park). Back to back,
    # one session's spinning threads would steal the cores of the next (measured: 2-thread dense MLP B=16
    # N=32 19.1 ms interleaved, 9.2 ms alone), so each sample starts after a 20 ms pause and one untimed run.
    # --no-spin times sessions with spinning off instead (no pause needed).
    sessions = harness.sessions({"dense": dense_b, "blocked": blocked, "auto": auto_b}, threads=threads,
                                spin=spin)
    lat = harness.summary(harness.time_sessions(sessions, feed, rounds, pause_s=0.02 if spin else 0.0))
    layer_checks = [{"name": o.name, "fmt": o.fmt, "latencies_ms": o.latencies_ms,
                     "vs_dense": (o.latencies_ms[o.fmt] / o.latencies_ms["dense"]) if o.latencies_ms
                     else None}
                    for o in auto.layers]
    pruned_w = sum(lb.weight.size for lb in manifest)
    all_w = sum(p.numel() for p in model.parameters())
    row = {
        "case": case.name, "block": block, "sparsity": s, "batch": n, "threads": threads,
        "balanced": balanced, "spin": spin,
        # the FLOP limit of the pruned layers, and of the whole model (Amdahl: the rest stays dense)
        "flop_limit": 1 / (1 - s),
        "model_flop_limit": harness.flop_limit(model, xs, {lb.name for lb in manifest}, s),
        "pruned_share_of_weights": pruned_w / all_w,
        "dense_ms": lat["dense"]["median_ms"], "blocked_ms": lat["blocked"]["median_ms"],
        "auto_ms": lat["auto"]["median_ms"],
        "speedup_blocked": lat["dense"]["median_ms"] / lat["blocked"]["median_ms"],
        "speedup_auto": lat["dense"]["median_ms"] / lat["auto"]["median_ms"],
        "bytes": {"dense": len(dense_b), "blocked": len(blocked), "auto": len(auto_b)},
        "auto_layers": layer_checks, "latency_detail": lat,
        "ort_ops_blocked": harness.optimized_ops(blocked, threads),
    }
    row["fraction_of_limit"] = row["speedup_blocked"] / row["flop_limit"]
    row["fraction_of_limit_auto"] = row["speedup_auto"] / row["flop_limit"]
    worst = max((c["vs_dense"] for c in layer_checks if c["vs_dense"]), default=None)
    print(f"{case.name} B={block} s={s} N={n} threads={threads}: dense {row['dense_ms']:.3f} ms, blocked "
          f"{row['blocked_ms']:.3f} ms ({row['speedup_blocked']:.2f}x, limit {row['flop_limit']:.0f}x), auto "
          f"{row['auto_ms']:.3f} ms ({row['speedup_auto']:.2f}x); auto layers "
          f"{[c['fmt'] for c in layer_checks]} worst layer vs dense {worst and round(worst, 3)}; size "
          f"{len(blocked)/len(dense_b):.3f}x", flush=True)
    return row


def main() -> None:
    ap = harness.parser(__doc__, out="onnx_speed.json")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--rounds", type=int, default=15,
                    help="interleaved rounds (7 for the large models at N = 256)")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case names (default: all)")
    ap.add_argument("--unbalanced", action="store_true")
    ap.add_argument("--no-spin", action="store_true", help="time sessions with ORT's thread spinning off")
    args = ap.parse_args()
    clock = harness.Clock()
    print(harness.machine_line(), flush=True)
    wanted = harness.names(args.cases)
    rows = []
    for case in CASES:
        if wanted and not any(w in case.name for w in wanted):
            continue
        for block, s in case.configs:
            for n in harness.ints(args.batches):
                for threads in harness.ints(args.threads):
                    rounds = 7 if case.large and n >= 256 else args.rounds
                    rows.append(measure(case, block, s, n, threads, not args.unbalanced, rounds,
                                        spin=not args.no_spin))
    m = harness.machine()
    meta = {"cpu": m["cpu"], "cpu_flags": m["cpu_flags"], "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": m["onnxruntime"], "rounds": args.rounds,
            "spin": not args.no_spin, "utc": clock.span()}
    harness.write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
