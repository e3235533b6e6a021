"""How the CLI's ``model`` travels through the code: the walk from the command line to the written file.

Runs the README's quick start in process (the shipped digits MLP, ``--steps 2 --onnx-format compact`` so
nothing is timed) under ``sys.setprofile`` and records every call into a first-party function
(``sapp_compress``, ``converters``, ``calib_data``) that is handed the model in any of its forms (an argument
named ``model``, or an ``nn.Module`` or ``onnx.ModelProto`` among its arguments other than ``self``: a
module's own forward is not a stop). Consecutive calls in the same file are one *stop*; a stop in a file the
walk had already left is a *return*. Prints the stops, the files, the returns, and the sequence of files.

    python bench/layout_walk.py            # this checkout
    PYTHONPATH=OTHER python bench/layout_walk.py   # another checkout of the project, for a before/after
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sapp_compress", "converters", "calib_data")


def walk() -> list[str]:
    from click.testing import CliRunner

    import sapp_compress
    from sapp_compress.cli import main

    base = Path(sapp_compress.__file__).resolve().parents[1]
    files: list[str] = []

    def holds_model(frame) -> bool:
        code = frame.f_code
        names = [n for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount] if n != "self"]
        return "model" in names or any(isinstance(frame.f_locals.get(n), (nn.Module, onnx.ModelProto))
                                       for n in names)

    def profile(frame, event, arg):
        if event != "call":
            return
        path = Path(frame.f_code.co_filename)
        try:
            rel = path.resolve().relative_to(base)
        except ValueError:
            return
        if rel.parts[0] in PACKAGES and holds_model(frame):
            name = str(rel)
            if not files or files[-1] != name:
                files.append(name)

    with tempfile.TemporaryDirectory() as d:
        args = [str(ROOT / "examples" / "models" / "digits_mlp.pt"), "--block", "8", "--sparsity", "0.8",
                "--steps", "2", "--onnx-format", "compact", "-o", str(Path(d) / "m.onnx"), "-q"]
        sys.setprofile(profile)
        try:
            res = CliRunner().invoke(main, args, catch_exceptions=False)
        finally:
            sys.setprofile(None)
    assert res.exit_code == 0, res.output
    return files


def main() -> None:
    import argparse

    fmt = argparse.RawDescriptionHelpFormatter
    argparse.ArgumentParser(description=__doc__, formatter_class=fmt).parse_args()
    files = walk()
    left, returns = set(), 0
    for prev, cur in zip(files, files[1:]):
        left.add(prev)
        returns += cur in left
    print(f"stops {len(files)}, files {len(set(files))}, returns to a file already left {returns}")
    print(" -> ".join(files))


if __name__ == "__main__":
    main()
