"""OpenVINO's CPU plugin: the optional runtime (``pip install 'sapp-compress[openvino]'``), the fastest int8
peer on Intel CPUs (NNCF's post-training int8; BENCHMARKS.md section 23).

OpenVINO reads the ONNX the tool writes. A session reads the graph once (an op OpenVINO has no conversion for
fails there, named) and compiles it once per input shape, static, as a deployment would (dynamic shapes run
slower); one infer request per shape is reused across runs. The compile configuration is explicit:
``PERFORMANCE_HINT`` LATENCY, one stream, ``INFERENCE_NUM_THREADS`` as asked, and
``INFERENCE_PRECISION_HINT`` f32: left to the hint, OpenVINO computes in bf16 on a CPU with avx512_bf16,
which was 1.25-1.75x slower than fp32 where the CPU has no AMX (BENCHMARKS.md section 23) and is not what
was verified.

int8 (:func:`nncf_int8`): NNCF's post-training quantization of the ONNX graph (its ONNX backend: the result is
QDQ ONNX, which OpenVINO runs with its int8 kernels and ONNX Runtime can run too), calibrated on the training
rows, with NNCF's transformer scheme where the graph has attention (Softmax) and no convolution.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from ..errors import ConverterError
from ..export import one_line
from .base import Runtime, register

#: the compile configuration of every session (threads added per session)
CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}


@lru_cache(maxsize=1)
def _core():
    import openvino as ov

    return ov.Core()


def _read(data: bytes):
    """The OpenVINO model of the ONNX ``data`` (read from a temporary file: OpenVINO's ONNX reader takes a
    path); ConverterError naming what it cannot read (an op without a conversion, e.g.)."""
    with tempfile.TemporaryDirectory(prefix="sapp_ov_") as d:
        p = Path(d) / "model.onnx"
        p.write_bytes(data)
        try:
            return _core().read_model(str(p))
        except Exception as e:  # noqa: BLE001 -- OpenVINO's own errors, in one line
            raise ConverterError(f"OpenVINO {OPENVINO.version()} cannot read the graph: "
                                 f"{_first(e)}") from None


def _first(e: Exception) -> str:
    """OpenVINO's messages carry a C++ trace; the line that names the cause."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "not supported" in ln or "unsupported" in ln.lower() or "No conversion rule" in ln:
            return ln[:300]
    return one_line(e)[:300]


class OpenVinoSession:
    """An ONNX graph in OpenVINO's CPU plugin, compiled once per input shape; ``run(None, feed)`` returns
    the outputs in the graph's order, as arrays the caller owns."""

    def __init__(self, data: bytes, threads: int | None, precision: str) -> None:
        self.model = _read(data)
        self.config = {**CONFIG, "INFERENCE_PRECISION_HINT": precision}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._requests: dict[tuple, object] = {}
        self.compiled = None

    def _request(self, feed: dict[str, np.ndarray]):
        sig = tuple(sorted((k, tuple(np.shape(v))) for k, v in feed.items()))
        req = self._requests.get(sig)
        if req is None:
            import openvino as ov

            m = self.model.clone()
            shapes = {}
            for port in m.inputs:
                name = next((n for n in port.get_names() if n in feed), None)
                if name is None:
                    raise ConverterError(f"OpenVINO: no input fed for {port.get_any_name()!r} (fed: "
                                         f"{sorted(feed)})")
                shapes[port] = ov.PartialShape(list(np.shape(feed[name])))
            try:
                m.reshape(shapes)
                self.compiled = _core().compile_model(m, "CPU", self.config)
            except Exception as e:  # noqa: BLE001
                raise ConverterError(f"OpenVINO {OPENVINO.version()} cannot compile the graph: "
                                     f"{_first(e)}") from None
            req = self._requests[sig] = self.compiled.create_infer_request()
        return req

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        req = self._request(feed)
        req.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        return [np.array(t.data, copy=True) for t in req.output_tensors]

    def precision(self) -> str:
        """The precision the plugin says it computes in (after compiling)."""
        if self.compiled is None:
            return "?"
        t = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return t.to_string() if hasattr(t, "to_string") else str(t)


class OpenVino(Runtime):
    name = "openvino"
    title = "OpenVINO"
    extra = "openvino"
    # NNCF's static int8, and ONNX Runtime's dynamic form (which OpenVINO reads too): timed, the faster kept
    int8_forms = ("nncf", "dynamic")
    verify_modes = (("openvino", True),)

    def missing(self) -> str | None:
        gone = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
        return " and ".join(gone) + " (not installed)" if gone else None

    def version(self) -> str:
        import openvino

        return openvino.__version__.split("-")[0]

    def session(self, model, *, threads=None, optimize=True, spin=True) -> OpenVinoSession:
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return OpenVinoSession(data, threads, self.precision())

    def describe(self) -> dict:
        import nncf

        return {**super().describe(), "nncf": nncf.__version__, "config": dict(CONFIG)}


OPENVINO = register(OpenVino())


def _is_transformer(model: onnx.ModelProto) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "Softmax" in ops and "Conv" not in ops


def nncf_int8(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]] | None, bits: int = 8
              ) -> onnx.ModelProto:
    """NNCF's post-training int8 of ``model`` (its ONNX backend: QDQ ONNX), calibrated on ``calibration``
    (batches of input rows; every batch is one calibration item). ``bits`` 7 (a CPU without VNNI:
    :func:`converters.int8.default_weight_bits`): NNCF's overflow fix on every layer, so the integer kernels'
    int16 pair sums cannot saturate (8-bit weights there gave 23 % of the output's scale as error)."""
    if not calibration:
        raise ConverterError("NNCF's int8 needs calibration inputs")
    nncf = importlib.import_module("nncf")
    logging.getLogger("nncf").setLevel(logging.ERROR)
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if _is_transformer(model) else {}
    if bits == 7:  # no VNNI: u8 x s8 pair sums saturate int16 unless every weight has 7 bits
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    items = [{k: np.ascontiguousarray(v) for k, v in batch.items()} for batch in calibration]
    try:
        with _quiet_progress():
            q = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **kwargs)
    except Exception as e:  # noqa: BLE001 -- NNCF's own errors, in one line
        raise ConverterError(f"NNCF's int8 failed: {one_line(e)}") from None
    del q.metadata_props[:]
    q.metadata_props.extend(model.metadata_props)
    return q


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """NNCF draws progress bars (on stdout, and on stderr off a terminal); inside a job, the tool's own
    progress lines are the ones shown."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if not sys.stderr.isatty():
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        yield


def save_ir(onnx_bytes: bytes, xml: Path) -> list[Path]:
    """OpenVINO IR of the ONNX ``onnx_bytes`` at ``xml`` (and its weights beside it, ``.bin``), weights kept
    in their precision (no fp16 compression); returns the files written."""
    import openvino as ov

    ov.save_model(_read(onnx_bytes), str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]


__all__ = ["CONFIG", "OPENVINO", "OpenVino", "OpenVinoSession", "nncf_int8", "save_ir"]
