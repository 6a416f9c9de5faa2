"""Checks at the edge: every bad input gets an error naming the argument, layer and shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from bpgpu.backend import is_sparse
from bpgpu.kernels import jit

DTYPES = ("float32", "float64")
_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # the compiled table's all_finite takes these


def layer_sizes(sizes: Any) -> tuple[int, ...]:
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise TypeError(f"layer_sizes must be a sequence of ints, got {type(sizes).__name__}") from None
    if len(sizes) < 2:
        raise ValueError(f"layer_sizes needs at least an input and an output layer, got {list(sizes)}")
    for l, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"layer_sizes[{l}] (layer {l}) must be an int, got {n!r}")
        if n < 1:
            raise ValueError(f"layer {l} must have at least 1 unit, got layer_sizes[{l}]={n} in {list(sizes)}")
    return tuple(int(n) for n in sizes)


def per_layer(value: Any, count: int, argument: str) -> list[Any]:
    """One name for every layer, or a list with exactly one name per layer."""
    if isinstance(value, str):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{argument} has {len(values)} entries but the net has {count} such layers")
    return values


def _dtype_str(dtype: Any) -> str:
    """numpy's name of a dtype given as a string, numpy dtype or array-API dtype object."""
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]  # e.g. array_api_strict.float64


def dtype_name(dtype: Any) -> str:
    name = _dtype_str(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def numeric_kind(x: Any, argument: str) -> None:
    """Reject strings, objects and complex numbers before any conversion tries them."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{argument} is not a rectangular numeric array: {exc}") from None
    if not _dtype_str(dtype).startswith(("bool", "int", "uint", "float")):
        raise TypeError(f"{argument} must hold real numbers, got dtype {dtype} with shape {_shape_of(x)}")


def batch(x: Any, xp: Any, argument: str, width: int, layer: str, sizes: Sequence[int]) -> None:
    """Check a converted 2-D batch (dense, or a CSR matrix: its stored values): width, emptiness and
    finiteness."""
    if x.ndim != 2:
        raise ValueError(
            f"{argument} must be 2-D (samples, features) for {layer} of MLP {list(sizes)}, got shape {tuple(x.shape)}"
        )
    rows, cols = x.shape
    if rows == 0:
        raise ValueError(f"{argument} is an empty batch: shape {tuple(x.shape)}")
    if cols != width:
        raise ValueError(
            f"{argument} has {cols} columns but {layer} of MLP {list(sizes)} has {width} units: "
            f"{argument}.shape={tuple(x.shape)}"
        )
    values = x.data if is_sparse(x) else x  # a sparse matrix's implicit zeros are finite
    if not all_finite(values, xp):
        # the usual way a finite float64 input gets here: the cast to a float32 net
        overflow = _dtype_str(x.dtype) == "float32" and bool(xp.any(xp.isinf(values)))
        hint = (
            "; float32 holds at most 3.4e38 and larger values became Inf: dtype='float64' keeps them"
            if overflow
            else ""
        )
        raise ValueError(f"{argument} contains NaN or Inf (shape {tuple(x.shape)}){hint}")


def all_finite(x: Any, xp: Any) -> bool:
    """Whether every element of x is finite, with no temporary array in the usual case: a finite
    sum proves it (a NaN or ±Inf makes the sum NaN or ±Inf); only a sum that is not finite (which
    finite elements reach by overflow) needs the elementwise test. A C-contiguous float numpy array
    of up to 2 dimensions, once the compiled table is loaded (never loaded for this check), goes
    through its vectorized pass instead (:func:`bpgpu.kernels.compiled.all_finite`: 4 µs against
    numpy's 21 µs for 128 × 784 float32, benchmarks/NOTES.md "P7")."""
    if (
        type(x) is np.ndarray
        and x.ndim in (1, 2)
        and x.size > 0
        and x.dtype in _COMPILED_DTYPES
        and (flags := x.flags).c_contiguous
        and flags.aligned  # what the table's all_finite takes (it picks its implementation by dtype alone)
        and (table := jit.loaded()) is not None  # never loads the table (nor numba) from here
    ):
        return bool(table.all_finite(x.reshape(1, -1) if x.ndim == 1 else x))
    return bool(xp.isfinite(xp.sum(x))) or bool(xp.all(xp.isfinite(x)))


def sample_weight(s: Any, m: int) -> np.ndarray:
    """Per-sample weights as a host float64 vector of length m: finite, >= 0, not all zero."""
    numeric_kind(s, "sample_weight")
    if array_api_compat.is_cupy_array(s):
        s = s.get()  # device -> host, on purpose: the weights are split into batches on the host
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (m,):
        raise ValueError(
            f"sample_weight must have shape ({m},), one weight per row of X (X has {m} rows), got shape {s.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("sample_weight contains NaN or Inf")
    if np.any(s < 0):
        raise ValueError(f"sample_weight must be >= 0, got {s.min():g} at row {int(np.argmin(s))}")
    if not np.any(s > 0):
        raise ValueError("sample_weight must contain at least one non-zero weight (all are zero)")
    return s
