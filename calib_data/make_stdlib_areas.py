"""Make the shipped text-classification corpus ``stdlib_areas`` (run once; the two files and their entry in
``text/MANIFEST.json`` are committed).

    python calib_data/make_stdlib_areas.py        # a few seconds; CPython 3.11.7 made the shipped files

Rows are passages of the docstrings of the Python standard library, labelled by the area of the library they
document (eight areas, each a set of modules: ``AREAS``). The text is the Python Software Foundation's (PSF
License); nothing is downloaded: the docstrings are read from the running interpreter's own library, the
``.py`` sources with ``ast`` (nothing imported) and the C-implemented modules by introspection, so the exact
rows depend on the Python version (recorded in the manifest).

How a row is made:

1. Docstrings of every module, class, function and method (private ones too) of the modules an area lists,
   in source order; for C modules (``posix`` for ``os``, ``_socket``, ``_decimal``, ...) the module's, its
   public functions' and types' and their methods' docstrings, in name order. Test packages are skipped, and
   so are the modules that the licence page of CPython's documentation ("Licenses and Acknowledgements for
   Incorporated Software") names under licences of their own (``OTHER_LICENCES``).
2. Each docstring is split into paragraphs; paragraphs that are not prose are dropped: doctest examples,
   C signature lines, paragraphs under 75 % letters and spaces (tables, code).
3. Names that give the label away are removed from the text: dotted references to a standard-library module
   keep only their last part (``asyncio.Future`` -> ``Future``), the names of standard-library modules are
   removed where they are identifiers rather than words (``tkinter``, ``Ttk``, ``asyncio``, ``distutils``,
   ``IDLE``, ... but not ``socket``, ``email``, ``logging`` or ``random``: ``WORDS``), and so are the
   documented object's own name and its class's when they are identifiers (``snake_case``, ``CamelCase``,
   ``_private``), e.g. ``ThreadPoolExecutor``. Names of other objects, and of technologies (Tk, Tcl, HTTP,
   XML), stay: they are what the text is about.
4. A paragraph seen before (the same text under another object or module, e.g. ``_pydecimal`` and
   ``_decimal``) is dropped, then each module's paragraphs are packed, in order, into passages of
   ``MIN_CHARS``..``MAX_CHARS`` characters (long paragraphs split at sentence ends), about 30-80 words.
5. The passages are split 80/20 per label with a fixed seed into ``stdlib_areas.train.jsonl`` and
   ``stdlib_areas.test.jsonl``; a test passage whose text is also a training passage (the same paragraphs
   packed alike under two objects: 2 of them) is dropped.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import platform
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from calib_data.make_text import paragraphs, read_manifest, write_manifest  # noqa: E402

HERE = Path(__file__).resolve().parent
NAME = "stdlib_areas"
OUT = {"train": HERE / "text" / f"{NAME}.train.jsonl", "test": HERE / "text" / f"{NAME}.test.jsonl"}
SEED = 20261201
HELD_OUT = 0.2
MIN_CHARS, MAX_CHARS = 150, 400  # a passage: paragraphs added until it has MIN_CHARS, never past MAX_CHARS
MIN_PARAGRAPH = 20  # shorter paragraphs (after the names are removed) are dropped
LIB = Path(inspect.getfile(ast)).parent

# label -> modules (a module stands for its submodules). The areas follow the chapters of the Python Library
# Reference, some merged: "gui" Graphical User Interfaces with Tk (tkinter, IDLE) with turtle and curses;
# "internet" Internet Data Handling and Internet Protocols and Support with the socket-level modules of
# Networking and Interprocess Communication; "numeric" Numeric and Mathematical Modules; "markup" Structured
# Markup Processing Tools; "devtools" unittest and doctest (Development Tools) with Debugging and Profiling;
# "packaging" Software Packaging and Distribution with Importing Modules, site and sysconfig; "concurrency"
# Concurrent Execution with asyncio; "files" File and Directory Access, Data Compression and Archiving, os and
# io. The other chapters (text, data types, runtime services, ...) are left out: their docstrings ("Return
# the ...") share too much with every area to be labelled by one.
AREAS: dict[str, list[str]] = {
    "gui": ["tkinter", "idlelib", "turtle", "curses"],
    "internet": ["email", "mailbox", "mimetypes", "base64", "binascii", "quopri", "json", "smtplib",
                 "imaplib", "poplib", "nntplib", "http", "urllib", "wsgiref", "webbrowser", "socketserver",
                 "ftplib", "cgi", "uuid", "ipaddress", "socket", "ssl", "select", "selectors"],
    "numeric": ["numbers", "math", "cmath", "decimal", "fractions", "random", "statistics"],
    "markup": ["html", "xml"],
    "devtools": ["unittest", "doctest", "bdb", "pdb", "faulthandler", "profile", "cProfile", "pstats",
                 "timeit", "tracemalloc"],
    "packaging": ["distutils", "ensurepip", "venv", "zipapp", "importlib", "pkgutil", "zipimport",
                  "modulefinder", "runpy", "site", "sysconfig"],
    "concurrency": ["asyncio", "threading", "multiprocessing", "concurrent", "subprocess", "sched", "queue",
                    "contextvars"],
    "files": ["os", "io", "pathlib", "posixpath", "genericpath", "fileinput", "stat", "filecmp", "tempfile",
              "glob", "fnmatch", "linecache", "shutil", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile"],
}
# CPython's documentation names these modules' code under licences of their own (permissive ones): left out,
# so that every row is under the PSF License
OTHER_LICENCES = {"asynchat", "asyncore", "http.cookies", "trace", "uu", "xmlrpc"}
# modules whose code lives under another name: private Python twins and C accelerators
ALIASES = {"_pydecimal": "decimal", "_pyio": "io", "_compression": "gzip", "_markupbase": "html.parser",
           "_threading_local": "threading", "_bootsubprocess": "subprocess", "_sitebuiltins": "site",
           "posix": "os", "_io": "io", "_thread": "threading", "_lsprof": "cProfile",
           "_elementtree": "xml.etree", "pyexpat": "xml.parsers.expat", "_posixsubprocess": "subprocess",
           "_posixshmem": "multiprocessing", "_curses_panel": "curses", "_imp": "importlib"}
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload", "turtledemo"}
# standard-library module names that are also words, or names of formats, protocols and concepts: kept in the
# text
WORDS = {"abc", "array", "ast", "base64", "bisect", "calendar", "chunk", "code", "codecs", "collections",
         "concurrent", "copy", "csv", "curses", "datetime", "decimal", "email", "encodings", "enum", "errno",
         "fractions", "glob", "gzip", "hmac", "html", "http", "inspect", "json", "keyword", "locale",
         "logging", "mailbox", "marshal", "math", "numbers", "opcode", "operator", "pickle", "pipes",
         "platform", "posix", "profile", "queue", "random", "resource", "secrets", "select", "selectors",
         "shelve", "signal", "site", "socket", "ssl", "stat", "statistics", "string", "struct", "subprocess",
         "symbol", "this", "threading", "time", "token", "trace", "traceback", "turtle", "types", "typing",
         "uuid", "warnings", "wave", "weakref", "xml", "zlib"}
# package, submodule and program names that are identifiers too
EXTRA_NAMES = {"idlelib", "lib2to3", "ttk", "Ttk", "tix", "Tix", "Tkinter", "IDLE", "Idle", "minidom",
               "pulldom", "etree"}

_MODULES = sorted(set(sys.stdlib_module_names) | EXTRA_NAMES, key=len, reverse=True)
_DOTTED = re.compile(r"(?<![\w.])(?:" + "|".join(map(re.escape, _MODULES)) + r")((?:\.\w+)+)")
_NAMES = [m for m in _MODULES if m not in WORDS]
_NAMES += [m[0].upper() + m[1:] for m in _NAMES if len(m) > 3]  # at a sentence start: "Distutils", "Ttk"
_MODULE_WORD = re.compile(r"(?<![\w.-])(?:" + "|".join(map(re.escape,
                                                           sorted(set(_NAMES), key=len, reverse=True)))
                          + r")(?![\w-])")
_IDENTIFIER = re.compile(r"_|[a-z][A-Z]|\d")  # snake_case, CamelCase, digits, _private
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def area_of(module: str) -> tuple[str | None, str]:
    """(label or None, public module name) of a dotted module name (``_pydecimal`` -> ``decimal``)."""
    parts = module.split(".")
    parts = ALIASES[parts[0]].split(".") + parts[1:] if parts[0] in ALIASES else parts
    if parts[0].startswith("_") and parts[0][1:] in sys.stdlib_module_names:  # _socket, _ssl, _decimal, ...
        parts[0] = parts[0][1:]
    name = ".".join(parts)
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in OTHER_LICENCES:
            return None, name
        for label, modules in AREAS.items():
            if prefix in modules:
                return label, name
    return None, name


def python_docstrings():
    """(label, module, scope, docstring) for the .py modules of the areas, each in source order."""
    for path in sorted(LIB.rglob("*.py")):
        rel = path.relative_to(LIB)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts):
            continue
        label, module = area_of(".".join(rel.with_suffix("").parts).removesuffix(".__init__"))
        if label is None:
            continue
        tree = ast.parse(path.read_bytes())
        found = [(0, [], ast.get_docstring(tree))]

        def walk(node: ast.AST, scope: list[str]) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    found.append((child.lineno, scope + [child.name], ast.get_docstring(child)))
                    walk(child, scope + [child.name])
                else:
                    walk(child, scope)

        walk(tree, [])
        for _, scope, doc in sorted(found, key=lambda f: f[0]):
            if doc:
                yield label, module, scope, doc


def c_docstrings():
    """(label, module, scope, docstring) for the C modules of the areas: the module, its functions and types
    (those it defines) and their methods and attributes, in name order."""
    so = {p.name.split(".")[0] for p in (LIB / "lib-dynload").glob("*.so")}
    for name in sorted(set(sys.builtin_module_names) | so):
        label, module = area_of(name)
        if label is None or name.startswith(("_test", "xx")):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
        if str(getattr(mod, "__file__", "")).endswith(".py"):
            continue
        if isinstance(mod.__doc__, str):
            yield label, module, [], mod.__doc__
        for key, obj in sorted(vars(mod).items()):
            if key.startswith("__") or not callable(obj) or getattr(obj, "__module__",
                                                                    name) not in (name, module):
                continue
            if isinstance(obj.__doc__, str):
                yield label, module, [key], obj.__doc__
            if inspect.isclass(obj):
                for k, v in sorted(vars(obj).items()):
                    if not k.startswith("__") and isinstance(getattr(v, "__doc__", None), str):
                        yield label, module, [key, k], v.__doc__


def prose(doc: str):
    """The prose paragraphs of a docstring, each on one line."""
    for raw, text in paragraphs(doc):
        if any(line.lstrip().startswith(">>>") for line in raw.splitlines()):
            continue  # a doctest example
        if sum(c.isalpha() or c == " " for c in text) < 0.75 * len(text):
            continue  # a table, code, a signature
        yield text


def mask(text: str, scope: list[str]) -> str:
    """``text`` without the names that would give its label away (module docstring, step 3)."""
    text = _DOTTED.sub(lambda m: m.group(1).rsplit(".", 1)[1], text)
    text = _MODULE_WORD.sub("", text)
    for name in scope:
        if _IDENTIFIER.search(name):
            text = re.sub(r"(?<![\w.])" + re.escape(name) + r"(?![\w])", "", text)
    text = re.sub(r"\s+([.,;:)])", r"\1", " ".join(text.split()))
    return re.sub(r"\(\s+", "(", text)


def _pieces(paragraph: str):
    """A paragraph longer than MAX_CHARS in pieces at sentence ends (a longer sentence at a space)."""
    if len(paragraph) <= MAX_CHARS:
        yield paragraph
        return
    piece = ""
    for sentence in _SENTENCE_END.split(paragraph):
        while len(sentence) > MAX_CHARS:
            cut = sentence.rfind(" ", 0, MAX_CHARS)
            cut = cut if cut > 0 else MAX_CHARS
            if piece:
                yield piece
                piece = ""
            yield sentence[:cut]
            sentence = sentence[cut:].strip()
        if piece and len(piece) + 1 + len(sentence) > MAX_CHARS:
            yield piece
            piece = sentence
        else:
            piece = f"{piece} {sentence}".strip()
    if piece:
        yield piece


def passages(paras: list[str]) -> list[str]:
    """Consecutive paragraphs packed into passages of MIN_CHARS..MAX_CHARS characters (a module's last one may
    be shorter; under MIN_CHARS / 2 it is dropped)."""
    out, cur = [], ""
    for piece in (p for para in paras for p in _pieces(para)):
        if cur and len(cur) + 1 + len(piece) > MAX_CHARS:
            out.append(cur)
            cur = ""
        cur = f"{cur} {piece}".strip()
        if len(cur) >= MIN_CHARS:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return [p for p in out if len(p) >= MIN_CHARS // 2]


def rows() -> list[dict]:
    by_module: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    seen: set[str] = set()
    for label, module, scope, doc in [*python_docstrings(), *c_docstrings()]:
        labels[module] = label
        for text in prose(doc):
            text = mask(text, scope)
            if len(text) >= MIN_PARAGRAPH and text not in seen:
                seen.add(text)
                by_module.setdefault(module, []).append(text)
    return [{"text": text, "label": labels[m], "source": m} for m, paras in by_module.items()
            for text in passages(paras)]


def split(data: list[dict]) -> dict[str, list[dict]]:
    """HELD_OUT of each label's rows for the test file, the rest for training; both shuffled."""
    rng = np.random.default_rng(SEED)
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for label in AREAS:
        rs = [r for r in data if r["label"] == label]
        perm = rng.permutation(len(rs))
        k = int(round(HELD_OUT * len(rs)))
        out["test"] += [rs[i] for i in sorted(perm[:k])]
        out["train"] += [rs[i] for i in sorted(perm[k:])]
    # two paragraphs packed the same way under different objects give one passage twice: never on both sides
    trained = {r["text"] for r in out["train"]}
    out["test"] = [r for r in out["test"] if r["text"] not in trained]
    return {part: [rs[i] for i in rng.permutation(len(rs))] for part, rs in out.items()}


