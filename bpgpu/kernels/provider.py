"""Which implementation runs each compiled CPU kernel: the extension compiled ahead of time, or numba's JIT.

:mod:`bpgpu.kernels.cpu` (the numpy backend's table) takes every core kernel of
:mod:`bpgpu.kernels.compiled` from :func:`kernel` here: a :class:`Kernel` that calls the
kernel's export in the extension :mod:`bpgpu.kernels.aot` builds, when the extension is
built, fresh (:func:`load`: its recorded digest of the sources and the CPU equals this
checkout's) and not turned off, and when one of its exports takes exactly these arguments;
otherwise numba's dispatcher of the same kernel, imported on first need. So a default fit,
whose kernels all have exports, never imports numba, and everything else works as before.

    BPGPU_AOT=0    numba's JIT only (the extension is not loaded)
    BPGPU_JIT=0    no compiled kernels at all (bpgpu.kernels.jit: the array-API table)

:data:`reason` says why the extension is not used ("" while it is); :func:`describe` says
which implementation runs, in words (the numpy backend's ``reason`` ends with it). This
module is not part of the extension's digest: changing it needs no rebuild.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from bpgpu.kernels import aot

# Why the extension is not used ("" while it is), once load() has decided.
reason = ""


def enabled() -> bool:
    """Whether the extension may be used: not with BPGPU_AOT=0 (nor with BPGPU_JIT=0, which turns off
    every compiled kernel)."""
    return os.environ.get("BPGPU_AOT", "1") != "0" and os.environ.get("BPGPU_JIT", "1") != "0"


_loaded: list[Any] = []  # [extension or None], once load() has decided


def load() -> Any:
    """The extension if it is built, fresh and enabled, else None (decided once; :data:`reason` says why)."""
    global reason
    if not _loaded:
        module, reason = _load()
        _loaded.append(module)
    return _loaded[0]


def _load() -> tuple[Any, str]:
    if not enabled():
        return None, "BPGPU_AOT=0" if os.environ.get("BPGPU_AOT", "1") == "0" else "BPGPU_JIT=0"
    path = aot.extension_path()
    if not path.exists():
        return None, f"not built ({path.name} missing: python -m bpgpu.kernels.aot build)"
    try:
        ext = importlib.import_module(f"{__package__}.{aot.MODULE}")
        words, host = aot.recorded(ext)
    except Exception as exc:  # noqa: BLE001  (an unloadable or foreign file means: do not use it)
        return None, f"{path.name} not loadable ({type(exc).__name__}: {exc})"
    if words != aot.digest(host):
        what = f"this CPU or {', '.join(aot.SOURCES)}" if host else ", ".join(aot.SOURCES)
        return None, f"stale: {what} changed since {path.name} was built (python -m bpgpu.kernels.aot build)"
    missing = [e.name(d) for e in aot.EXPORTS for d in aot.DTYPES if not hasattr(ext, e.name(d))]
    if missing:
        return None, f"{path.name} lacks {', '.join(missing)}"
    return ext, ""


def describe() -> str:
    """Which compiled kernels run, in words (for the backend's ``reason``)."""
    ext = load()
    if ext is not None:
        return f"kernels compiled ahead of time ({aot.extension_path().name}), numba's JIT for the rest"
    return f"numba's JIT (ahead-of-time kernels not used: {reason})"


class Kernel:
    """``kernel(*args)``: a core kernel of compiled.py, by its export for these arguments when the
    extension is fresh and one fits exactly (every array argument of the export's dtype, ndim, C order
    and alignment; the optional arguments None or given as the export declares), else by numba's
    dispatcher, loaded on first need. Scalars are converted as the export declares (int64, float64,
    bool): the callers pass those types, as they did to the dispatcher."""

    def __init__(self, name: str):
        self.__name__ = name
        # [(function, arity, positions that must be None, ((position, dtype, ndim) of the arrays))],
        # found on the first call (and again after reset())
        self._exports: list[tuple[Any, int, tuple[int, ...], tuple[Any, ...]]] | None = None
        self._jit: Any = None

    def __call__(self, *args: Any) -> Any:
        fn, given = self.export_for(*args)
        return self.jit(*args) if fn is None else fn(*args[:given])

    def export_for(self, *args: Any) -> tuple[Any, int]:
        """(the export that takes these arguments, how many of them it takes: the leading ones), or
        (None, 0) when none fits. A caller whose arguments keep their dtypes and layouts from call to
        call (jit.CompiledStep) asks once and calls the export itself."""
        exports = self._exports
        if exports is None:
            exports = self._exports = _exports_of(self.__name__)
        n = len(args)
        for fn, arity, nones, arrays in exports:
            if n != arity:
                continue
            for i in nones:
                if args[i] is not None:
                    break
            else:
                for i, dtype, ndim in arrays:
                    a = args[i]
                    if type(a) is not _ndarray or a.dtype is not dtype or a.ndim != ndim:
                        break
                    flags = a.flags
                    if not (flags.c_contiguous and flags.aligned):
                        break
                else:
                    return fn, arity - len(nones)
        return None, 0

    def forget(self) -> None:
        """Find the exports again on the next call (:func:`reset`)."""
        self._exports = None

    @property
    def jit(self) -> Any:
        """numba's dispatcher of this kernel (importing numba and compiled.py on first use)."""
        if self._jit is None:
            self._jit = getattr(importlib.import_module(f"{__package__}.compiled"), self.__name__)
        return self._jit

    @property
    def exports(self) -> int:
        """How many exports of the extension serve this kernel (0: numba's JIT only)."""
        if self._exports is None:
            self._exports = _exports_of(self.__name__)
        return len(self._exports)


class ByDtype(Kernel):
    """A :class:`Kernel` of one array argument whose callers pass only C-contiguous, aligned arrays of
    one ndim (validation's finiteness check): the implementation is looked up once per dtype, not
    matched on every call (1.3 µs a call, a third of the check: benchmarks/NOTES.md, "B2")."""

    def __init__(self, name: str):
        super().__init__(name)
        self._by_dtype: dict[Any, Any] = {}

    def __call__(self, x: Any) -> Any:
        fn = self._by_dtype.get(x.dtype)
        if fn is None:
            export, _ = self.export_for(x)
            fn = self._by_dtype[x.dtype] = self.jit if export is None else export
        return fn(x)

    def forget(self) -> None:
        super().forget()
        self._by_dtype.clear()


_ndarray: Any = None
_KERNELS: list[Kernel] = []


def kernel(name: str, by_dtype: bool = False) -> Kernel:
    """The core kernel ``name`` of compiled.py, through the extension's exports where they fit
    (:class:`Kernel`; :class:`ByDtype` for a kernel of one array whose callers vouch for its layout)."""
    k = ByDtype(name) if by_dtype else Kernel(name)
    _KERNELS.append(k)
    return k


def _exports_of(name: str) -> list[tuple[Any, int, tuple[int, ...], tuple[Any, ...]]]:
    global _ndarray
    import numpy as np

    _ndarray = np.ndarray
    ext = load()
    exports = []
    for e in aot.EXPORTS if ext is not None else ():
        if e.kernel != name:
            continue
        for d in aot.DTYPES:
            arrays = tuple((i, np.dtype(t), ndim) for i, t, ndim in e.arrays(d))
            arity = len(e.args) + e.nones
            exports.append((getattr(ext, e.name(d)), arity, tuple(range(len(e.args), arity)), arrays))
    return exports


def reset() -> None:
    """Decide again whether the extension is used (after a rebuild, or a change of BPGPU_AOT: tests)."""
    _loaded.clear()
    for k in _KERNELS:
        k.forget()
