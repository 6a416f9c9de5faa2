"""The exact CUDA source CuPy generates for a kernel call, and NVRTC compiles of it.

No GPU is needed: calling a kernel would query the device before any source is
generated, so this module rebuilds the call's argument metadata (CuPy's
``_ArgInfo``) from numpy arrays and asks CuPy's own Python-callable code
generators for the source.  Those generators are CuPy internals: the version is
pinned (``SUPPORTED_CUPY``) and :func:`require_cupy` fails with a clear message
when they moved.  The call semantics reproduced here (scalar typing, broadcasting,
dimension reduction, reduction axes and block sizes) follow CuPy 14.2's
``_kernel.pyx`` and ``_reduction.pyx``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SUPPORTED_CUPY = ("14.2.",)
ARCHS = ("sm_80", "sm_90")

# Every SLF001 exemption below marks a use of CuPy's private code generators: the GPU-less
# source check has no public API to call instead (the version they come from is pinned).

# _ArgInfo kinds (cupy/_core/_kernel.pxd)
ARG_NDARRAY, ARG_INDEXER, ARG_SCALAR = 1, 2, 3
INT32_MAX = 0x7FFFFFFF


class CupyInternalsError(RuntimeError):
    """The installed CuPy does not expose the internals this checker relies on."""


@functools.cache
def require_cupy():
    """Import cupy and check that the pinned internals are where this module expects them."""
    try:
        import cupy
    except ImportError as exc:  # the caller decides whether this is a skip
        raise ImportError(f"cupy is not importable: {exc}") from exc
    if not cupy.__version__.startswith(SUPPORTED_CUPY):
        raise CupyInternalsError(
            f"bpgpu.testing generates kernel source through CuPy internals checked against CuPy "
            f"{'/'.join(v + 'x' for v in SUPPORTED_CUPY)}; installed: {cupy.__version__}. "
            "Install the kernel-check extra (cupy-cuda12x==14.2.0) or re-validate "
            "bpgpu/testing/sources.py against the new cupy/_core/_kernel.pyx and _reduction.pyx."
        )
    from cupy._core import _kernel, _reduction, core

    needed = {
        _kernel: ("_ArgInfo", "_TypeMap", "_get_elementwise_kernel_code"),
        _reduction: ("_ReductionKernel_get_cached_function_code", "_get_block_specs", "_get_axis"),
        core: ("_cupy_header_list", "assemble_cupy_compiler_options"),
        _reduction.ReductionKernel: ("_params", "map_expr", "reduce_expr", "post_map_expr", "identity"),
        cupy.cuda.compiler: ("_NVRTCProgram",),
    }
    for module, names in needed.items():
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise CupyInternalsError(f"CuPy {cupy.__version__}: {module.__name__} lacks {missing}")
    return cupy


def nvrtc_available():
    """(True, '') when NVRTC loads, else (False, why)."""
    try:
        require_cupy()
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except ImportError as exc:
        return False, str(exc)
    except CupyInternalsError:
        raise  # a CuPy other than the pinned one is an error to report, not a reason to skip
    except Exception as exc:  # NVRTC library missing: cupy raises its own error types
        return False, f"NVRTC is not loadable: {type(exc).__name__}: {exc}"
    return True, ""


# --- argument metadata ------------------------------------------------------


def index_32_bits(a):
    """CuPy's _index_32_bits: the size and the byte span both fit an int32."""
    if a.size == 0:
        return True
    span = sum((n - 1) * abs(s) for n, s in zip(a.shape, a.strides)) + a.itemsize
    return a.size <= INT32_MAX and span <= INT32_MAX


def cupy_mirror(a):
    """A metadata-only cupy.ndarray over ``a``'s host memory: CuPy's own view, flag and
    dimension-reduction logic runs on it without a device (nothing is ever read)."""
    cupy = require_cupy()
    from cupy.cuda import memory

    low = a.ctypes.data + sum(min(0, (n - 1) * s) for n, s in zip(a.shape, a.strides))
    span = max(1, sum(abs((n - 1) * s) for n, s in zip(a.shape, a.strides)) + a.itemsize)
    mem = memory.UnownedMemory(low, span, a, device_id=0)
    ptr = memory.MemoryPointer(mem, a.ctypes.data - low)
    return cupy.ndarray(a.shape, a.dtype, memptr=ptr, strides=a.strides)


def _c_contiguous(a):
    return bool(cupy_mirror(a).flags.c_contiguous)


