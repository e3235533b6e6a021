"""torch -> ONNX export.

We use torch's torch.export-based exporter (``dynamo=True``), not the TorchScript one: the TorchScript
exporter warns that it is deprecated and will be removed, it renames parameters it folds (``onnx::Conv_35``),
and the torch.export path is what torch maintains. Its graphs keep parameter names for Gemm/Conv weights and
transpose MatMul weights into fresh constants, so :mod:`converters.locate` matches weights by name first
and by value (up to transpose and a per-output-channel scale from folded BatchNorm) after.

Axes kept dynamic: the batch axis (0) of every input, and the sequence axis (1) of inputs named as token
inputs (:data:`TOKEN_INPUTS`: ``input_ids``, ``attention_mask``, ...). torch.export specialises an axis whose
example size is 1, so the example batch must have at least 2 rows (``export_onnx`` refuses fewer); an axis the
model's own code fixes (a reshape to a constant batch) is found in the exported graph and reported in one
line.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import re
import warnings

import onnx

from .errors import ConverterError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
AXIS_NAMES = {0: "batch", 1: "sequence"}


_STATIC = re.compile(r"static shape of (\d+) for dimension inputs\['(\w+)'\]\.shape\[(\d+)\]")


def one_line(e: BaseException) -> str:
    """The line that says what went wrong, without terminal colour codes: the first line of the exporter's
    "Exception summary" when it has one (its first lines are generic advice), else the first line."""
    text = _ANSI.sub("", str(e)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1:]
        lines = rest + lines if rest else lines
    line = lines[0] if lines else type(e).__name__
    return re.sub(r"^<class '[\w.]+'>: ", "", line)


def _fixed_axis_message(e: BaseException) -> str | None:
    m = _STATIC.search(_ANSI.sub("", str(e.__cause__ or e)) + _ANSI.sub("", str(e)))
    if m is None:
        return None
    size, name, axis = m.group(1), m.group(2), int(m.group(3))
    return (f"the model's graph cannot keep axis {axis} ({AXIS_NAMES.get(axis, 'dynamic')}) of input {name} "
            f"dynamic: its code fixes it to {size}")


#: inputs whose axis 1 is a sequence (kept dynamic): Hugging Face's names for token inputs.
TOKEN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def dynamic_axes_for(input_names: list[str], example_inputs: tuple) -> list[tuple[int, ...]]:
    """The axes kept dynamic per input: the batch axis, plus the sequence axis of 2-D token inputs."""
    return [(0, 1) if name in TOKEN_INPUTS and t.dim() == 2 else (0,)
            for name, t in zip(input_names, example_inputs)]


def _fixed_axes(proto: onnx.ModelProto, names: list[str], axes: list[tuple[int, ...]]) -> list[str]:
    """``"input_ids axis 1 (sequence) = 16"`` for every axis meant to be dynamic that the graph fixed."""
    bad = []
    by_name = {vi.name: vi for vi in proto.graph.input}
    for name, ax in zip(names, axes):
        vi = by_name.get(name)
        if vi is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        for a in ax:
            if a < len(dims) and dims[a].HasField("dim_value"):
                bad.append(f"{name} axis {a} ({AXIS_NAMES.get(a, 'dynamic')}) = {dims[a].dim_value}")
    return bad


def export_onnx(model, example_inputs: tuple, *, input_names: list[str] | None = None,
                output_names: list[str] | None = None, opset: int = DEFAULT_OPSET,
                dynamic_axes: list[tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """Export ``model`` (eval mode, on CPU) to an in-memory ONNX model with a dynamic batch axis.

    ``dynamic_axes``: per input, the axes kept dynamic (default: :func:`dynamic_axes_for`). The model given is
    not touched: a deep copy is exported.
    """
    import torch  # lazily: converters never needs torch except to export

    if opset < 17:
        raise ConverterError(f"opset: expected >= 17, got {opset}")
    m = copy.deepcopy(model).cpu().eval()
    args = tuple(t.cpu() for t in example_inputs)
    n = len(args)
    if any(t.dim() == 0 or t.shape[0] < 2 for t in args):
        raise ConverterError("export needs an example batch of at least 2 rows: torch.export fixes an axis "
                             "of size 1 to 1")
    input_names = input_names or (["x"] if n == 1 else [f"x{i}" for i in range(n)])
    output_names = output_names or ["y"]
    axes = dynamic_axes if dynamic_axes is not None else dynamic_axes_for(input_names, args)
    dyn = tuple({a: torch.export.Dim.DYNAMIC for a in ax} for ax in axes)
    params = list(inspect.signature(m.forward).parameters.values())
    if len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        dyn = (dyn,)  # forward(*xs): torch.export sees one argument, the tuple
    sink = io.StringIO()
    noisy = [logging.getLogger(name)
             for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(m, args, dynamo=True, opset_version=opset, input_names=input_names,
                                     output_names=output_names, dynamic_shapes=dyn, verbose=False,
                                     optimize=True, external_data=False)
    except Exception as e:  # noqa: BLE001 -- the exporter raises many types; the message matters
        fixed = _fixed_axis_message(e)
        if fixed:
            raise ConverterError(fixed) from e
        raise ConverterError(f"torch.onnx.export failed: {one_line(e.__cause__ or e)}") from e
    finally:
        for lg, lv in zip(noisy, levels):
            lg.setLevel(lv)
    proto = prog.model_proto
    fixed = _fixed_axes(proto, input_names, axes)
    if fixed:
        raise ConverterError(f"the model's graph cannot keep these axes dynamic: {', '.join(fixed)} (its "
                             "code fixes them; the ONNX model would only run at that size)")
    proto.producer_name = "sapp-compress"
    _strip_paths(proto.graph)
    return proto


#: node metadata the exporter writes that holds file paths of the machine that exported (its stack traces)
PATH_METADATA = ("pkg.torch.onnx.stack_trace",)


def _strip_paths(graph: onnx.GraphProto) -> None:
    """Drop the nodes' :data:`PATH_METADATA` (in subgraphs too): the written model then does not depend on
    where the code was installed (the same run elsewhere writes the same bytes) and does not carry the user's
    paths."""
    for node in graph.node:
        keep = [p for p in node.metadata_props if p.key not in PATH_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _strip_paths(a.g)
            for g in a.graphs:
                _strip_paths(g)
