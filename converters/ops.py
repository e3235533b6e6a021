"""Block-sparse compute graphs, one handler per op type, found through :data:`OP_HANDLERS`.

Notation: W [O, I] in PyTorch layout, blocks br x bc, kept grid [R, C] (R = O/br, C = I/bc), k kept blocks per
block-row when balanced, N rows of activations.

Linear (Gemm / MatMul from ``nn.Linear``; N-D inputs are flattened to [N, I] and restored)::

    x [N, I] -Transpose-> [I, N] -Reshape-> [C, bc, N] -Gather(axis 0, cols [R, k])-> [R, k, bc, N]
      -Reshape-> [R, k*bc, N] -MatMul(Wg [R, br, k*bc], .)-> [R, br, N] -Reshape-> [O, N] -Transpose-> [N, O]

Activations stay feature-major between the two Transposes; ONNX Runtime's transpose optimizer cancels the
Transpose pair between consecutive sparse layers (through Relu and other elementwise ops), so a stack of
sparse layers pays for two Transposes in all.

Conv (NCHW, channel blocks)::

    x [N, Cin, *sp] -Gather(axis 1, kept input channels of every output block)-> [N, R*k*bc, *sp]
      -Conv(Wg [O, k*bc, *kernel], group = R)-> [N, O, *sp']

Unbalanced masks: block-rows are sorted by kept count and split into <= 4 buckets (chosen to minimise the
padded work); each bucket is padded to its own maximum with zero blocks and computed as a balanced branch;
the branches are concatenated and one Gather restores the row (channel) order.

Linear branches are further cut into chunks of consecutive block-rows whose gathered activations
``[rows, k*bc, N]`` take about :data:`CHUNK_BYTES` at N = :data:`REFERENCE_BATCH` (the batch is dynamic, so a
fixed reference): one Gather of the whole layer replicates every input block ``R*k/C`` times (51x for a
4096x4096 layer at B = 16, s = 0.8: 27 MB at N = 32), which then streams through memory twice; chunks stay in
cache between their Gather and MatMul (faster from N = 32 up, slower at N = 1: more nodes). Chunk outputs
``[rows, br, N]`` are joined by one Concat and reshaped to ``[O, N]`` once.

N-D inputs (a transformer's ``[batch, sequence, I]``, M = batch x sequence rows) differ in two ways:

- chunks are sized for :data:`REFERENCE_TOKENS` rows, since M is hundreds to thousands. At B = 16,
  s = 0.8 that is one block-row per chunk.
- the Gather takes feature rows (index ``c*bc + e``) from ``x^T [I, M]`` straight into ``[rows, k*bc, M]``, so
  a chunk is two nodes (Gather, MatMul) instead of four (each node costs time). The file keeps the block ids
  (8 bytes per block); the feature ids are computed from them by constant nodes (Mul, Add, Reshape) that ONNX
  Runtime folds when it loads the model.

The measurements behind these choices, the N-D alternatives measured and not adopted, and why blocked gains
less on transformers than on MLPs (the gathered activations' memory traffic): BENCHMARKS.md section 19.1.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import GraphIndex, attr, const_i64, tensor
from .locate import Site
from .rewrite import Rewrite

MAX_BUCKETS = 4
CHUNK_BYTES = 1 << 20  # gathered activations per linear chunk at REFERENCE_BATCH
REFERENCE_BATCH = 32
#: rows of activations a chunk is sized for when the linear's input is N-D (``[batch, sequence, features]``):
#: a transformer's M = batch x sequence is hundreds to thousands of rows, not 32
REFERENCE_TOKENS = 1024


def buckets(counts: np.ndarray, max_buckets: int = MAX_BUCKETS) -> list[np.ndarray]:
    """Split rows into <= ``max_buckets`` groups of similar kept counts, minimising
    ``sum(len(group) * max(count in group))`` (exact, by dynamic programming over the sorted counts).
    Returns arrays of row ids; a balanced mask gives one group."""
    order = np.argsort(counts, kind="stable")
    c = np.maximum(counts[order], 1)
    n = len(c)
    inf = float("inf")
    cost = np.full((max_buckets + 1, n + 1), inf)
    cut = np.zeros((max_buckets + 1, n + 1), dtype=int)
    cost[0, 0] = 0.0
    for b in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            # the last bucket is rows i..j-1 (sorted), costing (j - i) * c[j - 1]
            cand = cost[b - 1, :j] + (j - np.arange(j)) * c[j - 1]
            i = int(np.argmin(cand))
            cost[b, j], cut[b, j] = cand[i], i
    b = int(np.argmin(cost[1:, n])) + 1
    groups, j = [], n
    while b > 0:
        i = cut[b, j]
        groups.append(order[i:j])
        j, b = i, b - 1
    return [g for g in reversed(groups) if len(g)]


def chunk_rows(groups: list[np.ndarray], kept: np.ndarray, bc: int,
               n_ref: int | None = None) -> list[np.ndarray]:
    """Cut every group of block-rows into consecutive pieces whose gathered activations ``[rows, k*bc, N]``
    (k = the group's padded kept count) take at most :data:`CHUNK_BYTES` at N = ``n_ref`` rows of activations
    (default :data:`REFERENCE_BATCH`)."""
    out = []
    for g in groups:
        k = max(1, int(kept[g].sum(axis=1).max()))
        rows = max(1, CHUNK_BYTES // (k * bc * (n_ref or REFERENCE_BATCH) * 4))
        out += [g[i : i + rows] for i in range(0, len(g), rows)]
    return out


def _gather_plan(kept: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For block-rows ``rows``: kept column ids padded to the group's max ``k`` ([len(rows), k]) and a
    validity mask (padding points at column 0 and gets zero weights)."""
    k = max(1, int(kept[rows].sum(axis=1).max()))
    cols = np.zeros((len(rows), k), dtype=np.int64)
    valid = np.zeros((len(rows), k), dtype=bool)
    for i, r in enumerate(rows):
        c = np.flatnonzero(kept[r])
        cols[i, : len(c)] = c
        valid[i, : len(c)] = True
    return cols, valid


class _Builder:
    """Collects nodes and initializers with fresh names."""

    def __init__(self, idx: GraphIndex, base: str) -> None:
        self.idx, self.base = idx, base
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.value_tensors: list[str] = []
        self.stored = 0

    def name(self, s: str) -> str:
        return self.idx.fresh(f"{self.base}_{s}")

    def const(self, s: str, a: np.ndarray, weights: bool = False) -> str:
        n = self.name(s)
        self.inits.append(tensor(n, a))
        self.stored += a.nbytes
        if weights:
            self.value_tensors.append(n)
        return n

    def flatten_leading(self, x: str, features_in: int, features_out: int) -> tuple[str, str]:
        """``x [*, I] -> [M, I]`` and the shape ``[*, O]`` to restore at the end
        (``Shape -> Slice -> Concat``, the pattern :func:`converters.chain.feature_major` recognises)."""
        shp = self.node("Shape", [x])
        lead = self.node("Slice", [shp, self.const("s0", const_i64([0])), self.const("s1", const_i64([-1]))])
        out_shape = self.node("Concat", [lead, self.const("o", const_i64([features_out]))], axis=0)
        return self.node("Reshape", [x, self.const("flat", const_i64([-1, features_in]))]), out_shape

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out


class LinearHandler:
    """Gemm (``x W^T + b``, transB=1) and MatMul (``x @ W^T``, W^T stored or via a Transpose node)."""

    def reason_not_blocked(self, site: Site) -> str | None:
        if site.layer.layout != "linear":
            return f"layout {site.layer.layout} on a {site.node.op_type}"
        if site.layer.padded:
            return "the block does not divide the weight (padded): blocked needs whole blocks"
        return None

    def blocked(self, site: Site, idx: GraphIndex) -> Rewrite:
        lb, node = site.layer, site.node
        w = site.weight
        O, I = w.shape
        br, bc = lb.block
        R, C = lb.kept.shape
        b = _Builder(idx, site.init_name)
        x = node.input[0]
        nd_input = node.op_type == "MatMul"
        if nd_input:  # [*, I] -> [M, I]; the leading shape comes back at the end
            x, out_shape = b.flatten_leading(x, I, O)
        xt = b.node("Transpose", [x], perm=[1, 0])
        groups = chunk_rows(buckets(lb.kept.sum(axis=1)), lb.kept, bc, REFERENCE_TOKENS if nd_input else None)
        if nd_input:  # feature rows gathered straight into [rows, k*bc, M]: no Reshape per chunk (see below)
            src = xt
            bc_c, span = b.const("bc", const_i64(bc)), b.const("span", np.arange(bc, dtype=np.int64))
        else:
            src = b.node("Reshape", [xt, b.const("cbn", const_i64([C, bc, -1]))])
        wv = w.reshape(R, br, C, bc)
        outs = []
        for gi, rows in enumerate(groups):
            cols, valid = _gather_plan(lb.kept, rows)
            k = cols.shape[1]
            wg = wv[rows[:, None], :, cols, :]  # [Rb, k, br, bc]
            wg = np.where(valid[:, :, None, None], wg, 0.0)
            wg = wg.transpose(0, 2, 1, 3).reshape(len(rows), br, k * bc)
            if nd_input:
                # feature index c*bc + e of every kept column, computed from the block ids by constant nodes
                # that ORT folds at load: the file keeps 8 bytes per block, the graph one node per chunk
                feat = b.node("Add", [b.node("Mul", [b.const(f"cols{gi}", cols[:, :, None]), bc_c]), span])
                feat = b.node("Reshape", [feat, b.const(f"rk{gi}", const_i64([len(rows), k * bc]))])
                g = b.node("Gather", [src, feat], axis=0)
            else:
                g = b.node("Gather", [src, b.const(f"cols{gi}", cols)], axis=0)
                g = b.node("Reshape", [g, b.const(f"rkn{gi}", const_i64([len(rows), k * bc, -1]))])
            outs.append(b.node("MatMul", [b.const(f"w{gi}", wg.astype(np.float32), weights=True), g]))
        # chunks are [rows, br, N]: joined (and put back in row order) per block-row, then one Reshape
        order = np.concatenate(groups)
        o = outs[0] if len(outs) == 1 else b.node("Concat", outs, axis=0)
        if not np.array_equal(order, np.arange(R)):
            o = b.node("Gather", [o, b.const("row_order", np.argsort(order).astype(np.int64))], axis=0)
        o = b.node("Reshape", [o, b.const("on", const_i64([O, -1]))])
        final = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        y = b.node("Transpose", [o], None if (has_bias or nd_input) else final, perm=[1, 0])
        if has_bias:
            y = b.node("Add", [y, node.input[2]], None if nd_input else final)
        if nd_input:
            b.node("Reshape", [y, out_shape], final)
        drop = [site.via_transpose] if site.via_transpose is not None else []
        return Rewrite("blocked", nodes=b.nodes, inits=b.inits, replace_node=node, drop_nodes=drop,
                       drop_init=site.init_name, value_tensors=b.value_tensors, stored_bytes=b.stored)


class ConvHandler:
    """Conv with channel blocks (groups = 1): Gather of input channels + grouped Conv."""

    def reason_not_blocked(self, site: Site) -> str | None:
        if site.layer.layout != "conv_channel":
            return f"layout {site.layer.layout}: blocked conv needs channel blocks (--conv-layout channel)"
        if site.layer.padded:
            return "the block does not divide the channels (padded): blocked needs whole blocks"
        if attr(site.node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "Conv with auto_pad is not rewritten"
        return None

    def blocked(self, site: Site, idx: GraphIndex, channels_last_gather: bool = False) -> Rewrite:
        """``channels_last_gather``: gather whole blocks of ``bc`` channels of the input moved to the last
        axis, between a Transpose pair (``x -> [N, *sp, C/bc, bc] -Gather(axis -2)-> -> [N, C', *sp]``). In
        ORT's QDQ int8 graphs, whose QLinearConvs its NHWC transformer runs channels-last, the pair cancels
        against the Transposes that transformer puts around each conv (two per blocked conv otherwise), so the
        Gather runs channels-last with no Transpose at all (see :mod:`converters.qdq`); in fp32 the pair would
        be pure cost. Whole blocks, not single channels: a Gather on the last axis copies its pieces one by
        one (measured: BENCHMARKS.md section 19.2)."""
        lb, node = site.layer, site.node
        w = site.weight
        O, Cin, *kernel = w.shape
        br, bc = lb.block
        R, C = lb.kept.shape
        b = _Builder(idx, site.init_name)
        wv = w.reshape(R, br, C, bc, *kernel)
        keep_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                      if a.name in ("pads", "strides", "dilations", "kernel_shape")}
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        groups = buckets(lb.kept.sum(axis=1))
        single = len(groups) == 1 and np.array_equal(groups[0], np.arange(R))
        outs = []
        for gi, rows in enumerate(groups):
            cols, valid = _gather_plan(lb.kept, rows)
            k = cols.shape[1]
            chans = (cols[:, :, None] * bc + np.arange(bc)).reshape(-1).astype(np.int64)
            wg = wv[rows[:, None], :, cols]  # [Rb, k, br, bc, *kernel]
            wg = np.where(valid.reshape(*valid.shape, *([1] * (2 + len(kernel)))), wg, 0.0)
            wg = np.moveaxis(wg, 2, 1).reshape(len(rows) * br, k * bc, *kernel)
            if channels_last_gather:  # whole blocks of bc channels, bc values a copy: [N, *sp, C/bc, bc]
                r = 2 + len(kernel)
                if gi == 0:
                    x_last = b.node("Transpose", [node.input[0]], perm=[0, *range(2, r), 1])
                    x_last = b.node("Reshape",
                                    [x_last, b.const("nsp_cb", const_i64([0] * (r - 1) + [C, bc]))])
                xg = b.node("Gather", [x_last, b.const(f"blocks{gi}", cols.reshape(-1).astype(np.int64))],
                            axis=r - 1)
                xg = b.node("Reshape", [xg, b.const(f"nsp_c{gi}", const_i64([0] * (r - 1) + [-1]))])
                xg = b.node("Transpose", [xg], perm=[0, r - 1, *range(1, r - 1)])
            else:
                xg = b.node("Gather", [node.input[0], b.const(f"chans{gi}", chans)], axis=1)
            inputs = [xg, b.const(f"w{gi}", wg.astype(np.float32), weights=True)]
            if bias is not None:
                if single:
                    inputs.append(bias)
                else:
                    bsel = (rows[:, None] * br + np.arange(br)).reshape(-1)
                    inputs.append(b.const(f"b{gi}", idx.array(bias)[bsel].astype(np.float32)))
            out = node.output[0] if single else None
            outs.append(b.node("Conv", inputs, out, group=len(rows), **keep_attrs))
        if not single:
            o = b.node("Concat", outs, axis=1)
            order = np.concatenate([(r[:, None] * br + np.arange(br)).reshape(-1) for r in groups])
            b.node("Gather", [o, b.const("chan_order", np.argsort(order).astype(np.int64))], node.output[0],
                   axis=1)
        return Rewrite("blocked", nodes=b.nodes, inits=b.inits, replace_node=node, drop_init=site.init_name,
                       value_tensors=b.value_tensors, stored_bytes=b.stored)


#: op type -> handler of its block-sparse (``blocked``) formulation.
OP_HANDLERS: dict[str, LinearHandler | ConvHandler] = {
    "Gemm": LinearHandler(), "MatMul": LinearHandler(), "Conv": ConvHandler(),
}
