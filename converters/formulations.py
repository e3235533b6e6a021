"""The ways a pruned weight can be stored and computed in ONNX, behind :data:`FORMULATIONS`.

Each formulation turns a :class:`~converters.locate.Site` into a :class:`Rewrite` or says why it cannot.

- ``dense``: unchanged.
- ``sparse-initializer``: the weight becomes a ``SparseTensorProto`` (COO, sorted int64 linear indices) held
  by a ``Constant`` node's ``sparse_value``. Only the file shrinks: ONNX Runtime densifies it at load. (A
  ``graph.sparse_initializer`` feeding Gemm/MatMul/Conv passes ``onnx.checker`` but fails its
  ``full_check``: strict type inference gives it type ``sparse_tensor(float)``, which those ops do not
  accept. The Constant form is valid under both and runs the same in ORT.)
- ``compact``: the kept blocks as an ordinary initializer ``[nnz, br, bc(, taps)]`` plus one int64 linear
  block index each; ``ConstantOfShape -> ScatterND (unique indices, no reduction) -> Transpose -> Reshape``
  rebuilds the dense weight under the original name, and ORT constant-folds that at load. Runtime = dense,
  file = compact.
- ``blocked``: only kept blocks, computed block-sparse; the op handler of the consumer
  (:mod:`converters.ops`) builds the graph.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from .graph import GraphIndex, const_i64, tensor
from .locate import Site, shared_reason
from .manifest import element_mask, view_of
from .ops import OP_HANDLERS
from .rewrite import Rewrite


def stored_layout(site: Site, w: np.ndarray) -> np.ndarray:
    """PyTorch-layout array -> the initializer's layout."""
    return w.T if site.stored == "IO" else w


class Formulation:
    name: str
    #: the precision of the stored weights: ``fp32``, or ``int8`` (:mod:`converters.int8`); ``convert``
    #: considers int8 formulations only when asked to quantize
    precision: str = "fp32"
    #: ORT turns this formulation into the dense op at load (constant folding / densifying), so its
    #: runtime is the dense one by construction; ``auto`` times it but ranks it by the group's latency
    folds_to_dense: bool = True

    def reason_not(self, site: Site) -> str | None:
        """Why this formulation does not apply to ``site`` (None when it does)."""
        return None

    def build(self, site: Site, idx: GraphIndex) -> Rewrite:
        raise NotImplementedError


class Dense(Formulation):
    name = "dense"

    def build(self, site, idx):
        return Rewrite("dense", value_tensors=[site.init_name], stored_bytes=site.weight.nbytes)


class SparseInitializer(Formulation):
    name = "sparse-initializer"

    def build(self, site, idx):
        dense = stored_layout(site, site.weight)
        mask = stored_layout(site, element_mask(site.layer))
        flat = np.flatnonzero(mask.reshape(-1)).astype(np.int64)  # sorted, as the checker requires
        values_name = idx.fresh(f"{site.init_name}_values")
        values = tensor(values_name, dense.reshape(-1)[flat].astype(np.float32))
        indices = tensor(idx.fresh(f"{site.init_name}_indices"), flat)
        sp = helper.make_sparse_tensor(values, indices, list(dense.shape))
        node = helper.make_node("Constant", [], [site.init_name], name=idx.fresh("sparse_weight"),
                                sparse_value=sp)
        return Rewrite("sparse-initializer", nodes=[node], drop_init=site.init_name,
                       value_tensors=[values_name], stored_bytes=flat.size * 12)