def reduced_view(a):
    """CuPy's ndarray.reduced_view() (the one-argument path of _reduce_dims), as a numpy view."""
    if a.ndim <= 1:
        return a
    r = cupy_mirror(a).reduced_view()
    return np.lib.stride_tricks.as_strided(a, r.shape, r.strides)


def ndarray_info(a):
    import cupy
    from cupy._core import _kernel

    return _kernel._ArgInfo(ARG_NDARRAY, cupy.ndarray, a.dtype, a.ndim, _c_contiguous(a), index_32_bits(a))  # noqa: SLF001


def scalar_info(dtype):
    from cupy._core import _kernel, _scalar

    return _kernel._ArgInfo(ARG_SCALAR, _scalar.CScalar, np.dtype(dtype), 0, True, True)  # noqa: SLF001


def indexer_info(shape):
    from cupy._core import _carray, _kernel

    size = int(np.prod(shape, dtype=np.int64))
    return _kernel._ArgInfo(ARG_INDEXER, _carray.Indexer, None, len(shape), True, size <= INT32_MAX)  # noqa: SLF001


def reduced_views(arrays, shape):
    """CuPy's _reduced_view_core: merge axes that every strided array walks contiguously.

    ``arrays`` are the non-raw arrays (already broadcast to ``shape``); returns the
    new shape and the views, which decide the ``ndim`` and contiguity baked into the
    generated source."""
    ndim = len(shape)
    if ndim <= 1 or not arrays:
        return tuple(shape), list(arrays)
    strided = [a for a in arrays if not _c_contiguous(a)]
    if strided and ndim == 2:
        return tuple(shape), list(arrays)
    if not strided:
        size = int(np.prod(shape))
        return (size,), [np.lib.stride_tricks.as_strided(a, (size,), (a.itemsize,)) for a in arrays]
    vecshape = list(shape)
    axes, last = [], -1
    for ax in range(ndim):
        if vecshape[ax] == 1:
            continue
        if last < 0:
            last = ax
            continue
        if any(a.strides[ax] * vecshape[ax] != a.strides[last] for a in strided):
            axes.append(last)
        else:
            vecshape[ax] *= vecshape[last]
        last = ax
    if last >= 0:
        axes.append(last)
    if len(axes) == ndim:
        return tuple(shape), list(arrays)
    newshape = tuple(vecshape[ax] for ax in axes)
    views = [np.lib.stride_tricks.as_strided(a, newshape, tuple(a.strides[ax] for ax in axes)) for a in arrays]
    return newshape, views


def _reduce_dims(args, params, shape):
    """CuPy's _reduce_dims: replaces the arrays in ``args`` by reduced views, returns the shape."""
    shape = tuple(shape)
    if len(shape) <= 1 or not args:
        return shape
    if len(args) == 1:
        a = args[0]
        if params[0].raw or not isinstance(a, np.ndarray):
            return shape
        args[0] = reduced_view(a)
        return tuple(args[0].shape)
    idx = [i for i, a in enumerate(args) if isinstance(a, np.ndarray) and not params[i].raw]
    shape, views = reduced_views([args[i] for i in idx], shape)
    for i, v in zip(idx, views):
        args[i] = v
    return shape


# --- one kernel call, planned as CuPy would plan it -------------------------


@dataclasses.dataclass
class Launch:
    """Everything a kernel call needs: the generated source and the launch arguments.

    ``args`` holds, per kernel parameter, a numpy array (a view of the caller's
    data), a numpy scalar, or a shape tuple for a CIndexer."""

    name: str
    code: str
    options: tuple
    args: list
    block_size: int = 1
    n_blocks: int = 1

    def dtype_name(self):
        """The dtype of the first floating-point array argument (the kernel's T)."""
        for a in self.args:
            if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                return a.dtype.name
        return "-"

    def headers(self):
        """The #include lines CuPy puts before every generated source."""
        from cupy._core import core

        return tuple(f"#include <{h}>" for h in core._cupy_header_list)  # noqa: SLF001


def _param_dtypes(kernel, in_args, out_args):
    def dt(a):
        return a.dtype.type if isinstance(a, np.ndarray) else None

    from cupy._core import _kernel

    return _kernel._decide_params_type(  # noqa: SLF001
        kernel.in_params, kernel.out_params, tuple(dt(a) for a in in_args), tuple(dt(a) for a in out_args)
    )


def _as_scalar(x, t):
    return np.dtype(t).type(x)


