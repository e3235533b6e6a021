"""Make the shipped text data set (run once; ``text/stdlib_docs.jsonl`` and ``text/MANIFEST.json`` are
committed).

    python calib_data/make_text.py

Rows are the first paragraph of the docstrings of public functions, classes and methods of Python
standard-library modules, labelled by the family of modules they come from (``maths``, ``text``, ``files``,
``concurrency``, ``network``, ``containers``): a small, real, six-class text-classification set. The text is
the Python Software Foundation's (PSF License); nothing is downloaded, the docstrings come from the running
interpreter, so the exact rows depend on its version (recorded in the manifest).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import platform
import re
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "text" / "stdlib_docs.jsonl"
SEED = 20261201
PER_LABEL = 110  # rows kept per label (fewer where a family has fewer docstrings)
MIN_CHARS, MAX_CHARS = 24, 320

FAMILIES: dict[str, list[str]] = {
    "maths": ["math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"],
    "text": ["string", "textwrap", "re", "difflib", "unicodedata", "codecs", "html", "html.parser", "shlex",
             "str", "gettext", "locale"],
    "files": ["os", "os.path", "shutil", "glob", "fnmatch", "tempfile", "pathlib", "filecmp", "zipfile",
              "tarfile", "io"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "concurrent.futures", "subprocess", "queue",
                    "sched", "signal"],
    "network": ["socket", "ssl", "urllib.parse", "urllib.request", "http.client", "http.server",
                "http.cookies", "email.utils", "smtplib", "ftplib", "ipaddress", "select", "selectors"],
    "containers": ["collections", "collections.abc", "heapq", "bisect", "itertools", "functools", "operator",
                   "array", "copy", "weakref", "enum", "dataclasses", "types", "list", "dict", "set"],
}
_BUILTIN_TYPES = {"str": str, "list": list, "dict": dict, "set": set}
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")  # "find(sub[, start]) -> int": a C signature line


def paragraphs(doc: str):
    """(raw paragraph, the paragraph on one line) for the paragraphs of a docstring, C signature lines
    skipped."""
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc).strip()):
        text = " ".join(para.split())
        if text and not _SIGNATURE.match(text):
            yield para, text


def first_paragraph(doc: str) -> str | None:
    """The first paragraph of a docstring that is prose (C signature lines skipped), on one line."""
    return next((text for _, text in paragraphs(doc)), None)


def _owned(obj: object, module: str) -> bool:
    """Defined by ``module`` (or its C accelerator ``_module``; ``posix`` for ``os``), not re-exported."""
    owner = (getattr(obj, "__module__", None) or "").lstrip("_").split(".")[0]
    top = module.split(".")[0]
    return owner == top or (top == "os" and owner in {"posix", "posixpath"})


def members(module: str):
    """(qualified name, object) for the public callables of ``module`` and their public methods."""
    if module in _BUILTIN_TYPES:
        t = _BUILTIN_TYPES[module]
        yield from ((f"{module}.{k}", v) for k, v in sorted(vars(t).items()) if not k.startswith("_"))
        return
    mod = importlib.import_module(module)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or not callable(obj) or not _owned(obj, module):
            continue
        yield f"{module}.{name}", obj
        if inspect.isclass(obj):
            for k, v in sorted(vars(obj).items()):
                if not k.startswith("_") and callable(v):
                    yield f"{module}.{name}.{k}", v


def rows() -> list[dict]:
    seen: dict[str, set[str]] = {}
    found: dict[str, list[dict]] = {label: [] for label in FAMILIES}
    ids: set[int] = set()
    for label, modules in FAMILIES.items():
        for module in modules:
            for qualname, obj in members(module):
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str) or id(obj) in ids:
                    continue
                ids.add(id(obj))
                text = first_paragraph(doc)
                if text is None or not MIN_CHARS <= len(text) <= MAX_CHARS:
                    continue
                seen.setdefault(text, set()).add(label)
                found[label].append({"text": text, "label": label, "source": qualname})
    rng = np.random.default_rng(SEED)
    out = []
    for label, rs in found.items():
        # no conflicting labels
        unique = list({r["text"]: r for r in rs if seen[r["text"]] == {label}}.values())
        keep = rng.permutation(len(unique))[:PER_LABEL]
        out += [unique[i] for i in sorted(keep)]
    return [out[i] for i in rng.permutation(len(out))]


def read_manifest() -> dict:
    """text/MANIFEST.json as it is (every text file's entry), or empty."""
    path = OUT.parent / "MANIFEST.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_manifest(manifest: dict) -> None:
    (OUT.parent / "MANIFEST.json").write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


def main() -> None:
    data = rows()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    counts = Counter(r["label"] for r in data)
    manifest = read_manifest()
    manifest.update({
        "stdlib_docs": {
            "source": "first paragraph of the docstrings of public functions, classes and methods of Python "
                      f"{platform.python_version()} standard-library modules, made by "
                      "calib_data/make_text.py",
            "licence": "PSF License (Python Software Foundation License Version 2), the licence of CPython's "
                       "docstrings",
            "made": "labels are module families: "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in FAMILIES.items())
                    + f"; texts of {MIN_CHARS}..{MAX_CHARS} characters, deduplicated, texts found under two "
                      f"families dropped, at most {PER_LABEL} per label, shuffled with a fixed seed",
            "synthetic": False,
            "file": "text/" + OUT.name,
            "format": "JSON Lines: text, label, source (the documented object)",
            "samples": len(data),
            "python": platform.python_version(),
            "label_counts": {k: counts[k] for k in sorted(counts)},
            "sha256": hashlib.sha256(OUT.read_bytes()).hexdigest(),
        }
    })
    write_manifest(manifest)
    print(f"{OUT}: {len(data)} rows, {OUT.stat().st_size} bytes, {dict(counts)}")


if __name__ == "__main__":
    main()