def main() -> None:
    parts = split(rows())
    manifest = read_manifest()
    for part, data in parts.items():
        path = OUT[part]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        counts = Counter(r["label"] for r in data)
        manifest[path.stem.replace(".", "_")] = {
            "source": "passages of the docstrings of Python " f"{platform.python_version()} standard-library "
                      "modules (sources and C modules), labelled by library area, made by "
                      "calib_data/make_stdlib_areas.py",
            "licence": "PSF License (Python Software Foundation License Version 2), the licence of CPython's "
                       "docstrings",
            "made": "areas: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in AREAS.items())
                    + f"; left out (other licences): {', '.join(sorted(OTHER_LICENCES))}; prose paragraphs "
                      "only (no doctests, tables or signatures); module names that are identifiers, dotted "
                      "module references and the documented objects' own identifier names removed; repeated "
                      f"paragraphs dropped; each module's paragraphs packed in order into passages of "
                      f"{MIN_CHARS}..{MAX_CHARS} characters; {int(HELD_OUT * 100)} % of each label's "
                      f"passages held out for the test file (seed {SEED})",
            "synthetic": False,
            "split": part,
            "file": "text/" + path.name,
            "format": "JSON Lines: text, label, source (the module the passage documents)",
            "samples": len(data),
            "python": platform.python_version(),
            "label_counts": {k: counts[k] for k in sorted(counts)},
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        print(f"{path}: {len(data)} rows, {path.stat().st_size} bytes, {dict(sorted(counts.items()))}")
    write_manifest(manifest)


if __name__ == "__main__":
    main()
