"""Between the user's model and the tool: inputs by position or keyword in, one tensor out.

The engine, the exporter and ONNX Runtime all see a model as ``f(*tensors) -> tensor``. Library models are
not shaped like that: a Hugging Face model takes ``input_ids=..., attention_mask=...`` and returns a
``ModelOutput``; others return dicts or tuples. :func:`adapt` probes the model once on two samples of the
shard and, when needed, wraps it in :class:`ModelIO`, which passes the shard's arrays by keyword (when they
are named after forward arguments) and picks one output tensor by the rules of :data:`OUTPUT_RULES`:

===============================  ===============================================================
model output                     tensor used (``OutputInfo.key``)
===============================  ===============================================================
a tensor                         itself (``"tensor"``)
mapping / ``ModelOutput``        ``logits`` if present, else the first tensor value (its key)
tuple / list                     the first tensor (``"0"``)
===============================  ===============================================================

An output named ``logits`` (or a bare tensor) is scored as classes when it is wider than 1; any other named
output (``last_hidden_state``, ``pooler_output``, embeddings) is a *feature* output, distilled and scored as
features (:mod:`sapp_compress.io.tasks`). The wrapper holds the model as its child ``inner``: parameter names
seen by the planner, the masks, the manifest and the report are the model's own (:func:`unwrap`), and the
exported graph's initializers are renamed back (:func:`strip_prefix`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from calib_data.shards import Shard

from ..errors import DataError, ModelLoadError
from .feeds import to_tensors

INNER = "inner"


@dataclass(frozen=True)
class OutputInfo:
    """Which output of the model the tool uses, and whether it holds classes or features."""

    key: str
    kind: str  # "classes" or "features"
    type_name: str

    def to_json(self) -> dict:
        return {"key": self.key, "kind": self.kind, "type": self.type_name}


def _first_tensor(items) -> tuple[str, torch.Tensor] | None:
    for k, v in items:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return str(k), v
    return None


def _from_mapping(out: Mapping) -> tuple[str, torch.Tensor] | None:
    if isinstance(out.get("logits"), torch.Tensor):
        return "logits", out["logits"]
    return _first_tensor(out.items())


#: output type test -> how to find the tensor in it, as (key, tensor); the first rule that matches applies.
OUTPUT_RULES: list[tuple[Callable[[object], bool], Callable[[object], tuple[str, torch.Tensor] | None]]] = [
    (lambda o: isinstance(o, torch.Tensor), lambda o: ("tensor", o)),
    (lambda o: isinstance(o, Mapping), _from_mapping),
    (lambda o: isinstance(o, (tuple, list)), lambda o: _first_tensor(enumerate(o))),
]


def find_output(out) -> tuple[str, torch.Tensor]:
    """(key, tensor) of a model output; DataError when it holds no float tensor."""
    for test, pick in OUTPUT_RULES:
        if test(out):
            found = pick(out)
            if found is not None:
                return found
            break
    raise DataError("model output: expected a tensor, a ModelOutput/dict with logits or another float "
                    f"tensor, or a tuple of tensors, got {type(out).__name__} with no float tensor")


def select(out, key: str) -> torch.Tensor:
    """The output tensor named ``key`` (as :func:`find_output` named it)."""
    if key == "tensor":
        return out
    if isinstance(out, Mapping):
        return out[key]
    return out[int(key)]


class ModelIO(nn.Module):
    """``inner`` called with the shard's arrays (by keyword when ``keywords``) and reduced to one tensor."""

    def __init__(self, inner: nn.Module, names: tuple[str, ...], keywords: bool, output_key: str) -> None:
        super().__init__()
        self.inner = inner
        self.names, self.keywords, self.output_key = tuple(names), keywords, output_key

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = self.inner(**dict(zip(self.names, xs))) if self.keywords else self.inner(*xs)
        return select(out, self.output_key)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a :class:`ModelIO`, or ``model`` itself."""
    return model.inner if isinstance(model, ModelIO) else model


def _quiet_library_model(model: nn.Module) -> None:
    """Hugging Face models: no key/value cache (an extra output the export would have to carry)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "use_cache", None):
        cfg.use_cache = False


def call(model: nn.Module, shard: Shard, xs: tuple[torch.Tensor, ...]):
    return model(**dict(zip(shard.names, xs))) if shard.by_keyword else model(*xs)


