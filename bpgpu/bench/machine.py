"""What a run was measured on: processor, BLAS, versions, and the machine's load."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

import bpgpu
from bpgpu.backend import Backend, gpu_status


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# Vector extensions that decide which GEMM kernels OpenBLAS and XLA pick, in /proc/cpuinfo's names.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The first CPU's model name, with family, model and stepping and its vector extensions
    (``SIMD_FLAGS``) where /proc/cpuinfo gives them: a virtual machine may name only "AMD EPYC",
    and runs on two generations under that name are not comparable."""
    fields: dict[str, str] = {}
    try:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                break  # the first CPU's block ends here
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    ids = [f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields]
    flags = set(fields.get("flags", "").split())
    simd = [flag for flag in SIMD_FLAGS if flag in flags]
    details = "; ".join(part for part in (", ".join(ids), ", ".join(simd)) if part)
    return f"{name} ({details})" if details else name


def machine_info(backend: Backend) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "bpgpu": bpgpu.__version__,
        "gpu": gpu_status().reason,
        "load_average": load_average(),
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            " ".join(str(p[k]) for k in ("internal_api", "version", "architecture") if p.get(k))
            + f" ({p.get('num_threads')} threads)"
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ]
    except ImportError:
        pass
    for peer in ("torch", "jax", "sklearn", "cupy"):
        module = sys.modules.get(peer)
        if module is not None:
            info[peer] = getattr(module, "__version__", "?")
    return info