class Compact(Formulation):
    name = "compact"

    def build(self, site, idx):
        return self.rewrite(site, idx)

    def rewrite(self, site: Site, idx: GraphIndex, values: np.ndarray | None = None, out: str | None = None,
                dtype=np.float32) -> Rewrite:
        """The compact rewrite of ``values`` (default: the site's weight; PyTorch layout, pruned blocks exact
        zeros) stored as ``dtype``, rebuilding the tensor ``out`` (default: the site's initializer name).
        :mod:`converters.qdq` uses it for the int8 weights of a QDQ conv."""
        lb = site.layer
        br, bc = lb.block
        R, C = lb.kept.shape
        rows, cols = lb.view_shape
        v = view_of(lb, site.weight if values is None else values)
        tail = v.shape[2:]  # (taps,) for conv_channel, () otherwise
        pad = [(0, R * br - rows), (0, C * bc - cols)] + [(0, 0)] * len(tail)
        vb = np.pad(v, pad).reshape(R, br, C, bc, *tail).swapaxes(1, 2)  # [R, C, br, bc, *tail]
        rc = np.argwhere(lb.kept)  # row-major: unique, sorted
        blocks = np.ascontiguousarray(vb[rc[:, 0], rc[:, 1]]).astype(dtype)
        flat = (rc[:, 0] * C + rc[:, 1]).astype(np.int64)[:, None]  # 8 bytes per kept block
        base = out or site.init_name
        n = lambda s: idx.fresh(f"{base}_{s}")  # noqa: E731
        b_name, i_name, shape_name = n("blocks"), n("block_idx"), n("grid_shape")
        zeros, scat, tr = n("zeros"), n("scatter"), n("blocked_view")
        perm = (0, 2, 1, 3, *range(4, 4 + len(tail)))
        nodes = [
            helper.make_node("ConstantOfShape", [shape_name], [zeros],
                             value=helper.make_tensor("v", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                      [1], [0])),
            helper.make_node("ScatterND", [zeros, i_name, b_name], [scat]),  # unique indices: no reduction
        ]
        inits = [tensor(b_name, blocks), tensor(i_name, flat),
                 tensor(shape_name, const_i64((R * C, br, bc, *tail)))]
        grid = self._reshape(nodes, inits, n, scat, (R, C, br, bc, *tail))
        nodes.append(helper.make_node("Transpose", [grid], [tr], perm=list(perm)))
        cur = tr
        view_shape = (R * br, C * bc, *tail)
        cur = self._reshape(nodes, inits, n, cur, view_shape)
        if (R * br, C * bc) != (rows, cols):
            sliced = n("unpadded")
            st, en, ax = n("starts"), n("ends"), n("axes")
            inits += [tensor(st, const_i64([0, 0])), tensor(en, const_i64([rows, cols])),
                      tensor(ax, const_i64([0, 1]))]
            nodes.append(helper.make_node("Slice", [cur, st, en, ax], [sliced]))
            cur = sliced
        out = base
        final_reshape_target = out if site.stored == "OI" else n("weight_oi")
        if lb.layout == "conv_tap":
            o, c, *taps = lb.weight_shape
            cur = self._reshape(nodes, inits, n, cur, (o, *taps, c))
            inv = (0, len(lb.weight_shape) - 1, *range(1, len(lb.weight_shape) - 1))
            nodes.append(helper.make_node("Transpose", [cur], [final_reshape_target], perm=list(inv)))
        else:
            self._reshape(nodes, inits, n, cur, lb.weight_shape, out=final_reshape_target)
        if site.stored == "IO":
            nodes.append(helper.make_node("Transpose", [final_reshape_target], [out], perm=[1, 0]))
        return Rewrite("compact", nodes=nodes, inits=inits, drop_init=base, value_tensors=[b_name],
                       stored_bytes=blocks.nbytes + flat.nbytes)

    @staticmethod
    def _reshape(nodes, inits, n, src, shape, out=None):
        out = out or n("reshaped")
        s = n("shape")
        inits.append(tensor(s, const_i64(shape)))
        nodes.append(helper.make_node("Reshape", [src, s], [out]))
        return out


class Blocked(Formulation):
    name = "blocked"
    folds_to_dense = False

    def reason_not(self, site):
        if shared_reason(site):
            return shared_reason(site)
        handler = OP_HANDLERS.get(site.node.op_type)
        if handler is None:
            return f"no block-sparse handler for {site.node.op_type}"
        return handler.reason_not_blocked(site)

    def build(self, site, idx):
        return OP_HANDLERS[site.node.op_type].blocked(site, idx)


#: formulation name -> formulation; ``auto`` (in :mod:`converters.convert`) chooses among these per layer.
FORMULATIONS: dict[str, Formulation] = {f.name: f
                                        for f in (Blocked(), Compact(), SparseInitializer(), Dense())}