def _input_embedding_rows(model: nn.Module) -> int | None:
    """Rows of the table the token ids index: a Hugging Face model's ``get_input_embeddings()``, else the
    model's only ``nn.Embedding`` / ``nn.EmbeddingBag`` (with several, which input indexes which is
    unknown)."""
    get = getattr(model, "get_input_embeddings", None)
    table = None
    if callable(get):
        try:
            table = get()
        except Exception:  # noqa: BLE001 -- NotImplementedError and the like: fall back to the module scan
            table = None
    if table is None:
        tables = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        table = tables[0] if len(tables) == 1 else None
    rows = getattr(table, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def _token_id_inputs(model: nn.Module, shard: Shard) -> dict[str, tuple[int, str]]:
    """Integer input name -> (how many ids its table holds, what that table is), where the model says it:
    ``input_ids`` (or a shard's only integer input ``x``) against the input embedding, ``token_type_ids``
    against ``config.type_vocab_size``."""
    out = {}
    ints = [n for n, x in zip(shard.names, shard.inputs) if np.issubdtype(x.dtype, np.integer)]
    key = ("input_ids" if "input_ids" in ints
           else (ints[0] if len(ints) == 1 and not shard.by_keyword else None))
    rows = _input_embedding_rows(model) if key else None
    if rows:
        out[key] = (rows, "vocabulary")
    types = getattr(getattr(model, "config", None), "type_vocab_size", None)
    if isinstance(types, int) and "token_type_ids" in ints:
        out["token_type_ids"] = (types, "token types (config.type_vocab_size)")
    return out


def check_token_ids(model: nn.Module, shard: Shard) -> None:
    """Every token id of ``shard`` within the table it indexes (all rows, not just the probe's two): otherwise
    the embedding fails with "index out of range in self", which names neither the array nor the size."""
    for name, (rows, what) in _token_id_inputs(model, shard).items():
        a = shard.inputs[shard.names.index(name)]
        lo, hi = int(np.min(a)), int(np.max(a))
        if lo < 0 or hi >= rows:
            bad = hi if hi >= rows else lo
            first = int(np.argwhere(np.asarray(a).reshape(len(a), -1) == bad)[0][0])
            raise DataError(f"{shard.source}: {name} holds id {bad} (first in sample {first}), outside the "
                            f"model's {what} of {rows} (ids 0..{rows - 1}); was the shard made with this "
                            "model's tokenizer?")


#: (a pattern of the error a model raises on a probe, what it says): errors that are the model's, not the
#: shard's
MODEL_FAILURES: list[tuple[re.Pattern, str]] = [
    # e.g. T5's "self.model.config.decoder_start_token_id has to be defined"
    (re.compile(r"\bconfig\b", re.IGNORECASE), "the model fails on its own configuration, not on the shard"),
]


def _model_failure(shard: Shard, msg: str) -> Exception | None:
    """A :class:`ModelLoadError` when the probe's error ``msg`` is the model's (:data:`MODEL_FAILURES`)."""
    for pattern, what in MODEL_FAILURES:
        if pattern.search(msg):
            return ModelLoadError(f"{what} {shard.source}: {msg}")
    return None


def adapt(model: nn.Module, shard: Shard) -> tuple[nn.Module, OutputInfo, np.ndarray]:
    """``(model or its ModelIO wrapper, OutputInfo, outputs on two samples)``.

    Raises:
        DataError: the shard's inputs do not fit the model (one line, with their shapes), a token id outside
            the model's vocabulary, or the output holds no float tensor.
        ModelLoadError: the model fails on its own configuration.
    """
    from converters.export import one_line

    _quiet_library_model(model)
    check_token_ids(model, shard)
    sample = to_tensors(tuple(x[:2] for x in shard.inputs), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = call(model.eval(), shard, sample)
    except Exception as e:  # noqa: BLE001 -- a failure here: the data does not fit the model, or the model fails
        shapes = ", ".join(f"{n + ' ' if shard.by_keyword else ''}{tuple(x.shape[1:])} {x.dtype}"
                           for n, x in zip(shard.names, shard.inputs))
        msg = one_line(e)
        raise _model_failure(shard, msg) or DataError(
            f"{shard.source}: inputs of per-sample shape {shapes} do not fit the model: {msg}") from None
    key, tensor = find_output(out)
    kind = "classes" if key in ("tensor", "logits", "0") else "features"
    info = OutputInfo(key, kind, type(out).__name__)
    if key == "tensor" and not shard.by_keyword:
        return model, info, tensor.float().numpy()
    return ModelIO(model, shard.names, shard.by_keyword, key).eval(), info, tensor.float().numpy()


def strip_prefix(proto, prefix: str = INNER + ".") -> None:
    """Rename the exported graph's tensors ``inner.X`` to ``X`` (in place), so initializers carry the
    user's parameter names. Names that would collide are left as they are."""
    g = proto.graph
    taken = {t.name for t in g.initializer} | {n for node in g.node for n in (*node.input, *node.output)}
    rename = {}
    for t in g.initializer:
        if t.name.startswith(prefix) and t.name[len(prefix):] not in taken:
            rename[t.name] = t.name[len(prefix):]
    if not rename:
        return
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for node in g.node:
        for i, n in enumerate(node.input):
            if n in rename:
                node.input[i] = rename[n]
    for vi in (*g.value_info, *g.input, *g.output):
        vi.name = rename.get(vi.name, vi.name)


def check_fits(model: nn.Module, shard: Shard) -> np.ndarray:
    """Run ``model`` on two samples of ``shard``; a failure becomes a one-line :class:`DataError`."""
    return adapt(model, shard)[2]
