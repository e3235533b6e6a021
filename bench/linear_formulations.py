"""One 4096 x 4096 block-sparse linear layer (B = 16, s = 0.8, balanced random mask) in ONNX Runtime: the
converter's `blocked` graph against an alternative with the activations as MatMul's A operand, at N = 32 and
256, 1 and 2 threads, spinning off and on. A study for the N = 256 shortfall in BENCHMARKS.md section 1.

    python bench/linear_formulations.py

`current`: weights [R, 16, k*16] x gathered activations [R, k*16, N] (MLAS repacks the activations for each
of the R GEMMs of 16 rows). `f2xC`: Gather on [N, C, 16] -> [N, R, k*16] -> Transpose [R, N, k*16] x
pre-transposed weights [R, k*16, 16], in C row chunks. Measured (Intel Xeon 2-core VM, 2026-11-25), speedup
over dense at N = 256: current 1.17x, f2x8 1.15-1.57x, f2x32 1.23-1.46x; at N = 32: current 2.7-2.8x (1 thread),
f2 at most 2.04x.
"""
import sys, statistics
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, TensorProto, numpy_helper as nh
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from converters.runtime import interleaved_samples, session
I = O = 4096; B = 16; s = 0.8
R, C = O // B, I // B; k = round((1 - s) * C)
rng = np.random.default_rng(0)
cols = np.stack([np.sort(rng.choice(C, k, replace=False)) for _ in range(R)]).astype(np.int64)
W = np.zeros((O, I), np.float32)
Wb = rng.normal(size=(R, k, B, B)).astype(np.float32) * 0.05  # [r, j, br, bc]
for r in range(R):
    for j, c in enumerate(cols[r]):
        W[r*B:(r+1)*B, c*B:(c+1)*B] = Wb[r, j]
def model(nodes, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", O])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
i64 = lambda n, a: nh.from_array(np.array(a, np.int64), n)
dense = model([helper.make_node("MatMul", ["x", "wt"], ["y"])], [nh.from_array(W.T.copy(), "wt")])
def f2(chunks):
    nodes = [helper.make_node("Reshape", ["x", "s_ncb"], ["x3"])]
    inits = [i64("s_ncb", [0, C, B])]
    outs = []
    rows_per = R // chunks
    for ci in range(chunks):
        rs = slice(ci*rows_per, (ci+1)*rows_per); nr = rows_per
        inits += [i64(f"c{ci}", cols[rs]), i64(f"s{ci}", [0, nr, k*B]),
                  nh.from_array(Wb[rs].transpose(0, 1, 3, 2).reshape(nr, k*B, B).copy(), f"w{ci}")]  # [r, (j,bc), br]
        nodes += [helper.make_node("Gather", ["x3", f"c{ci}"], [f"g{ci}"], axis=1),          # [N, nr, k, bc]
                  helper.make_node("Reshape", [f"g{ci}", f"s{ci}"], [f"g{ci}r"]),           # [N, nr, k*bc]
                  helper.make_node("Transpose", [f"g{ci}r"], [f"g{ci}t"], perm=[1, 0, 2]),  # [nr, N, k*bc]
                  helper.make_node("MatMul", [f"g{ci}t", f"w{ci}"], [f"m{ci}"])]            # [nr, N, br]
        outs.append(f"m{ci}")
    nodes += [helper.make_node("Concat", outs, ["cat"], axis=0),
              helper.make_node("Transpose", ["cat"], ["ct"], perm=[1, 0, 2]),
              helper.make_node("Reshape", ["ct", "s_no"], ["y"])]
    inits.append(i64("s_no", [0, O]))
    return model(nodes, inits)
variants = {"dense": dense, "f2x1": f2(1), "f2x8": f2(8), "f2x32": f2(32)}  # noqa: E501

from converters import convert
from converters.manifest import LayerBlocks
kept = np.zeros((R, C), bool)
for r in range(R): kept[r, cols[r]] = True
lb = LayerBlocks(name="fc.weight", layout="linear", weight_shape=(O, I), block=(B, B), kept=kept, weight=W)
import torch
from converters import export_onnx
lin = torch.nn.Linear(I, O, bias=False)
with torch.no_grad(): lin.weight.copy_(torch.from_numpy(W))
lb = LayerBlocks(name="weight", layout="linear", weight_shape=(O, I), block=(B, B), kept=kept, weight=W)
exp = export_onnx(lin, (torch.randn(2, I),))
old_in = exp.graph.input[0].name
exp.graph.input[0].name = "x"
for nd in exp.graph.node:
    for i, nm in enumerate(nd.input):
        if nm == old_in: nd.input[i] = "x"
variants["current"] = convert(exp, [lb], fmt="blocked").model.SerializeToString()
variants["dense_exported"] = exp.SerializeToString()
xs = {n: rng.normal(size=(n, I)).astype(np.float32) for n in (32, 256)}
ref = xs[32] @ W.T
for k2, b in variants.items():
    feed_name = onnx.load_from_string(b).graph.input[0].name
    out = session(b, threads=1).run(None, {feed_name: xs[32]})[0]
    assert np.allclose(out, ref, atol=1e-3), k2
for n in (32, 256):
    for t in (1, 2):
        for spin, pause in ((False, 0.0), (True, 0.02)):
            ss = {k2: session(b, threads=t, spin=spin) for k2, b in variants.items()}
            smp = interleaved_samples(ss, {"x": xs[n]}, min_rounds=9, max_rounds=9, budget_s=0, loop_s=0.05, pause_s=pause)
            md = {k2: statistics.median(v) for k2, v in smp.items()}
            print(f"N={n} t={t} spin={spin}: dense {md['dense']:.2f} ms " + " ".join(f"{k2} {md['dense']/v:.2f}x" for k2, v in md.items() if k2 != "dense"), flush=True)
