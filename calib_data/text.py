"""Make a shard from a local text file with the model's own tokenizer.

    sapp-compress-shard MODEL_DIR TEXT_FILE -o OUT.npz [--text-field text] [--label-field label]
                        [--max-length 128] [--limit N]

``MODEL_DIR`` is a Hugging Face ``save_pretrained`` directory; its tokenizer is loaded with
``AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)`` (nothing is downloaded). ``TEXT_FILE``
is one of:

- ``.txt``: one sample per line (blank lines skipped); no labels;
- ``.csv``: a header row, a text column (``--text-field``) and optionally a label column (``--label-field``);
- ``.jsonl``: one JSON object per line with a text field and optionally a label field.

The shard holds ``input_ids`` and ``attention_mask`` (int64 ``[N, T]``, ``T = --max-length``: padded and
truncated to it), ``token_type_ids`` when the tokenizer returns them (it returns what its model's forward
takes), and, with labels, ``y`` (int64 class ids). Label ids come from the model's ``config.json``
``label2id`` when it names the labels; otherwise integer labels are used as they are and other labels are
numbered in sorted order (the mapping is returned and printed). Without labels there is no ``y`` and
sapp-compress fine-tunes by distillation from the original model.

The ``.npz`` is written uncompressed (so it is memory-mapped when read) under a temporary name and renamed
at the end: a failure leaves no partial file. Every bad input is a one-line :class:`DataError` (exit 2).

A tokenizer that cannot read the text is refused rather than trusted: one with no vocabulary beyond its
special tokens (transformers builds such an empty tokenizer from a directory without tokenizer files), or one
that maps more than :data:`UNK_REFUSE` of the text's tokens to its unknown token; above :data:`UNK_WARN` the
shard is written with a warning (:attr:`TextShard.warnings`, printed by the command).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from calib_data.errors import first_line
from calib_data.shards import DataError

log = logging.getLogger(__name__)

HF_EXTRA = "pip install sapp-compress[hf]"
_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")  # transformers' placeholder names: no real label names
_INT = re.compile(r"^[+-]?\d+$")
#: share of the text's tokens (special tokens and padding aside) that are the tokenizer's unknown token above
#: which the shard is refused: the model would be fine-tuned on noise
UNK_REFUSE = 0.5
#: ... and above which it is written with a warning
UNK_WARN = 0.05
#: the files a save_pretrained tokenizer is read from (one of them is needed), named in the error
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


@dataclass(frozen=True)
class TextShard:
    """What :func:`text_shard` wrote."""

    path: Path
    arrays: dict[str, tuple[int, ...]]  # name -> shape (all int64)
    label2id: dict[str, int] | None  # label -> class id; None without labels
    # where the ids came from: "config.json label2id", "integer labels", "sorted labels"
    label_source: str | None
    filled: int  # rows whose tokens reach max_length (truncated or exactly that long)
    unknown: float = 0.0  # share of the text's tokens that are the tokenizer's unknown token
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Rows:
    texts: list[str]
    labels: list[tuple[str, int]] | None  # (label as text, line number)


def _fail(path: Path, msg: str) -> DataError:
    return DataError(f"{path.name}: {msg}")


# -- readers: one per file type ------------------------------------------------------------------------------

def _read_txt(path: Path, text_field: str, label_field: str | None) -> _Rows:
    if label_field is not None:
        raise _fail(path, "a .txt file holds one text per line and no labels; use a .csv or .jsonl file for "
                          f"--label-field {label_field}")
    return _Rows([line.strip() for line in _lines(path) if line.strip()], None)


def _read_csv(path: Path, text_field: str, label_field: str | None) -> _Rows:
    texts, labels = [], []
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for field in (text_field, label_field):
            if field is not None and columns and field not in columns:
                raise _fail(path, f"expected a column {field!r}, found columns {columns}")
        try:
            for row in reader:
                texts.append(_text(path, reader.line_num, row.get(text_field), text_field))
                if label_field is not None:
                    labels.append((_label(path, reader.line_num, row.get(label_field), label_field),
                                   reader.line_num))
        except csv.Error as e:
            raise _fail(path, f"line {reader.line_num}: unreadable CSV ({e})") from None
    return _Rows(texts, labels if label_field is not None else None)


def _read_jsonl(path: Path, text_field: str, label_field: str | None) -> _Rows:
    texts, labels = [], []
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise _fail(path, f"line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise _fail(path, f"line {i}: expected a JSON object, got {type(row).__name__}")
        for field in (text_field, label_field):
            if field is not None and field not in row:
                raise _fail(path, f"line {i}: expected a field {field!r}, found fields {sorted(row)}")
        texts.append(_text(path, i, row[text_field], text_field))
        if label_field is not None:
            labels.append((_label(path, i, row[label_field], label_field), i))
    return _Rows(texts, labels if label_field is not None else None)


READERS: dict[str, Callable[[Path, str, str | None], _Rows]] = {
    ".txt": _read_txt, ".csv": _read_csv, ".jsonl": _read_jsonl,
}


def _open_text(path: Path):
    return open(path, encoding="utf-8-sig", newline="")


def _lines(path: Path) -> list[str]:
    """Lines split at newlines only (``str.splitlines`` would also split inside texts, at U+2028 and the
    like)."""
    with open(path, encoding="utf-8-sig") as f:
        return f.read().split("\n")


def _text(path: Path, line: int, value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"line {line}: expected a non-empty text in {field!r}, got {value!r}")
    return value.strip()


def _label(path: Path, line: int, value: object, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise _fail(path, f"line {line}: expected a label (text or integer) in {field!r}, got {value!r}")
    return str(value).strip()


def read_texts(path: str | Path, *, text_field: str = "text", label_field: str | None = None,
               limit: int | None = None) -> tuple[list[str], list[tuple[str, int]] | None]:
    """Texts and optional (label, line number) pairs from a .txt, .csv or .jsonl file (the first
    ``limit``)."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise _fail(path, f"expected a {', '.join(READERS)} file, got {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise _fail(path, "no such file")
    try:
        rows = reader(path, text_field, label_field)
    except UnicodeDecodeError as e:
        raise _fail(path, f"expected UTF-8 text, got undecodable bytes at offset {e.start}") from None
    if not rows.texts:
        raise _fail(path, "no text rows found (the file is empty)")
    n = len(rows.texts) if limit is None else min(limit, len(rows.texts))
    return rows.texts[:n], None if rows.labels is None else rows.labels[:n]


# -- labels --------------------------------------------------------------------------------------------------

def label_ids(path: Path, labels: list[tuple[str, int]],
              config: dict) -> tuple[np.ndarray, dict[str, int], str]:
    """Class ids (int64), the label -> id mapping and where it came from.

    The model's ``label2id`` decides when it names the labels (not transformers' ``LABEL_<i>`` placeholders);
    otherwise integer labels are ids as they are and other labels are numbered in sorted order. Ids must be
    below the model's number of labels (``len(id2label)``) when the config says it.
    """
    label2id = {str(k): int(v) for k, v in (config.get("label2id") or {}).items()}
    named = bool(label2id) and not all(_DEFAULT_LABEL.match(k) for k in label2id)
    num_labels = len(config.get("id2label") or label2id) or None
    if named:
        for label, line in labels:
            if label not in label2id:
                raise _fail(path, f"line {line}: label {label!r} is not in the model's label2id "
                                  f"(expected one of {sorted(label2id)})")
        mapping, source = label2id, "config.json label2id"
    elif all(_INT.match(label) for label, _ in labels):
        mapping, source = {label: int(label) for label, _ in labels}, "integer labels"
        for label, line in labels:
            if int(label) < 0:
                raise _fail(path, f"line {line}: expected a class id >= 0, got label {label}")
    else:
        mapping, source = {label: i for i, label in enumerate(sorted({label for label, _ in labels}))}, \
            "sorted labels"
    if num_labels is not None:
        for label, line in labels:
            if mapping[label] >= num_labels:
                raise _fail(path, f"line {line}: label {label!r} is class {mapping[label]}, but the model "
                                  f"has {num_labels} labels (config.json id2label)")
    y = np.array([mapping[label] for label, _ in labels], dtype=np.int64)
    return y, dict(sorted(mapping.items(), key=lambda kv: kv[1])), source


# -- the model directory -------------------------------------------------------------------------------------

def _check_model_dir(model_dir: Path) -> Path:
    if not model_dir.is_dir():
        raise _fail(model_dir, "expected a Hugging Face save_pretrained directory, found no such directory")
    return model_dir


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise _fail(path, f"unreadable JSON ({e})") from None
    return config if isinstance(config, dict) else {}


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved in ``model_dir`` (local files only: nothing is downloaded)."""
    model_dir = _check_model_dir(Path(model_dir))
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"making a shard from text needs transformers: {HF_EXTRA}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _fail(model_dir, f"no tokenizer could be loaded from the directory ({first_line(e)})") from None
    special = set(tok.all_special_ids)
    if len(tok) <= len(special):
        present = [f for f in TOKENIZER_FILES if (model_dir / f).exists()]
        where = (f"its {', '.join(present)} holds an empty vocabulary" if present else
                 f"the directory holds no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
        raise _fail(model_dir, f"the tokenizer has no vocabulary beyond its {len(special)} special tokens: "
                               f"{where}; save the model's tokenizer there (tokenizer.save_pretrained)")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise _fail(model_dir, "the tokenizer has neither a padding nor an end-of-sequence token to pad "
                                   "with")
        log.info("%s: the tokenizer has no padding token; padding with its end token %r (masked out)",
                 model_dir.name, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


# -- the shard -----------------------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.suffix != ".npz":
        raise _fail(out, f"expected an output name ending in .npz, got {out.suffix or 'no suffix'!r}")
    if not out.parent.is_dir():
        raise _fail(out, f"expected an existing output directory, found no directory {str(out.parent)!r}")


def _save_atomic(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` (uncompressed: memory-mappable) to a temporary name, then rename over ``out``."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except OSError as e:
        raise _fail(out, f"cannot write the shard ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def text_shard(model_dir: str | Path, path: str | Path, out: str | Path, *, text_field: str = "text",
               label_field: str | None = None, max_length: int = 128, limit: int | None = None) -> TextShard:
    """Tokenize ``path`` with ``model_dir``'s tokenizer and write the shard ``out`` (see the module
    docstring).

    Raises:
        DataError: a missing or unreadable file, a missing column or field, no rows, a label the model does
            not know, ``max_length`` beyond the model's positions, no tokenizer in ``model_dir``, or an
            output that cannot be written.
    """
    model_dir, path, out = Path(model_dir), Path(path), Path(out)
    if max_length < 1 or (limit is not None and limit < 1):
        raise DataError(f"expected max_length >= 1 and limit >= 1, got max_length={max_length}, "
                        f"limit={limit}")
    _check_out(out)
    _check_model_dir(model_dir)
    texts, labels = read_texts(path, text_field=text_field, label_field=label_field, limit=limit)
    config = _config(model_dir)
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and max_length > positions:
        raise _fail(model_dir, f"max_length {max_length} is longer than the model's max_position_embeddings "
                               f"{positions}")
    y, mapping, source = label_ids(path, labels, config) if labels is not None else (None, None, None)
    tok = load_tokenizer(model_dir)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length)
    arrays = {k: np.asarray(enc[k], dtype=np.int64)
              for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    if "attention_mask" not in arrays:  # some tokenizers leave it out; padding positions are what it masks
        arrays["attention_mask"] = (arrays["input_ids"] != tok.pad_token_id).astype(np.int64)
    unknown = unknown_share(arrays["input_ids"], arrays["attention_mask"], tok)
    warnings = []
    if unknown > UNK_REFUSE:
        raise _fail(model_dir, f"the tokenizer maps {unknown:.0%} of the text's tokens to its unknown token "
                               f"{tok.unk_token!r} (refused above {UNK_REFUSE:.0%}): it is not this text's "
                               "tokenizer, or the directory's tokenizer files are incomplete")
    if unknown > UNK_WARN:
        warnings.append(f"the tokenizer maps {unknown:.1%} of the text's tokens to its unknown token "
                        f"{tok.unk_token!r}; check that it is the model's tokenizer")
        log.info("%s", warnings[-1])  # the caller says it (TextShard.warnings): the command prints it once
    if y is not None:
        arrays["y"] = y
    _save_atomic(out, arrays)
    filled = int(arrays["attention_mask"][:, -1].sum())
    return TextShard(out, {k: tuple(v.shape) for k, v in arrays.items()}, mapping, source, filled, unknown,
                     tuple(warnings))


def unknown_share(ids: np.ndarray, mask: np.ndarray, tok) -> float:
    """Share of the real tokens (masked in, not special) that are the unknown token; 0 without one."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return 0.0
    special = np.array(sorted(set(tok.all_special_ids) - {unk}), dtype=np.int64)
    real = (mask > 0) & ~np.isin(ids, special)
    return float((ids[real] == unk).sum() / max(1, int(real.sum())))


