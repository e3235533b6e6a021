"""The runtime interface: where the written ONNX is timed, verified and put in int8.

A :class:`Runtime` makes sessions (``session(model).run(None, feed)`` returns the graph's outputs in order, as
ONNX Runtime's sessions do), says its version and the precision it computes in, and names its int8 forms
(:data:`converters.dense_int8.FORMS`). Every place that measures or verifies asks :func:`current`, which
:func:`use` sets for the length of a job; nothing else asks which runtime it is. The entries are registered in
:data:`RUNTIMES` (``ort``, the default; ``openvino``, the optional extra).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import ClassVar, Iterator, Protocol

import numpy as np
import onnx

from ..errors import ConverterError


class Session(Protocol):
    """What the converters call on a session (ONNX Runtime's own ``InferenceSession`` is one)."""

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class RuntimeMissing(ConverterError):
    """The runtime's package is not installed; the message names the extra that installs it (the tool turns
    it into its exit-2 ``RuntimeUnavailable``)."""


class Runtime:
    """One entry of :data:`RUNTIMES`."""

    #: the ``--runtime`` value
    name: ClassVar[str]
    #: its name in messages ("ONNX Runtime")
    title: ClassVar[str]
    #: the pip extra of this package that installs it (None: a hard dependency)
    extra: ClassVar[str | None] = None
    #: the int8 forms of a whole dense graph it runs (:data:`converters.dense_int8.FORMS`), in order
    int8_forms: ClassVar[tuple[str, ...]] = ()
    #: the sessions :func:`converters.verify.verify` checks: (label, optimize)
    verify_modes: ClassVar[tuple[tuple[str, bool], ...]] = (("default", True),)

    def missing(self) -> str | None:
        """Why it cannot run here (its package is not installed), or None."""
        return None

    def require(self) -> None:
        """Raise :class:`RuntimeMissing` when :meth:`missing`."""
        why = self.missing()
        if why:
            raise RuntimeMissing(f"--runtime {self.name} needs {why}"
                                 + (f": pip install 'sapp-compress[{self.extra}]'" if self.extra else ""))

    def version(self) -> str:
        raise NotImplementedError

    def precision(self) -> str:
        """The floating-point precision it computes fp32 graphs in (set explicitly, never left to a hint)."""
        return "f32"

    def session(self, model: onnx.ModelProto | bytes, *, threads: int | None = None, optimize: bool = True,
                spin: bool = True) -> Session:
        raise NotImplementedError

    def key(self) -> str:
        """What of the runtime decides a timing (the timing cache's ``runtime`` field)."""
        return f"{self.name} {self.version()} {self.precision()}"

    def describe(self) -> dict:
        """The report's ``runtime``: name, version, precision."""
        return {"name": self.name, "version": self.version(), "precision": self.precision()}


#: --runtime value -> entry
RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


def get(name: str) -> Runtime:
    """The entry called ``name``; ValueError naming the choices."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"runtime: expected one of {tuple(RUNTIMES)}, got {name!r}") from None


_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("sapp_compress_runtime", default="ort")


def current() -> Runtime:
    """The runtime of the job under way (``ort`` outside :func:`use`)."""
    return RUNTIMES[_CURRENT.get()]


@contextlib.contextmanager
def use(runtime: str | Runtime) -> Iterator[Runtime]:
    """Measure, verify and quantize in ``runtime`` inside the block (checked installed first)."""
    rt = get(runtime) if isinstance(runtime, str) else runtime
    rt.require()
    token = _CURRENT.set(rt.name)
    try:
        yield rt
    finally:
        _CURRENT.reset(token)


__all__ = ["RUNTIMES", "Runtime", "RuntimeMissing", "Session", "current", "get", "register", "use"]
