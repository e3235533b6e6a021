"""The exported graph carries no file path of the machine that exported it (the exporter writes each node's
Python stack trace into its metadata): the same model exported from code installed elsewhere gives the same
bytes, and a shipped model does not carry its user's paths."""
from __future__ import annotations

import torch
from torch import nn

from converters import export_onnx
from converters.export import PATH_METADATA


def test_no_stack_traces_in_the_exported_nodes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 8, 8))
    proto = export_onnx(model.eval(), (torch.randn(2, 3, 8, 8),))
    keys = {p.key for n in proto.graph.node for p in n.metadata_props}
    assert keys and not keys & set(PATH_METADATA), keys  # the rest of the exporter's metadata stays
    assert not any('File "' in p.value for n in proto.graph.node for p in n.metadata_props)