def plan_elementwise(kernel, *args):
    """Plan ``kernel(*args)`` for an ElementwiseKernel as CuPy 14.2 does (no ``size=``)."""
    require_cupy()
    from cupy._core import _kernel

    nin, nout = kernel.nin, kernel.nout
    if len(args) not in (nin, nin + nout):
        raise TypeError(f"{kernel.name}: expected {nin} or {nin + nout} arguments, got {len(args)}")
    in_args, out_args = list(args[:nin]), list(args[nin:])
    in_types, out_types, type_map = _param_dtypes(kernel, in_args, out_args)
    in_args = [a if isinstance(a, np.ndarray) else _as_scalar(a, t) for a, t in zip(in_args, in_types)]
    params = kernel.params
    arrays = [(i, a) for i, a in enumerate(in_args + out_args) if isinstance(a, np.ndarray) and not params[i].raw]
    shape = np.broadcast_shapes(*(a.shape for _, a in arrays))
    if not out_args:
        out_args = [np.empty(shape, t) for t in out_types]
    for p, a in zip(kernel.out_params, out_args):
        if not p.raw and a.shape != shape:
            raise ValueError(f"{kernel.name}: out shape {a.shape} does not match the broadcast shape {shape}")
    # Unlike a ufunc, an ElementwiseKernel never copies an input that overlaps an output.
    allargs = in_args + out_args
    for i, a in enumerate(allargs):
        if isinstance(a, np.ndarray) and not params[i].raw and a.shape != shape:
            allargs[i] = np.broadcast_to(a, shape)
    if kernel.reduce_dims:
        shape = _reduce_dims(allargs, params, shape)
    infos = tuple(ndarray_info(a) if isinstance(a, np.ndarray) else scalar_info(a.dtype) for a in allargs) + (
        indexer_info(shape),
    )
    code = _kernel._get_elementwise_kernel_code(  # noqa: SLF001
        infos, type_map, params, kernel.operation, kernel.name, kernel.preamble, **kernel.kwargs
    )
    return Launch(kernel.name, code, tuple(kernel.kwargs.get("options", ())), allargs + [tuple(shape)]), out_args


def plan_reduction(kernel, *args, axis=None, keepdims=False):
    """Plan ``kernel(*args, axis=, keepdims=)`` for a ReductionKernel on CuPy's simple
    (non-CUB) path; the block size and stride are CuPy's defaults for these shapes."""
    require_cupy()
    from cupy._core import _kernel, _reduction

    nin = kernel.nin
    in_args, out_args = list(args[:nin]), list(args[nin:])
    in_types, out_types, type_map = _param_dtypes(kernel, in_args, out_args)
    in_args = [a if isinstance(a, np.ndarray) else _as_scalar(a, t) for a, t in zip(in_args, in_types)]
    arrays = [a for a in in_args if isinstance(a, np.ndarray)]
    a_shape = np.broadcast_shapes(*(a.shape for a in arrays))
    in_args = [np.broadcast_to(a, a_shape) if isinstance(a, np.ndarray) else a for a in in_args]
    reduce_axis, out_axis = _reduction._get_axis(axis, len(a_shape))  # noqa: SLF001
    if len(in_args) == 1 and len(out_axis) <= 1 and not _c_contiguous(in_args[0]):
        key = lambda i: -abs(in_args[0].strides[i])  # noqa: E731  (CuPy's _sort_axis)
        reduce_axis, out_axis = tuple(sorted(reduce_axis, key=key)), tuple(sorted(out_axis, key=key))
    if keepdims:
        out_shape = tuple(1 if i in reduce_axis else n for i, n in enumerate(a_shape))
    else:
        out_shape = tuple(a_shape[i] for i in out_axis)
    if not out_args:
        out_args = [np.empty(out_shape, t) for t in out_types]
    for a in out_args:
        if a.shape != out_shape:
            raise ValueError(f"{kernel.name}: out shape {a.shape} does not match {out_shape}")
    n_in = int(np.prod(a_shape, dtype=np.int64))
    n_out = max(1, int(np.prod(out_shape, dtype=np.int64)))
    index_t = ("IndexT", "int64" if n_in / n_out > INT32_MAX else "int32")
    type_map = _kernel._TypeMap(type_map._pairs + (index_t,))  # noqa: SLF001
    perm = reduce_axis + out_axis
    in_shape = tuple(a_shape[i] for i in perm)
    in_args = [a.transpose(perm) if isinstance(a, np.ndarray) else a for a in in_args]
    kernel_out = list(out_args)
    if kernel.reduce_dims:
        in_shape = _reduce_dims(in_args, kernel.in_params, in_shape)
        out_shape_k = _reduce_dims(kernel_out, kernel.out_params, out_shape)
    else:
        out_shape_k = out_shape
    contiguous = 1
    for a in in_args:
        if not isinstance(a, np.ndarray):
            continue
        size = 1
        for j in range(len(out_shape_k)):
            if a.strides[len(in_shape) - j - 1] != size * a.itemsize:
                break
            size *= out_shape_k[len(out_shape_k) - j - 1]
        contiguous = max(contiguous, size)
    block_size, block_stride, n_blocks = _reduction._get_block_specs(  # noqa: SLF001
        int(np.prod(in_shape, dtype=np.int64)), int(np.prod(out_shape_k, dtype=np.int64)), contiguous, -1
    )
    allargs = in_args + kernel_out + [tuple(in_shape), tuple(out_shape_k), np.int32(block_stride)]
    infos = tuple(
        ndarray_info(a) if isinstance(a, np.ndarray) else scalar_info(a.dtype) for a in in_args + kernel_out
    ) + (indexer_info(in_shape), indexer_info(out_shape_k), scalar_info(np.int32))
    code = _reduction._ReductionKernel_get_cached_function_code(  # noqa: SLF001
        kernel.nin,
        kernel.nout,
        kernel._params,  # noqa: SLF001 - CuPy's kernel parameters, as CuPy itself passes them
        infos,
        type_map,
        kernel.name,
        block_size,  # noqa: SLF001
        kernel.reduce_type,
        kernel.identity,
        kernel.map_expr,
        kernel.reduce_expr,
        kernel.post_map_expr,
        kernel.preamble,
        tuple(kernel.options),
    )
    return Launch(kernel.name, code, tuple(kernel.options), allargs, block_size, n_blocks), out_args


