"""One 4096 x 4096 block-sparse linear layer (B = 16, s = 0.8, balanced random mask) in ONNX Runtime: the
converter's `blocked` graph against an alternative with the activations as MatMul's A operand, at N = 32 and
256, 1 and 2 threads, spinning off and on. A study for the N = 256 shortfall in BENCHMARKS.md section 1.

    python bench/linear_formulations.py [--batches 32,256] [--threads 1,2] [--rounds 9] [--size 4096]

`current`: weights [R, 16, k*16] x gathered activations [R, k*16, N] (MLAS repacks the activations for each
of the R GEMMs of 16 rows). `f2xC`: Gather on [N, C, 16] -> [N, R, k*16] -> Transpose [R, N, k*16] x
pre-transposed weights [R, k*16, 16], in C row chunks. Measured (Intel Xeon 2-core VM, 2026-11-25), speedup
over dense at N = 256: current 1.17x, f2x8 1.15-1.57x, f2x32 1.23-1.46x; at N = 32: current 2.7-2.8x (1
thread), f2 at most 2.04x.
"""
from __future__ import annotations

import harness
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from converters import LayerBlocks, convert, export_onnx
from converters.runtime import session

B, S = 16, 0.8


def model(nodes, inits, I: int, O: int) -> bytes:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", O])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def i64(n, a):
    return nh.from_array(np.array(a, np.int64), n)


def f2(chunks: int, cols: np.ndarray, Wb: np.ndarray, I: int, O: int) -> bytes:
    """The alternative: activations gathered as MatMul's A operand, in ``chunks`` row chunks."""
    R, k = cols.shape
    C = I // B
    nodes = [helper.make_node("Reshape", ["x", "s_ncb"], ["x3"])]
    inits = [i64("s_ncb", [0, C, B])]
    outs = []
    rows_per = R // chunks
    for ci in range(chunks):
        rs = slice(ci * rows_per, (ci + 1) * rows_per)
        nr = rows_per
        inits += [i64(f"c{ci}", cols[rs]), i64(f"s{ci}", [0, nr, k * B]),
                  # [r, (j,bc), br]
                  nh.from_array(Wb[rs].transpose(0, 1, 3, 2).reshape(nr, k * B, B).copy(), f"w{ci}")]
        nodes += [helper.make_node("Gather", ["x3", f"c{ci}"], [f"g{ci}"], axis=1),          # [N, nr, k, bc]
                  helper.make_node("Reshape", [f"g{ci}", f"s{ci}"], [f"g{ci}r"]),           # [N, nr, k*bc]
                  helper.make_node("Transpose", [f"g{ci}r"], [f"g{ci}t"], perm=[1, 0, 2]),  # [nr, N, k*bc]
                  helper.make_node("MatMul", [f"g{ci}t", f"w{ci}"], [f"m{ci}"])]            # [nr, N, br]
        outs.append(f"m{ci}")
    nodes += [helper.make_node("Concat", outs, ["cat"], axis=0),
              helper.make_node("Transpose", ["cat"], ["ct"], perm=[1, 0, 2]),
              helper.make_node("Reshape", ["ct", "s_no"], ["y"])]
    inits.append(i64("s_no", [0, O]))
    return model(nodes, inits, I, O)


def variants(size: int, rng: np.random.Generator) -> tuple[dict[str, bytes], np.ndarray]:
    """Every graph of the study for one ``size`` x ``size`` layer, and its dense weight."""
    I = O = size
    R, C = O // B, I // B
    kept = harness.balanced_kept(rng, R, C, S)
    cols = np.stack([np.flatnonzero(kept[r]) for r in range(R)]).astype(np.int64)
    k = cols.shape[1]
    Wb = rng.normal(size=(R, k, B, B)).astype(np.float32) * 0.05  # [r, j, br, bc]
    W = np.zeros((O, I), np.float32)
    for r in range(R):
        for j, c in enumerate(cols[r]):
            W[r * B:(r + 1) * B, c * B:(c + 1) * B] = Wb[r, j]
    out = {"dense": model([helper.make_node("MatMul", ["x", "wt"], ["y"])], [nh.from_array(W.T.copy(), "wt")],
                          I, O)}
    out.update({f"f2x{c}": f2(c, cols, Wb, I, O) for c in (1, 8, 32) if R % c == 0})
    lin = torch.nn.Linear(I, O, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
    exp = export_onnx(lin, (torch.randn(2, I),), input_names=["x"])
    lb = LayerBlocks(name="weight", layout="linear", weight_shape=(O, I), block=(B, B), kept=kept, weight=W)
    out["current"] = convert(exp, [lb], fmt="blocked").model.SerializeToString()
    out["dense_exported"] = exp.SerializeToString()
    return out, W


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--size", type=int, default=4096, help="the layer's inputs = outputs (a multiple of 16)")
    args = ap.parse_args()
    print(harness.machine_line(), flush=True)
    rng = np.random.default_rng(0)
    graphs, W = variants(args.size, rng)
    batches = harness.ints(args.batches)
    xs = {n: rng.normal(size=(n, args.size)).astype(np.float32) for n in batches}
    ref = xs[batches[0]] @ W.T
    for name, b in graphs.items():
        feed_name = onnx.load_from_string(b).graph.input[0].name
        out = session(b, threads=1).run(None, {feed_name: xs[batches[0]]})[0]
        assert np.allclose(out, ref, atol=1e-3), name
    for n in batches:
        for t in harness.ints(args.threads):
            for spin, pause in ((False, 0.0), (True, 0.02)):
                md = harness.medians(harness.time_sessions(harness.sessions(graphs, threads=t, spin=spin),
                                                           {"x": xs[n]}, args.rounds, pause_s=pause))
                print(f"N={n} t={t} spin={spin}: dense {md['dense']:.2f} ms "
                      + " ".join(f"{k} {md['dense'] / v:.2f}x" for k, v in md.items() if k != "dense"),
                      flush=True)


if __name__ == "__main__":
    main()
