"""The checks: every CuPy kernel's exact source compiles with NVRTC, and runs right on the CPU.

:func:`run_cases` calls each op of :mod:`bpgpu.kernels.cuda` (the real Python
wrappers, so argument order and in-place contracts are checked too) on numpy
arrays, with every kernel call executed on the CPU from the source CuPy generates
(:mod:`bpgpu.testing.runner`), and compares every array argument (and a loss
value) with the array-API reference :mod:`bpgpu.kernels.generic` run on the same inputs in
float64 (in the case's own dtype for the "extreme" layout, whose clip bounds
depend on the dtype).
:func:`compile_sources` compiles the recorded sources with NVRTC for sm_80 and sm_90.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np

from bpgpu.testing import cases as cases_mod
from bpgpu.testing import runner, sources

# Largest accepted |kernel − float64 reference| / max(1, max |reference|) per array, by dtype.
# float32/float16: a few units of rounding of the dtype plus transcendental-function
# differences; float64: the twins use different but exact-to-rounding formulas.
TOLERANCE = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def cuda_module():
    from bpgpu.kernels import cuda

    return cuda


@contextlib.contextmanager
def kernels_on_host(cuda, replace=None):
    """Route cuda.kernel(name) to HostKernel wrappers; ``replace`` maps names to
    substitute CuPy kernels (the deliberately broken ones of the tests)."""
    original = cuda.kernel
    replace = replace or {}

    def host_kernel(name):
        return runner.HostKernel(replace[name] if name in replace else original(name))

    cuda.kernel = host_kernel
    try:
        yield
    finally:
        cuda.kernel = original


@dataclasses.dataclass
class Result:
    case: object
    error: float = float("nan")  # worst normalised difference over the compared arrays
    worst: str = ""  # which argument it was
    kernels: tuple = ()  # names of the kernels launched
    sources: tuple = ()  # their generated sources
    failure: str = ""  # empty when within tolerance

    @property
    def ok(self):
        return not self.failure


def _reference_args(args, dtype=np.float64):
    """Copies of the arguments in ``dtype``; an array passed twice (out = z) stays one array."""
    copies = {}
    for a in args:
        if isinstance(a, np.ndarray) and id(a) not in copies:
            copies[id(a)] = np.array(a, dtype=dtype if a.dtype.kind == "f" else a.dtype)
    return [copies.get(id(a), a) for a in args]


def _compare(case, got_args, got_ret, ref_args, ref_ret):
    tol = TOLERANCE[np.dtype(case.dtype)]
    names = [a.name for a in case.signature()]
    pairs = [(names[i], got_args[i], ref_args[i]) for i in case.compared()]
    if ref_ret is not None and np.ndim(ref_ret) == 0:  # a loss value
        pairs.append(("return value", got_ret, ref_ret))
    worst, where = 0.0, ""
    for name, got, ref in pairs:
        got = np.asarray(got, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            return worst, name, f"{name}: shape {got.shape}, reference {ref.shape}"
        finite = np.isfinite(ref)
        if not np.array_equal(np.isfinite(got), finite) or not np.array_equal(
            got[~finite], ref[~finite], equal_nan=True
        ):
            bad = np.flatnonzero(
                (np.isfinite(got) != finite).ravel() | (~finite.ravel() & (got.ravel() != ref.ravel()))
            )
            i = bad[0]
            return (
                float("inf"),
                name,
                (
                    f"{name}: kernel {got.ravel()[i]} where the reference has {ref.ravel()[i]} "
                    f"(flat index {i}, {bad.size} such)"
                ),
            )
        scale = max(1.0, float(np.max(np.abs(ref[finite]), initial=0.0)))
        err = float(np.max(np.abs(got[finite] - ref[finite]), initial=0.0)) / scale
        if err >= worst:
            worst, where = err, name
    failure = ""
    if worst > tol:
        failure = f"{where}: max |kernel - reference| / max(1, |reference|) = {worst:.3g} > {tol:g}"
    return worst, where, failure


def reference_of(case):
    """(arguments after the call, return value) of the array-API reference on the case's inputs:
    float64 copies, or copies in the case's own dtype for the "extreme" layout."""
    ref_dtype = case.dtype if case.layout == "extreme" else np.float64
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ref_args = _reference_args(case.build(), ref_dtype)
        return ref_args, case.reference(ref_args)


def check_table(case, module):
    """The case's op of a numpy-array table ``module`` (such as bpgpu.kernels.cpu) against the
    reference: (worst normalised difference, where, failure message or "")."""
    args = case.build()
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ret = case.call(module, args)
    return _compare(case, args, ret, *reference_of(case))


def run_cases(case_list, replace=None, session=None):
    """Run every case's CUDA op on the CPU (two passes: plan all sources, build once,
    execute) and compare with the array-API reference; returns one Result per case."""
    cuda = cuda_module()
    session = session or runner.HostSession()
    results = []
    with kernels_on_host(cuda, replace):
        planned = []
        for case in case_list:
            start = len(session.planned)
            session.record(case.call, cuda, case.build())
            planned.append(tuple(session.planned[start:]))
        session.compile()
        for case, case_sources in zip(case_list, planned):
            before = len(session.launched)
            args = case.build()
            ret = session.replay(case.call, cuda, args)
            err, where, failure = _compare(case, args, ret, *reference_of(case))
            if len(session.launched) == before and case.launches_kernels():
                failure = "launched no kernel: the op did not go through bpgpu.kernels.cuda.kernel()"
            results.append(Result(case, err, where, tuple(session.launched[before:]), case_sources, failure))
    return results


def compile_sources(launches, archs=sources.ARCHS):
    """NVRTC-compile every launch for every arch: {(kernel, dtype, arch): [error text or '']}."""
    compiled = {}
    for launch in launches:
        for arch in archs:
            try:
                sources.nvrtc_compile(launch, arch)
                err = ""
            except sources.KernelCompileError as exc:
                err = str(exc)
            compiled.setdefault((launch.name, launch.dtype_name(), arch), []).append(err)
    return compiled


@dataclasses.dataclass
class Report:
    results: list
    compiled: dict  # (kernel name, dtype name, arch) -> list of error texts ('' = compiled)
    unexercised: list
    seconds: dict

    @property
    def ok(self):
        return (
            all(r.ok for r in self.results) and not self.unexercised and all(not any(v) for v in self.compiled.values())
        )


def check_all(dtypes=cases_mod.DTYPES, layouts=cases_mod.LAYOUTS, archs=sources.ARCHS, compile_layouts=("random",)):
    """Every op × dtype × layout on the CPU; NVRTC for every arch on the sources of the
    ``compile_layouts`` (all layouts: every distinct source)."""
    t0 = time.perf_counter()
    session = runner.HostSession()
    results = run_cases(cases_mod.all_cases(dtypes, layouts), session=session)
    t1 = time.perf_counter()
    wanted = {code for r in results if r.case.layout in compile_layouts for code in r.sources}
    compiled = compile_sources([session.launches[code] for code in sorted(wanted)], archs)
    t2 = time.perf_counter()
    exercised = {launch.name for launch in session.launches.values()}
    unexercised = sorted(set(cuda_module().all_kernels()) - exercised)
    return Report(results, compiled, unexercised, {"cpu": t1 - t0, "nvrtc": t2 - t1})
