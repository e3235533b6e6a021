"""ONNX Runtime's fused ``SkipLayerNormalization`` against ``Sum`` + ``LayerNormalization`` (what
``converters/passes.py``'s ``unfused_layernorm`` writes), one residual add and norm of a BERT-base-shaped
encoder layer, at the shapes of the structured benchmark.

    python bench/skip_layernorm.py [--batches 1,8] [--seq 128] [--hidden 768] [--rounds 15]

Two one-node-pair graphs with the same function: ``Add(x, r) -> LayerNormalization`` (ORT's default graph
optimisations fuse it into ``SkipLayerNormalization``: the script checks that they did) and ``Sum(x, r) ->
LayerNormalization`` (left as is), timed interleaved in one process, 1 thread, median of ``--rounds``.
Results: bench/results/skip_layernorm.json.
"""
from __future__ import annotations

import sys

import harness
import numpy as np
from harness import (
    machine,
    machine_line,
    medians,
    optimized_ops,
    parser,
    sessions,
    time_sessions,
    write_results,
)
from onnx import TensorProto, helper


def graph(op: str, hidden: int) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", hidden])
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", "T", hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", hidden])
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("g", TensorProto.FLOAT, [hidden],
                                rng.standard_normal(hidden).astype(np.float32)),
             helper.make_tensor("b", TensorProto.FLOAT, [hidden],
                                rng.standard_normal(hidden).astype(np.float32))]
    nodes = [helper.make_node(op, ["x", "r"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-12)]
    g = helper.make_graph(nodes, op, [x, r], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    ap = parser(__doc__, "skip_layernorm.json")
    ap.add_argument("--batches", default="1,8", type=harness.ints)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(sys.argv[1:])
    print(f"machine: {machine_line()}; ONNX Runtime 1 thread", flush=True)
    models = {"add_fused": graph("Add", a.hidden), "sum_unfused": graph("Sum", a.hidden)}
    ops = {k: optimized_ops(v, 1) for k, v in models.items()}
    print(f"kernels after ORT's optimisations: {ops}")
    rows = []
    sess = sessions(models)
    for n in a.batches:
        rng = np.random.default_rng(n)
        feed = {k: rng.standard_normal((n, a.seq, a.hidden)).astype(np.float32) for k in ("x", "r")}
        outs = {k: s.run(None, feed)[0] for k, s in sess.items()}
        diff = float(np.abs(outs["add_fused"] - outs["sum_unfused"]).max())
        ms = medians(time_sessions(sess, feed, a.rounds))
        row = {"batch": n, "seq": a.seq, "hidden": a.hidden, "ms": ms,
               "ratio": ms["add_fused"] / ms["sum_unfused"], "max_abs_diff": diff}
        rows.append(row)
        print(f"batch {n}: fused SkipLayerNormalization {ms['add_fused']:.3f} ms, Sum + LayerNormalization "
              f"{ms['sum_unfused']:.3f} ms ({row['ratio']:.2f}x); outputs differ by {diff:.1e}", flush=True)
    write_results(a.out, {"machine": machine(), "kernels": ops, "rounds": a.rounds, "rows": rows})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
