"""One layer's changes to a graph (:class:`Rewrite`) and how they are applied (:func:`apply`).

The lowest layer of the rewrites: the op handlers (:mod:`converters.ops`), the formulations
(:mod:`converters.formulations`, :mod:`converters.int8`), the QDQ pass (:mod:`converters.qdq`) and
:func:`converters.convert` all build or apply rewrites, and this module imports none of them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import onnx


@dataclass
class Rewrite:
    """Changes to one graph for one layer.

    ``replace_node``: the consumer node the new ``nodes`` replace (blocked), or None (the new nodes only
    produce the weight tensor and go first). ``value_tensors`` name the tensors that hold the layer's weight
    values in the result (the sparsity measurement reads them).
    """

    fmt: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    replace_node: onnx.NodeProto | None = None
    drop_nodes: list[onnx.NodeProto] = field(default_factory=list)
    drop_init: str | None = None
    value_tensors: list[str] = field(default_factory=list)
    stored_bytes: int = 0


def apply(model: onnx.ModelProto, rewrite: Rewrite) -> None:
    """Apply one rewrite to ``model`` in place. The replaced initializer is always removed: blocked
    rewrites were its only consumer (``locate`` checks), and compact / sparse-initializer rewrites produce
    a tensor of the same name."""
    g = model.graph
    nodes = list(g.node)
    if rewrite.replace_node is not None:
        pos = next(i for i, n in enumerate(nodes) if n is rewrite.replace_node)
        nodes[pos : pos + 1] = rewrite.nodes
    else:
        nodes = rewrite.nodes + nodes
    dropped = {id(n) for n in rewrite.drop_nodes}
    nodes = [copy.deepcopy(n) for n in nodes if id(n) not in dropped]
    del g.node[:]
    g.node.extend(nodes)
    if rewrite.drop_init:
        # deleted in place: re-adding the others would copy every weight into the model's protobuf arena,
        # which frees nothing until the whole model goes (2 GB kept alive for a 4-layer BERT-base)
        for i in reversed([i for i, t in enumerate(g.initializer) if t.name == rewrite.drop_init]):
            del g.initializer[i]
        # a stale type annotation of the old dense tensor would contradict its new producer
        for field_ in (g.value_info, g.input):
            stale = [v for v in field_ if v.name == rewrite.drop_init]
            for v in stale:
                field_.remove(v)
    g.initializer.extend(rewrite.inits)

