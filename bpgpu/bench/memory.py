"""Bytes a step allocates after warm-up (tracemalloc on numpy, the memory pool on CuPy)."""

from __future__ import annotations

from bpgpu.backend import Backend

from .timing import Case


def bytes_allocated_per_step(case: Case, backend: Backend, steps: int = 5) -> dict:
    """Allocation per step after a warm-up step.

    numpy: tracemalloc (numpy reports its data buffers to it) over ``steps``
    steps: ``peak`` is the high-water mark above the starting point (the
    temporaries of a step), ``retained`` the growth per step. CuPy: the default
    memory pool's bytes in use and reserved before and after. These allocators
    are backend-specific by nature, hence the one branch on the backend here.
    """
    case.finish(case.fn())
    if backend.name == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        used0, total0 = pool.used_bytes(), pool.total_bytes()
        for _ in range(steps):
            case.finish(case.fn())
        return {
            "method": "cupy memory pool",
            "peak": None,
            "retained": (pool.used_bytes() - used0) / steps,
            "pool_growth": (pool.total_bytes() - total0) / steps,
        }
    import tracemalloc

    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(steps):
            case.finish(case.fn())
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"method": "tracemalloc", "peak": peak - start, "retained": (end - start) / steps, "pool_growth": None}
