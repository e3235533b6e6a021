"""What this machine is, as far as ONNX Runtime's speed depends on it: the CPU model, its instruction-set
flags (MLAS picks its kernels by them: AVX2, AVX-512, VNNI, AMX), the core count and ORT's version.

``auto``'s timing cache keys every entry on :class:`Machine` (:mod:`converters.cache`), the int8 formulations
read the VNNI flag (:func:`converters.int8.default_weight_bits`), and the benchmarks print it.
"""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from functools import lru_cache

#: the x86 flags that decide which MLAS kernels run (printed by the benchmarks, part of the cache key)
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of this CPU (``/proc/cpuinfo``); empty where that file is missing."""
    return frozenset((_cpuinfo_field("flags") or "").split())


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` or the architecture elsewhere)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_vnni", "avx_vnni"} & flags)


@dataclass(frozen=True)
class Machine:
    """The facts about this machine that decide ORT latencies: ``cpu`` (model name), ``cpu_flags`` (those of
    :data:`ISA_FLAGS` it has, space-separated), ``cores`` (``os.cpu_count()``: ORT's default thread count
    follows it) and ``onnxruntime`` (its version)."""

    cpu: str
    cpu_flags: str
    cores: int
    onnxruntime: str

    @classmethod
    @lru_cache(maxsize=1)
    def current(cls) -> "Machine":
        import onnxruntime

        flags = cpu_flags()
        return cls(cpu_model(), " ".join(f for f in ISA_FLAGS if f in flags), os.cpu_count() or 0,
                   onnxruntime.__version__)

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for logs and benchmark headers."""
        flags = self.cpu_flags or "none of " + "/".join(ISA_FLAGS[:5])
        return f"{self.cpu}, {self.cores} cores, flags: {flags}, onnxruntime {self.onnxruntime}"
