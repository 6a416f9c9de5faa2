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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
            f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
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
