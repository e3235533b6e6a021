"""Reading a converted model: the achieved sparsity, measured from the weights in the final bytes."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .convert import METADATA_KEY
from .errors import ConverterError


@dataclass(frozen=True)
class SparsityReport:
    """``1 - (non-zero stored weight values) / (dense weight count)`` over the pruned layers."""

    overall: float
    per_layer: dict[str, float]
    stored_nonzero: int
    dense_count: int


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for sp in model.graph.sparse_initializer:
        vals[sp.values.name] = numpy_helper.to_array(sp.values)
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "sparse_value":
                vals[a.sparse_tensor.values.name] = numpy_helper.to_array(a.sparse_tensor.values)
    return vals


def measure_sparsity(model: onnx.ModelProto | bytes, layers=None) -> SparsityReport:
    """Count, for every pruned layer recorded in the model's metadata, the non-zero weight values actually
    stored (kept blocks, dense leftovers, sparse values) against the dense size."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    meta = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    if meta is None:
        raise ConverterError("the model has no sapp-compress layer metadata (was it made by convert?)")
    entries = json.loads(meta)
    if layers is not None and [e["name"] for e in entries] != [lb.name for lb in layers]:
        raise ConverterError("the model's layer metadata does not list the manifest's layers")
    vals = _values(proto)
    per, nnz_all, total_all = {}, 0, 0
    for e in entries:
        total = int(np.prod(e["weight_shape"]))
        missing = [v for v in e["values"] if v not in vals]
        if missing:
            raise ConverterError(f"{e['name']}: value tensors {missing} are not in the model")
        nnz = int(sum(np.count_nonzero(vals[v]) for v in e["values"]))
        per[e["name"]] = 1.0 - nnz / total
        nnz_all += nnz
        total_all += total
    overall = 1.0 - nnz_all / total_all if total_all else 0.0
    return SparsityReport(overall, per, nnz_all, total_all)
