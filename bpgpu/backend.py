"""The array-API shim: which namespace, which device, and explicit transfers.

This is the only module that imports CuPy (lazily) or decides CPU versus GPU.
Everything above it receives a :class:`Backend` and calls ``backend.xp`` (an
array-API namespace from array-api-compat) and ``backend.ops`` (the fused
kernel table from :mod:`bpgpu.kernels`); nobody else branches on the library.

Selection order: an explicit argument, then the ``BPGPU_BACKEND`` environment
variable, then "auto" (CuPy only when a CUDA device is truly usable, else
numpy), logged once with the reason.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

log = logging.getLogger("bpgpu")

_NUMPY_NAMES = ("numpy", "cpu")
_CUPY_NAMES = ("cupy", "gpu", "cuda")


@dataclass(frozen=True)
class GpuStatus:
    """Whether CuPy can run here, and the reason in words."""

    usable: bool
    reason: str


# The CUDA driver library, by platform: what CuPy itself ends up loading.
_DRIVER_LIBRARIES = {"win32": ("nvcuda.dll",), "darwin": ()}
_DEFAULT_DRIVER_LIBRARIES = ("libcuda.so.1", "libcuda.so")


def cuda_driver() -> str:
    """Why there is no CUDA device to use, judged from the driver alone ("" when there may be one).

    ctypes loads the driver library and asks it for its devices (cuInit,
    cuDeviceGetCount): milliseconds, against the most of a second that importing
    CuPy takes only to find out the same. An error here is no verdict (""): CuPy's
    own probe decides then.
    """
    import ctypes
    import sys

    names = _DRIVER_LIBRARIES.get(sys.platform, _DEFAULT_DRIVER_LIBRARIES)
    for name in names:
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return f"no CUDA driver (none of {', '.join(names) or 'the CUDA libraries'} loads)"
    try:
        status = driver.cuInit(0)
        if status == 100:  # CUDA_ERROR_NO_DEVICE
            return "no CUDA device (the CUDA driver finds none)"
        count = ctypes.c_int(0)
        if status == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value == 0:
            return "no CUDA device (the CUDA driver finds none)"
    except (AttributeError, OSError):
        pass
    return ""


@functools.lru_cache(maxsize=1)
def gpu_status() -> GpuStatus:
    """Probe the GPU once per process: the driver (:func:`cuda_driver`), then CuPy's import,
    driver, device, and a smoke test.

    The driver comes first so that a machine without one never imports CuPy.
    ``cupy.is_available()`` only counts devices; a machine can have a device and
    still lack NVRTC, the CUDA headers or cuBLAS, so a tiny kernel and a matmul
    are actually run (docs/guide/gpu.rst, "Which machines count as having a GPU").
    """
    missing = cuda_driver()
    if missing:
        return GpuStatus(False, missing)
    try:
        import cupy
        from cupy.cuda import runtime
    except Exception as exc:  # ImportError, or a broken install raising anything
        return GpuStatus(False, f"cupy not installed ({type(exc).__name__}: {exc})")
    try:
        driver = runtime.driverGetVersion()
    except Exception as exc:
        return GpuStatus(False, f"no CUDA driver ({exc})")
    if driver == 0:
        return GpuStatus(False, "no CUDA driver")
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as exc:
        if exc.status == 35:
            return GpuStatus(
                False,
                f"CUDA driver {driver} too old for CuPy's runtime {runtime.runtimeGetVersion()}",
            )
        if exc.status == 100:
            return GpuStatus(False, "no CUDA device")
        return GpuStatus(False, f"CUDA error {exc}")
    if count == 0:
        return GpuStatus(False, "no CUDA device visible (check CUDA_VISIBLE_DEVICES)")
    try:
        doubled = cupy.ElementwiseKernel("T x", "T y", "y = x + x", "bpgpu_smoke")(cupy.arange(4, dtype=cupy.float32))
        product = cupy.ones((2, 2), dtype=cupy.float32) @ cupy.ones((2, 2), dtype=cupy.float32)
        ok = doubled.get().tolist() == [0.0, 2.0, 4.0, 6.0] and float(product.sum()) == 8.0
    except Exception as exc:
        return GpuStatus(False, f"GPU smoke test failed ({type(exc).__name__}: {exc})")
    if not ok:
        return GpuStatus(False, "GPU smoke test gave wrong numbers")
    name = runtime.getDeviceProperties(0)["name"]
    if isinstance(name, bytes):
        name = name.decode()
    return GpuStatus(True, f"CUDA device 0 is usable ({name}, driver {driver})")


@dataclass(frozen=True)
class Backend:
    """An array library plus the kernel table that goes with it.

    name: "numpy", "cupy", or the name of another array-API namespace (such as
    array_api_strict, used by the tests to prove the generic code is honest).
    """

    name: str
    xp: Any  # array-API namespace
    ops: ModuleType  # kernel table: bpgpu.kernels.{cpu,cuda,generic}
    reason: str = ""

    @property
    def device(self) -> str:
        if self.name == "cupy":
            import cupy

            return f"cuda:{cupy.cuda.Device().id}"
        return "cpu"

    def asarray(self, x: Any, dtype: Any) -> Any:
        """Move ``x`` (list, numpy, CuPy or this namespace) onto this backend, explicitly."""
        if self.name == "numpy":
            if array_api_compat.is_cupy_array(x):
                x = x.get()  # device -> host, on purpose
            return np.asarray(x, dtype=dtype)
        if self.name == "cupy":
            import cupy

            return cupy.asarray(x, dtype=dtype)  # host -> device when x is not on it
        if array_api_compat.is_cupy_array(x):
            x = x.get()
        if not array_api_compat.is_array_api_obj(x) or array_api_compat.is_numpy_array(x):
            x = np.asarray(x)
        return self.xp.asarray(x, dtype=dtype)

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    def as_sparse(self, x: Any, dtype: Any) -> Any:
        """A sparse matrix (scipy's or CuPy's, any format) as a CSR matrix on this backend, explicitly:
        scipy.sparse on numpy, cupyx.scipy.sparse on CuPy (host ↔ device where it is not there yet).
        The network multiplies it as it is (sparse × dense, never densified)."""
        if self.name == "numpy":
            import scipy.sparse

            if is_sparse(x) and type(x).__module__.startswith("cupyx"):
                x = x.get()  # device -> host, on purpose
            return scipy.sparse.csr_array(x, dtype=dtype)
        if self.name == "cupy":
            import cupyx.scipy.sparse

            if not type(x).__module__.startswith("cupyx"):
                import scipy.sparse

                x = scipy.sparse.csr_matrix(x, dtype=dtype)  # cupyx takes scipy's matrices, not its arrays
            return cupyx.scipy.sparse.csr_matrix(x, dtype=dtype)  # host -> device when x is not on it
        raise TypeError(
            f"sparse input needs the numpy or cupy backend (scipy.sparse / cupyx.scipy.sparse); "
            f"the {self.name} namespace has no sparse matrices: pass a dense array"
        )

    # --- dense linear algebra and memory, for the second-order methods ------------

    def gram(self, chunks: Iterable[Any], n: int, dtype: Any) -> Any:
        """A = Σ_c R_cᵀ R_c (n, n), both triangles filled, over the chunks R_c (k_c, n) of a tall
        matrix, so that only one chunk need exist at a time.

        On the CPU each chunk is one BLAS SYRK into A's lower triangle, in place (β = 1: no
        n × n temporary per chunk and half a GEMM's flops), and the triangle is mirrored once
        at the end; elsewhere A += R_cᵀ R_c. dtype: the backend's dtype of A.
        """
        xp = self.xp
        if self.name == "numpy":
            syrk = _blas_syrk(np.dtype(dtype).char)
            if syrk is not None:
                A = np.zeros((n, n), dtype=dtype)
                for R in chunks:
                    # column-major BLAS sees the C-ordered A as Aᵀ and a C-ordered R as Rᵀ (n, k):
                    # C ← Rᵀ R + C into Aᵀ's upper triangle, which is A's lower one
                    R = np.ascontiguousarray(R, dtype=dtype)
                    syrk(1.0, R.T, beta=1.0, c=A.T, trans=0, lower=0, overwrite_c=1)
                _mirror_lower(A)
                return A
        A = xp.zeros((n, n), dtype=dtype)
        for R in chunks:
            A += R.T @ R
        return A

    def cholesky_solve(self, A: Any, B: Any, *, upper_only: bool = False) -> Any | None:
        """X with A X = B for a symmetric positive definite A (k, k), B (k,) or (k, r), by Cholesky:
        LAPACK potrf/potrs through scipy on the CPU (numpy's cholesky when scipy is absent),
        cuSOLVER through CuPy on the GPU, the namespace's ``linalg`` otherwise.

        A must be symmetric with both triangles filled, or, with ``upper_only``, its upper
        triangle A[i, j], j ≥ i (the lower one is then never read); it is overwritten (it holds
        the factor afterwards), so pass a copy to keep it.
        Returns None when A is not numerically positive definite (the factorisation breaks down
        or yields non-finite numbers), so that a caller can damp more and try again.
        """
        xp = self.xp
        if self.name == "numpy":
            potrf, potrs = _lapack_cholesky(A.dtype.char)
            if potrf is not None:
                # LAPACK's potrf/potrs straight, in place (what cho_factor/cho_solve call, without their
                # checks and wrappers: about 0.1 ms of a 0.25 ms solve at k = 200, benchmarks/NOTES.md LM1).
                # LAPACK is column-major: a C-contiguous A is passed as Aᵀ, whose lower triangle is A's upper.
                if A.flags.c_contiguous:
                    F, lower = A.T, 1
                else:
                    F, lower = np.asfortranarray(A), 0 if upper_only else 1
                L, info = potrf(F, lower=lower, clean=0, overwrite_a=1)
                if info != 0:
                    return None
                X, info = potrs(L, B, lower=lower)
                return X if info == 0 and np.all(np.isfinite(X)) else None
            if upper_only:
                A = np.triu(A) + np.triu(A, 1).T
            try:  # the core install has numpy only
                L = np.linalg.cholesky(np.tril(A))
            except np.linalg.LinAlgError:
                return None
            X = np.linalg.solve(L.T, np.linalg.solve(L, B))
            return X if np.all(np.isfinite(X)) else None
        if upper_only:
            A = xp.triu(A) + xp.matrix_transpose(xp.triu(A, k=1))
        if self.name == "cupy":
            import cupy
            from cupyx.scipy.linalg import solve_triangular

            try:
                L = cupy.linalg.cholesky(cupy.tril(A))  # cuSOLVER potrf
            except cupy.linalg.LinAlgError:
                return None
            X = solve_triangular(L, solve_triangular(L, B, lower=True), lower=True, trans="T")
            return X if bool(cupy.all(cupy.isfinite(X))) else None
        try:
            L = xp.linalg.cholesky(xp.tril(A) + xp.matrix_transpose(xp.tril(A, k=-1)))
        except ValueError:  # numpy's LinAlgError, under array_api_strict and the like
            return None
        if not bool(xp.all(xp.isfinite(L))):
            return None
        X = xp.linalg.solve(xp.matrix_transpose(L), xp.linalg.solve(L, B))
        return X if bool(xp.all(xp.isfinite(X))) else None

    def sparse_linalg(self) -> ModuleType:
        """The module with ``eigsh`` and ``LinearOperator`` for arrays of this backend:
        ``cupyx.scipy.sparse.linalg`` on the GPU, ``scipy.sparse.linalg`` otherwise
        (other namespaces then go through host vectors)."""
        if self.name == "cupy":
            import cupyx.scipy.sparse.linalg as sparse_linalg
        else:
            import scipy.sparse.linalg as sparse_linalg
        return sparse_linalg

    def free_memory(self) -> int:
        """Bytes free on this backend's device now: the GPU's free memory plus what CuPy's pool
        holds unused, or the host's available physical memory."""
        if self.name == "cupy":
            import cupy

            free, _ = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            return int(free + pool.free_bytes())
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
            return 1 << 34


@functools.cache
def _lapack_cholesky(char: str) -> tuple[Any, Any]:
    """scipy's LAPACK potrf and potrs for a real numpy dtype character ('f', 'd'), or (None, None)
    (no scipy: the core install has numpy only; another dtype: a complex A's transpose is not A)."""
    try:
        from scipy.linalg import get_lapack_funcs
    except ImportError:
        return None, None
    if char not in "fd":
        return None, None
    return tuple(get_lapack_funcs(("potrf", "potrs"), dtype=np.dtype(char)))


@functools.cache
def _blas_syrk(char: str) -> Any:
    """scipy's BLAS ?syrk for a real numpy dtype character ('f', 'd'), or None (no scipy; another dtype)."""
    try:
        from scipy.linalg import get_blas_funcs
    except ImportError:
        return None
    return get_blas_funcs("syrk", dtype=np.dtype(char)) if char in "fd" else None


def _mirror_lower(A: np.ndarray, block: int = 512) -> None:
    """A[i, j] ← A[j, i] for j > i (the lower triangle copied onto the upper), in place, by
    blocks of rows (no n × n index arrays or temporaries)."""
    n = A.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        A[i0:i1, i1:] = A[i1:, i0:i1].T
        diagonal = A[i0:i1, i0:i1]
        upper = np.triu_indices(i1 - i0, 1)
        diagonal[upper] = diagonal.T[upper]


def is_sparse(x: Any) -> bool:
    """Whether ``x`` is a scipy.sparse or cupyx.scipy.sparse matrix or array (no import of either)."""
    module = type(x).__module__
    if not module.startswith(("scipy.sparse", "cupyx.scipy.sparse")):
        return False
    return hasattr(x, "tocsr") and getattr(x, "ndim", 2) == 2


def to_numpy(x: Any) -> np.ndarray:
    """Bring any backend array to a numpy array on the host (an explicit transfer)."""
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_numpy_array(x):
        return x
    return np.asarray(x)


def of_array(x: Any) -> Backend:
    """The backend that owns array ``x``: CuPy for a CuPy array, numpy for a numpy
    array, the generic kernels for another array-API array. For code handed arrays
    it did not make, such as Dask chunks living on a worker's host or GPU."""
    if array_api_compat.is_cupy_array(x):
        return _named("cupy", source="array")
    if array_api_compat.is_numpy_array(x):
        return _numpy_backend("numpy array")
    return _namespace_backend(array_api_compat.array_namespace(x))


def _numpy_backend(reason: str) -> Backend:
    """numpy with the compiled table (``reason`` says whether its kernels were compiled ahead of time or
    by numba's JIT), or with the array-API reference table (and the reason) when numba cannot be used."""
    from bpgpu.kernels import generic, jit

    table = jit.kernels()
    if table is None:
        table, reason = generic, f"{reason}; array-API kernels: {jit.reason}"
    else:
        reason = f"{reason}; {jit.source()}"
    return Backend("numpy", array_api_compat.array_namespace(np.empty(0)), table, reason)


def _cupy_backend(reason: str) -> Backend:
    import cupy

    from bpgpu.kernels import cuda

    return Backend("cupy", array_api_compat.array_namespace(cupy.empty(0)), cuda, reason)


@functools.cache
def _auto() -> Backend:
    status = gpu_status()
    if status.usable:
        backend = _cupy_backend(f"auto: {status.reason}")
    else:
        backend = _numpy_backend(f"auto: numpy, because {status.reason}")
    log.info("bpgpu backend: %s (%s)", backend.name, backend.reason)
    return backend


def resolve(backend: Any = "auto") -> Backend:
    """Turn a backend request into a :class:`Backend`.

    backend: "auto", "numpy"/"cpu", "cupy"/"gpu", a Backend, or any array-API
    namespace module (e.g. ``array_api_strict``), which gets the generic kernels.
    """
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, ModuleType):
        return _namespace_backend(backend)
    if not isinstance(backend, str):
        raise TypeError(
            f"backend must be 'auto', 'numpy', 'cupy' or an array-API namespace, got {type(backend).__name__}"
        )
    requested = backend.lower()
    if requested == "auto":
        env = os.environ.get("BPGPU_BACKEND", "").strip().lower()
        if env and env != "auto":
            return _named(env, source="BPGPU_BACKEND")
        return _auto()
    return _named(requested, source="backend")


def _named(name: str, source: str) -> Backend:
    if name in _NUMPY_NAMES:
        return _numpy_backend(f"{source}={name!r}")
    if name in _CUPY_NAMES:
        status = gpu_status()
        if not status.usable:
            raise RuntimeError(
                f"{source}={name!r} asks for the GPU, but CuPy cannot run here: "
                f"{status.reason}. Use backend='numpy' or 'auto'."
            )
        return _cupy_backend(f"{source}={name!r}: {status.reason}")
    raise ValueError(f"{source}={name!r} is not a backend; choose 'auto', 'numpy' (or 'cpu') or 'cupy' (or 'gpu')")


@functools.cache
def _namespace_backend(module: ModuleType) -> Backend:
    if module is np:
        return _numpy_backend("numpy module")
    if module.__name__ == "cupy":
        return _named("cupy", source="backend")
    from bpgpu.kernels import generic

    xp = array_api_compat.array_namespace(module.asarray(0.0))
    return Backend(module.__name__, xp, generic, "array-API namespace given explicitly")
