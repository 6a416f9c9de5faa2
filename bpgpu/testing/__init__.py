"""Checks of the CuPy kernels that need no GPU (``python -m bpgpu.testing``).

1. The exact source CuPy 14.2 generates for every kernel of
   :mod:`bpgpu.kernels.cuda` compiles with NVRTC for float16, float32 and
   float64, for sm_80 and sm_90 (:mod:`~bpgpu.testing.sources`).
2. That same source, compiled by g++ against CuPy's own headers, runs on the CPU
   and every op matches the array-API reference on random, broadcast and strided inputs
   (:mod:`~bpgpu.testing.host`, :mod:`~bpgpu.testing.runner`,
   :mod:`~bpgpu.testing.checks`, :mod:`~bpgpu.testing.cases`).

Needs the ``kernel-check`` extra (CuPy and NVRTC) and g++ 12+; no device.
"""

from bpgpu.testing.checks import check_all, run_cases
from bpgpu.testing.runner import HostKernel, HostSession
from bpgpu.testing.sources import (
    ARCHS,
    CupyInternalsError,
    KernelCompileError,
    nvrtc_available,
    nvrtc_compile,
    plan,
    require_cupy,
)

__all__ = [
    "ARCHS",
    "CupyInternalsError",
    "HostKernel",
    "HostSession",
    "KernelCompileError",
    "check_all",
    "nvrtc_available",
    "nvrtc_compile",
    "plan",
    "require_cupy",
    "run_cases",
]