def plan(kernel, *args, **kwargs):
    """Plan a call of an ElementwiseKernel or a ReductionKernel."""
    cupy = require_cupy()
    if isinstance(kernel, cupy.ReductionKernel):
        return plan_reduction(kernel, *args, **kwargs)
    if isinstance(kernel, cupy.ElementwiseKernel):
        if kwargs:
            raise TypeError(f"{kernel.name}: unsupported keyword arguments {sorted(kwargs)}")
        return plan_elementwise(kernel, *args)
    raise TypeError(f"not a CuPy ElementwiseKernel or ReductionKernel: {kernel!r}")


def full_source(launch):
    """The translation unit CuPy hands to NVRTC: its header list, then the generated code."""
    return "\n".join(launch.headers()) + "\n" + launch.code


# --- NVRTC --------------------------------------------------------------------


class KernelCompileError(RuntimeError):
    """NVRTC rejected a generated source; the message carries the log and the numbered source."""


def numbered(source):
    return "\n".join(f"{n:4d}  {line}" for n, line in enumerate(source.splitlines(), 1))


def _cache_marker(source, options, arch):
    """A file whose existence records that NVRTC accepted this exact source (failures are
    never cached); keyed by the source, the options, the arch and the NVRTC version."""
    import hashlib
    import os

    from cupy.cuda import nvrtc

    from bpgpu.testing import host

    key = "\0".join((source, *options, arch, str(nvrtc.getVersion()), require_cupy().__version__))
    return os.path.join(host.cache_dir(), "nvrtc-ok-" + hashlib.sha256(key.encode()).hexdigest()[:32])


@functools.cache
def _compile_cached(source, options, arch):
    import os

    cupy = require_cupy()
    from cupy._core import core
    from cupy.cuda import compiler

    marker = _cache_marker(source, options, arch)
    if os.path.exists(marker):
        return True
    opts = core.assemble_cupy_compiler_options(options) + (
        "-ftz=true",
        f"-arch={arch}",
        "--device-as-default-execution-space",
    )
    method = "ptx" if arch.startswith("compute_") else "cubin"
    prog = compiler._NVRTCProgram(source, "kern.cu", method=method)  # noqa: SLF001
    try:
        prog.compile(opts)
    except compiler.CompileException as exc:
        raise KernelCompileError(
            f"NVRTC ({arch}) rejected the source CuPy {cupy.__version__} generated:\n"
            f"{exc.get_message() if hasattr(exc, 'get_message') else exc}\n"
            f"--- generated source (line numbers as in the log) ---\n{numbered(source)}"
        ) from None
    open(marker, "w").close()
    return True


def nvrtc_compile(launch, arch):
    """Compile the launch's full source for ``arch`` ('sm_80', 'sm_90', 'compute_90') as
    CuPy would; raises KernelCompileError with the NVRTC log and the numbered source."""
    return _compile_cached(full_source(launch), tuple(launch.options), arch)