def describe(result: TextShard) -> str:
    """A few lines for people: what was written, the label mapping, rows that may have been truncated."""
    arrays = ", ".join(f"{k} int64 {list(s)}" for k, s in result.arrays.items())
    lines = [f"wrote {result.path}: {arrays}"]
    if result.label2id is not None:
        lines.append(f"labels ({result.label_source}): "
                     + ", ".join(f"{k}={v}" for k, v in result.label2id.items()))
    else:
        lines.append("no labels: sapp-compress will fine-tune by distillation from the original model")
    if result.filled:
        T = result.arrays["input_ids"][1]
        lines.append(f"{result.filled} of {result.arrays['input_ids'][0]} rows fill all {T} tokens "
                     "(longer ones were truncated; raise --max-length to keep more)")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("text_file", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The shard to write (.npz).")
@click.option("--text-field", default="text", show_default=True,
              help="CSV column / JSONL field with the text.")
@click.option("--label-field", default=None, help="CSV column / JSONL field with the label (none: no y).")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(min=1),
              help="Tokens per sample: shorter texts are padded, longer ones truncated.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N rows.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(model_dir: Path, text_file: Path, out: Path, text_field: str, label_field: str | None,
         max_length: int, limit: int | None, quiet: bool) -> None:
    """Make a shard (.npz) from TEXT_FILE (.txt, .csv, .jsonl) with the tokenizer of MODEL_DIR.

    \b
    Example:
      sapp-compress-shard examples/models/tiny_bert calib_data/text/stdlib_docs.jsonl \\
          --label-field label -o text.npz
    """
    try:
        result = text_shard(model_dir, text_file, out, text_field=text_field, label_field=label_field,
                            max_length=max_length, limit=limit)
    except DataError as e:
        click.echo(f"Error: {first_line(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    if not quiet:
        for w in result.warnings:
            click.echo(f"WARNING: {w}", err=True)
        click.echo(describe(result), err=True)


if __name__ == "__main__":
    main()
