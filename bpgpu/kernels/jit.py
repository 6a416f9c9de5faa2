"""The compiled CPU table, loaded once, and the training step as one numba call.

:func:`kernels` loads :mod:`bpgpu.kernels.cpu`, the numpy backend's kernel table,
whose kernels are :mod:`bpgpu.kernels.compiled`'s: compiled ahead of time into an
extension (:mod:`bpgpu.kernels.aot`) where that is built and fresh, so that a default
fit never imports numba, else by numba's JIT (numba is a core dependency); when
neither can be used (BPGPU_JIT=0, numba missing or broken) it returns None,
:data:`reason` says why, and the numpy backend runs the array-API reference table
instead. :func:`source` says which compiled kernels run.

On small nets a pass kernel by kernel spends its time in Python and in per-call
overhead (several calls per layer and pass), not in arithmetic. This module gives
the numpy backend one compiled call per training step instead
(:func:`bpgpu.kernels.compiled.train_step`), built on the same scalar
definitions as the table's kernels; without the compiled table the hooks return
None and callers keep the engine's kernel-by-kernel path.

    step = compiled_train_step(net, optimizer_or_lr)   # None when not applicable
    loss = step(X, T)   # X (m, n0), T (m, nL): numpy arrays in the net's dtype

:class:`CompiledCurvature` does the same for ``bp.hvp`` and ``bp.hessian`` (the forward pass,
backprop and the R-passes in one call, :func:`bpgpu.kernels.compiled.hessian_vector_products`
and :func:`~bpgpu.kernels.compiled.exact_hessian`), reached through
``bpgpu.engine.hessian_vector_products`` and ``bpgpu.engine.exact_hessian``.

The step updates ``net.params`` in place, in its Θ layout, with buffers
allocated once per batch size; after that a step allocates nothing.
SGD, momentum and Nesterov run entirely inside the compiled call, SGD and
momentum fused into the weight-gradient products (the gradient is never
stored); Adam (whose step size depends on a host-side step counter) runs the
compiled gradient and then its own one-kernel update.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.util
import logging
import numbers
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from bpgpu.kernels import ACTIVATIONS, LOSSES, codes
from bpgpu.kernels.recycle import Recycler

log = logging.getLogger("bpgpu")

_BUFFERS_KEPT = 4  # batch sizes whose buffers are kept, like MLP.workspace
_IN_KERNEL = ("sgd", "momentum", "nesterov")  # optimizers whose update is compiled too
_FUSED = ("sgd", "momentum")  # of those, the ones applied inside the gradient products (no gradient buffer)
_AFTER_KERNEL = ("adam",)  # optimizers that update with their own kernel after the compiled gradient


# Why the compiled table is not used, once :func:`kernels` has decided ("" while it is).
reason = ""


_decided: list[ModuleType | None] = []  # [the table or None], once kernels() has decided


def kernels() -> ModuleType | None:
    """The numpy backend's compiled table :mod:`bpgpu.kernels.cpu`, or None (decided once; :data:`reason`
    says why).

    Its kernels run as the extension compiled ahead of time from :mod:`bpgpu.kernels.compiled`
    (:mod:`bpgpu.kernels.aot`) when that is built and fresh: then loading the table imports no
    numba at all, and numba is imported only by the first kernel the extension lacks (the
    derivative tools, …). Otherwise numba's JIT runs them, compiling a kernel on its first call
    for a dtype and caching the result next to the module, so later processes load it in
    milliseconds. None when BPGPU_JIT=0, when numba (or SciPy, whose BLAS numba's products call)
    is not installed, when numba lacks the BLAS helper (``numba_xxgemm``, the one its np.dot
    calls), or when a first compiled call fails: the numpy backend then runs the array-API
    reference table, logged in one line.
    """
    global reason
    if not _decided:
        module, reason = _load()
        if module is None and reason != _OFF:
            log.warning("bpgpu: numba kernels not used (%s); numpy runs the array-API reference kernels", reason)
        _decided.append(module)
    return _decided[0]


def loaded() -> ModuleType | None:
    """The compiled table if :func:`kernels` has already loaded it, else None: never loads it (for cheap
    paths, such as the input checks, that should not pay its start-up themselves). A list lookup:
    functools' ``cache_info`` took 1 µs, a quarter of a small input check (benchmarks/NOTES.md, "B2")."""
    return _decided[0] if _decided else None


def forget() -> None:
    """Let the next :func:`kernels` decide again (after BPGPU_JIT, numba or the extension changed: tests)."""
    _decided.clear()


_OFF = "BPGPU_JIT=0"


def _importable(name: str) -> bool:
    """Whether ``import name`` would find the module, without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("BPGPU_JIT", "1") == "0":
        return None, _OFF
    from bpgpu.kernels import provider

    if provider.load() is not None:  # the default paths run on the extension; numba only on first need
        missing = [name for name in ("numba", "scipy") if not _importable(name)]
        if missing:
            return None, f"numba or scipy not importable: no module named {missing[0]!r}"
    else:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (loaded by numba's BLAS helper on the first product)
            from numba import _helperlib

            from bpgpu.kernels import compiled  # noqa: F401  (numba's import, the dispatchers made)
        except ImportError as exc:
            return None, f"numba or scipy not importable: {exc}"
        if "xxgemm" not in _helperlib.c_helpers:
            return None, "this numba has no numba_xxgemm BLAS helper"
    from bpgpu.kernels import cpu

    try:  # a broken numba, LLVM or extension fails here, not in the middle of a pass
        probe = np.zeros((1, 1))
        cpu.sigmoid_fwd(probe, np.zeros(1), probe, probe, probe)
    except Exception as exc:  # noqa: BLE001  (any failure of the compiler means: do not use it)
        return None, f"numba failed to compile a kernel ({type(exc).__name__}: {exc})"
    if probe[0, 0] != 0.5:
        return None, f"numba's sigmoid(0) gave {probe[0, 0]!r}, not 0.5"
    return cpu, ""


def source() -> str:
    """Which compiled kernels run, in words: the extension compiled ahead of time, or numba's JIT and why
    not the extension ("" when the compiled table is not used)."""
    from bpgpu.kernels import provider

    return provider.describe() if kernels() is not None else ""


def available() -> bool:
    """Whether numba is installed, so compiled steps can be built."""
    return kernels() is not None


def kept(buffers: dict, key: Any, make: Any, limit: int = _BUFFERS_KEPT) -> np.ndarray:
    """``buffers[key]``, made by ``make()`` on first use; the oldest of more than ``limit`` is dropped."""
    buffer = buffers.get(key)
    if buffer is None:
        if len(buffers) >= limit:
            buffers.pop(next(iter(buffers)))
        buffer = buffers[key] = make()
    return buffer


class CompiledStep:
    """``step(X, T) -> loss``: one compiled training step of ``net`` on validated numpy arrays.

    The learning rate, momentum and velocity are read from the optimizer on
    every call, so schedules and state shared with the numpy path keep working.
    """

    def __init__(self, net: Any, optimizer_or_lr: Any, module: ModuleType, gradient_only: bool = False):
        self.net = net
        self.optimizer = None if isinstance(optimizer_or_lr, numbers.Real) else optimizer_or_lr
        self._lr = float(optimizer_or_lr) if self.optimizer is None else None
        name = "sgd" if self.optimizer is None else self.optimizer.name
        self._update_after = name in _AFTER_KERNEL
        gradient_only = gradient_only or self._update_after
        self._rule = codes.GRADIENT_ONLY if gradient_only else getattr(codes, name.upper())
        self._has_velocity = hasattr(self.optimizer, "velocity")
        self._fused = name in _FUSED and not gradient_only
        self._kernel = module.train_step
        self._plan = plan(net, module)
        self._loss = LOSSES.index(net.loss_function.name)
        self._mean = net.reduction == "mean"
        self._alpha = 0.0 if self.optimizer is None else float(self.optimizer.alpha)
        self._grad = np.empty(0 if self._fused else net.n_params, dtype=net.xp_dtype)
        self._work: dict[int, np.ndarray] = {}
        self._exports: dict[bool, Any] = {}  # weights None or not: the extension's export, or None

    def _buffers(self, m: int) -> np.ndarray:
        """a(l), δ(l) for l = 1..L, z(L), a row of the widest layer and BLAS's α, β, in one flat vector."""
        sizes = self.net.sizes
        length = m * (2 * sum(sizes[1:]) + sizes[-1]) + max(sizes[1:]) + 2
        return kept(self._work, m, lambda: np.empty(length, dtype=self._grad.dtype))

    def __reduce__(self):
        # Not serialized: pickles (and deep-copies) as False, which train_step_for
        # reads as "not built yet", so a pickled optimizer or estimator rebuilds it on first use.
        return (bool, ())

    @property
    def gradient(self) -> np.ndarray | None:
        """The gradient of the last step, in the params layout (one buffer, reused by every step).

        None for SGD and momentum: their update is fused into the gradient products,
        so the gradient never exists as an array.
        """
        return None if self._fused else self._grad

    def __call__(self, X: np.ndarray, T: np.ndarray, weights: tuple[np.ndarray, float] | None = None) -> float:
        """One step; ``weights``: ``(s_col, c)`` from :meth:`MLP.weighting` for sample weights
        (the kernel recomputes c from s, in the net's dtype)."""
        loss = self.run(X, T, self._grad, weights)
        if self._update_after:  # the optimizer's own one-kernel update (Adam)
            self.optimizer.update(self._grad)
        return loss

    def run(self, X: np.ndarray, T: np.ndarray, grad: np.ndarray, weights: Any = None) -> float:
        """The kernel once, its gradient (for the rules that form one) into ``grad``; returns the loss.
        No update after it: :meth:`__call__` adds Adam's."""
        if not (X.flags.c_contiguous and T.flags.c_contiguous):  # one compiled layout only
            X, T = np.ascontiguousarray(X), np.ascontiguousarray(T)
        opt = self.optimizer
        lr = self._lr if opt is None else float(opt.learning_rate)
        if self._has_velocity:
            mu, velocity = opt.momentum, opt.velocity
        else:
            mu, velocity = 0.0, self.net.params  # not read by this rule: any vector of the params' length
        # s=None has its own numba specialization, with no weighting code; c comes from the weights
        s = None if weights is None else np.ascontiguousarray(weights[0][:, 0])
        w, dtype = self.net.params, self._grad.dtype
        args = (X, T, w, grad, self._buffers(X.shape[0]), self._plan, self._loss, self._mean, self._alpha)
        args += (self._rule, lr, mu, velocity)
        # The extension's export straight away (tests/test_aot.py: bit for bit the JIT's), once the
        # provider has matched it on a first call: the work vector and plan are this step's own, so
        # only the arrays that callers hand in are checked again (the provider's full check of every
        # argument cost 6 µs a step, as much as numba's own dispatch: benchmarks/NOTES.md, "A4").
        if (
            X.dtype is dtype
            and T.dtype is dtype
            and w.dtype is dtype
            and grad.dtype is dtype
            and velocity.dtype is dtype
            and (s is None or s.dtype is dtype)
            and w.flags.c_contiguous
            and grad.flags.c_contiguous
            and velocity.flags.c_contiguous
        ):
            export = self._exports.get(s is None, False)
            if export is False:  # not matched yet: the provider's check, on all the arguments
                find = getattr(self._kernel, "export_for", None)
                fn, given = (None, 0) if find is None else find(*args, s)
                export = self._exports[s is None] = fn if given == len(args) + (s is not None) else None
            if export is not None:
                return export(*args) if s is None else export(*args, s)
        return self._kernel(*args, s)


def largest_product(net: Any) -> int:
    """max_l n_{l−1} n_l: a call's largest GEMM has m (or K m) times this many multiply-adds."""
    return max(n_in * n_out for n_in, n_out in zip(net.sizes, net.sizes[1:]))


class CompiledGradient:
    """``gradient(X, T, grad, weights) -> J``: the loss and ∂J/∂w at ``net.params`` in one compiled
    call (forward pass and backprop of :func:`bpgpu.kernels.compiled.train_step` with no update),
    written into ``grad`` (W,). X, T: validated numpy arrays in the net's dtype. BLAS threads as
    :meth:`BlasThreads.run` decides, as for the other derivative tools: with OpenBLAS's two threads
    on a loaded machine [32,64,64,4] at m = 128 took 0.09–7.8 ms a call against 0.10 ms on one
    (benchmarks/NOTES.md, "P2")."""

    def __init__(self, net: Any, module: ModuleType):
        self.net = net
        self._step = CompiledStep(net, 0.0, module, gradient_only=True)
        self._product = largest_product(net)

    def __call__(
        self, X: np.ndarray, T: np.ndarray, grad: np.ndarray, weights: tuple[np.ndarray, float] | None = None
    ) -> float:
        return blas_threads.run(X.shape[0] * self._product, self._step.run, X, T, grad, weights)


# OpenBLAS runs a GEMM of at most this many multiply-adds (m n k) on one thread by itself
# (interface/gemm.c: SMP_THRESHOLD_MIN 65536 × GEMM_MULTITHREAD_THRESHOLD 4).
_OPENBLAS_SERIAL_MACS = 65536 * 4
# Below this many multiply-adds in a call's largest product, a second thread pays only where the
# other cores are known to be free (a fresh /proc/stat reading: NOTES "B6"); above it, unless the
# machine is busy.
_SERIAL_MACS = 1 << 22
# A call whose result has at least this many entries (K m W, about its multiply-adds) is split
# into one block of samples per core (benchmarks/NOTES.md, "S4").
_SPLIT_WORK = 1 << 22
# From this size up to _SPLIT_WORK a call splits only while a fresh reading shows the other cores
# free (:meth:`BlasThreads.quiet_elsewhere`): the [32,64,64,4] input Jacobian (K m W = 3.3·10⁶) ran
# 15–20% faster in two blocks on an idle machine, 1.8× slower at load 4 (benchmarks/NOTES.md, "S4", "B4").
_SPLIT_WORK_QUIET = 1 << 21
_SPLIT_MAX_LOAD = 4.0  # per core: above it no core is free for a second block (measured: NOTES "S4")
# Other processes using at least this many cores' worth of CPU (over the last second) leave
# OpenBLAS's second thread no core to spin on (benchmarks/NOTES.md, "P6").
_BUSY_ELSEWHERE = 0.5
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
_CORES = max(1, len(_CPUS))
_TICK = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def busy_seconds(cpus: list[int] = _CPUS, path: str = "/proc/stat") -> float | None:
    """CPU seconds spent busy (user, nice, system, irq, softirq) on ``cpus`` since boot, by every
    process (Linux's /proc/stat); None where there is no such file. Reads only the file's first
    lines, into a few hundred bytes (the derivative tools allocate nothing but their results)."""
    every = len(cpus) == os.cpu_count()  # the first line sums them all
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, 256 if every else 256 * (max(cpus) + 2))  # ≤ 256 bytes a line
        finally:
            os.close(fd)
    except OSError:
        return None
    lines = data.split(b"\n", 1)[:1] if every else data.split(b"\n")
    wanted = {b"cpu"} if every else {f"cpu{c}".encode() for c in cpus}
    total = 0
    try:
        for line in lines:
            fields = line.split(None, 8)
            if len(fields) >= 8 and fields[0] in wanted:
                total += int(fields[1]) + int(fields[2]) + int(fields[3]) + int(fields[6]) + int(fields[7])
    except ValueError:
        return None
    return total * _TICK


class BlasThreads:
    """One BLAS thread for a compiled call where more would wait rather than work.

    The kernels call SciPy's OpenBLAS (numba's ?gemm helper), whose threads spin on a
    barrier: with more runnable processes than cores, a two-thread GEMM of 2·10⁶ multiply-adds
    was measured at 10 ms instead of 0.5 ms (benchmarks/NOTES.md, "S2"). So a call whose
    largest product exceeds OpenBLAS's own serial threshold runs on one thread when that
    product is below ``_SERIAL_MACS`` and the other cores are not known to be free, or when
    the machine is busy: oversubscribed (1-minute load average above the core count plus one),
    or other processes used ``_BUSY_ELSEWHERE`` of a core or more over the last second (this
    process's cores' busy time less its own CPU time: one other process on one of 2 cores made
    two-thread HVPs 10–35× slower while the load average stayed near 2, NOTES "P6"); each read
    at most once a second. Otherwise OpenBLAS keeps its threads. Needs threadpoolctl (else nothing changes).
    """

    def __init__(self, clock: Any = time.monotonic, own: Any = time.process_time, busy: Any = busy_seconds) -> None:
        """clock, own, busy: the wall clock, this process's CPU seconds and the cores' busy seconds
        (:func:`busy_seconds`), as functions of no argument (replaceable in tests)."""
        self._controllers: list[Any] | None = None
        self._clock, self._own, self._busy_seconds = clock, own, busy
        self._load, self._checked = 0.0, -1.0
        self._busy: float | None = None  # the cores' busy seconds at the last reading
        self._others, self._mine, self._sampled = 0.0, 0.0, -1.0
        self._measured = False  # whether _others rests on two readings
        self._lock, self._depth, self._saved = threading.Lock(), 0, []

    def _blas(self) -> list[Any]:
        if self._controllers is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                self._controllers = []
            else:
                load_kernel_blas()
                self._controllers = ThreadpoolController().select(user_api="blas").lib_controllers
        return self._controllers

    def load(self) -> float:
        """The 1-minute load average per core (read at most once a second; 0 where there is none)."""
        now = self._clock()
        if now - self._checked > 1.0:
            self._checked = now
            try:
                self._load = os.getloadavg()[0] / _CORES
            except OSError:  # no load average on this system
                self._load = 0.0
        return self._load

    def others(self) -> float:
        """Cores' worth of CPU that other processes used on this process's cores between the last two
        readings, at least a second apart (0 without /proc/stat, and before a second reading)."""
        now = self._clock()
        if now - self._sampled > 1.0:
            busy, mine = self._busy_seconds(), self._own()
            if busy is not None and self._busy is not None:  # the first reading has nothing to compare with
                self._others = max(0.0, (busy - self._busy) - (mine - self._mine)) / (now - self._sampled)
                self._measured = True
            self._busy, self._mine, self._sampled = busy, mine, now
        return self._others

    def quiet_elsewhere(self) -> bool:
        """Whether two readings of /proc/stat (:meth:`others`) show other processes using less than
        ``_BUSY_ELSEWHERE`` of a core: then a high 1-minute load average, which trails the machine by
        about a minute, is not taken for a busy machine (after a burst, the derivative tools kept one
        BLAS thread and no split on an idle machine: benchmarks/NOTES.md, "E6")."""
        others = self.others()
        return self._measured and others < _BUSY_ELSEWHERE

    def oversubscribed(self) -> bool:
        """Whether other processes kept ``_BUSY_ELSEWHERE`` of a core or more busy between the last two
        readings of /proc/stat; before a second reading, or without /proc/stat, whether the 1-minute
        load average exceeds the cores + 1 (it trails the machine: :meth:`quiet_elsewhere`)."""
        others = self.others()  # a reading first: it decides whether the measure exists
        if self._measured:
            return others >= _BUSY_ELSEWHERE
        return self.load() * _CORES > _CORES + 1

    def serial(self, macs: int) -> bool:
        """Whether a call whose largest product has ``macs`` multiply-adds should run on one thread:
        never at OpenBLAS's own one-thread size or below; below ``_SERIAL_MACS`` unless two fresh
        readings show the other cores free (:meth:`quiet_elsewhere`; then OpenBLAS's threads were
        5–15% faster at [32,64,64,4], and no thread count is switched: benchmarks/NOTES.md, "B6");
        from ``_SERIAL_MACS`` on, when the machine is busy (:meth:`oversubscribed`)."""
        if macs <= _OPENBLAS_SERIAL_MACS:
            return False
        if macs < _SERIAL_MACS:
            return not self.quiet_elsewhere()
        return self.oversubscribed()

    def run(self, macs: int, kernel: Any, *args: Any) -> Any:
        """kernel(*args), on one BLAS thread when :meth:`serial` says so."""
        return self.one_thread(kernel, *args) if self.serial(macs) else kernel(*args)

    def one_thread(self, kernel: Any, *args: Any) -> Any:
        """kernel(*args) with every BLAS library of the process on one thread; the first of
        concurrent callers saves the thread counts, the last one out restores them."""
        with self._lock:
            if self._depth == 0:
                self._saved = [(c, c.get_num_threads()) for c in self._blas()]
                for c, threads in self._saved:
                    if threads != 1:
                        c.set_num_threads(1)
            self._depth += 1
        try:
            return kernel(*args)
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for c, threads in self._saved:
                        if threads != 1:
                            c.set_num_threads(threads)


def load_kernel_blas() -> None:
    """Load the BLAS the compiled kernels call (SciPy's OpenBLAS, through scipy.linalg.cython_blas),
    so that a threadpoolctl controller made afterwards sees it: the extension of bpgpu.kernels.aot
    loads it only at its first GEMM, and a controller made before that saw numpy's OpenBLAS alone, so
    "one thread" left the kernels' GEMMs on two (benchmarks/NOTES.md, "B1"). Nothing without SciPy."""
    try:
        importlib.import_module("scipy.linalg.cython_blas")
    except ImportError:  # no SciPy: numba's BLAS helpers cannot load either
        pass


@contextlib.contextmanager
def blas_limit(threads: int = 1) -> Iterator[int | None]:
    """Every BLAS library of the process on at most ``threads`` threads inside the block, the compiled
    kernels' included (:func:`load_kernel_blas` first), restored afterwards.

    Yields
    ------
    threads : int or None
        The limit, or None where threadpoolctl is not installed (then the BLAS keeps its threads).
    """
    load_kernel_blas()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield None
        return
    with threadpool_limits(threads, user_api="blas"):
        yield threads


blas_threads = BlasThreads()


class CompiledDerivatives:
    """The seeded derivative tools of ``net`` as one compiled call each (numpy backend): the input
    and parameter Jacobians, per-sample gradients and the Gauss–Newton factor, built on
    :func:`bpgpu.kernels.compiled.forward_pass` and :func:`bpgpu.kernels.compiled.seeded_backprop`.

    Each tool takes X (and T) as the public functions do: a C-contiguous numpy array of the net's
    dtype and width goes straight to the kernel (which checks finiteness without a temporary);
    anything else goes through ``net.check_inputs`` first. Buffers are allocated once per
    (batch size, seed count) and reused, so a warm call allocates only the array it returns.
    """

    def __init__(self, net: Any, module: ModuleType):
        self._net = weakref.ref(net)  # not a strong reference: the per-net cache is keyed weakly on the net
        self._module = module
        self._plan = plan(net, module)
        self._loss = LOSSES.index(net.loss_function.name)
        self._dtype = np.dtype(net.xp_dtype)
        self._n_in, self._n_out, self._n_params = net.sizes[0], net.sizes[-1], net.n_params
        self._check_targets = net.loss_function.name == "poisson" or (
            net.loss_function.name == "cross_entropy" and net.activations[-1].name == "softmax"
        )
        self._work: dict[tuple[int, int, int], np.ndarray] = {}
        self._product = largest_product(net)

    def __reduce__(self):
        return (bool, ())  # not serialized (numba kernels and buffers): rebuilt on first use

    @property
    def net(self) -> Any:
        return self._net()

    def _buffers(self, m: int, K: int, part: int = 0) -> np.ndarray:
        """a(l), z(L), δ(l) of K·m rows and BLAS's α, β in one flat vector (compiled.seeded_work_size),
        one per block ``part`` of a split call."""

        def make() -> np.ndarray:
            return np.empty(self._module.seeded_work_size(self._plan, m, K), dtype=self._dtype)

        return kept(self._work, (m, K, part), make, _BUFFERS_KEPT * _CORES)

    def _cost(self, m: int, K: int) -> tuple[int, int]:
        """(largest product, K m W): the multiply-adds of a call's largest GEMM, and its size."""
        return K * m * self._product, K * m * self._n_params

    def _run(self, m: int, K: int, part: Any) -> bool:
        """``part(lo, hi, work)`` (the kernel on samples lo..hi − 1, whose rows of the result are
        contiguous) over the batch, as :func:`sample_blocks` runs it; True when every part was."""
        return all(sample_blocks(m, *self._cost(m, K), part, lambda rows, i: self._buffers(rows, K, i), self._dtype))

    def _ready(self, x: Any, width: int, rows: int = 0) -> bool:
        """Whether x is already what the kernels take: a C-contiguous 2-D numpy array of the net's
        dtype, ``width`` columns and at least one row (``rows`` of them when given)."""
        return (
            type(x) is np.ndarray
            and x.dtype == self._dtype
            and x.ndim == 2
            and x.shape[1] == width
            and (x.shape[0] == rows if rows else x.shape[0] > 0)
            and x.flags.c_contiguous
        )

    def _inputs(self, X: Any, T: Any = None, targets: bool = False) -> tuple[np.ndarray, Any]:
        """(X, T) as the kernels take them: untouched when already so (the lean path), else checked
        by ``net.check_inputs`` and made contiguous."""
        if self._ready(X, self._n_in) and (not targets or self._ready(T, self._n_out, X.shape[0])):
            if targets and self._check_targets:  # the loss's domain (poisson, softmax + cross_entropy)
                self.net.loss_function.check_targets(self.net.activations[-1], T, np)
            return X, T
        X, T = self.net.check_inputs(X, T if targets else None)
        return np.ascontiguousarray(X), None if T is None else np.ascontiguousarray(T)

    def _not_finite(self, X: Any, T: Any = None) -> None:
        """A kernel found NaN or Inf: ``net.check_inputs`` names the argument and raises."""
        self.net.check_inputs(X, T)
        raise ValueError("X or T contains NaN or Inf")  # not reached: check_inputs raises first

    @staticmethod
    def _weights(s_col: Any) -> np.ndarray | None:
        return None if s_col is None else np.ascontiguousarray(s_col[:, 0])

    def _seed_rows(self, X: Any, kernel: Any, width: int) -> np.ndarray:
        """(m, n_L, width): one row per sample and output seed, from ``kernel`` over sample blocks."""
        X, _ = self._inputs(X)
        m, K, w, plan = X.shape[0], self._n_out, self.net.params, self._plan
        out = np.empty((m, K, width), dtype=self._dtype)
        rows = out.reshape(m * K, -1)
        if not self._run(m, K, lambda lo, hi, work: kernel(X[lo:hi], w, plan, work, rows[lo * K : hi * K])):
            self._not_finite(X)
        return out

    def input_jacobian(self, X: Any) -> np.ndarray:
        """∂y_k/∂x_i per sample, (m, n_L, n_0)."""
        return self._seed_rows(X, self._module.input_jacobian, self._n_in)

    def parameter_jacobian(self, X: Any) -> np.ndarray:
        """∂y_nk/∂w, (m, n_L, W)."""
        return self._seed_rows(X, self._module.parameter_jacobian, self._n_params)

    def per_sample_gradients(self, X: Any, T: Any, s_col: Any = None) -> np.ndarray:
        """s_n ∂ℓ_n/∂w, (m, W); s_col: None or an (m, 1) column of weights (``net.weighting``'s)."""
        X, T = self._inputs(X, T, targets=True)
        m, w, plan, loss = X.shape[0], self.net.params, self._plan, self._loss
        kernel = self._module.per_sample_gradients
        out = np.empty((m, self._n_params), dtype=self._dtype)
        s = self._weights(s_col)

        def part(lo: int, hi: int, work: np.ndarray) -> bool:
            return kernel(X[lo:hi], T[lo:hi], w, plan, loss, work, out[lo:hi], None if s is None else s[lo:hi])

        if not self._run(m, 1, part):
            self._not_finite(X, T)
        return out

    def gauss_newton_rows(self, X: Any, T: Any, s_col: Any = None) -> np.ndarray:
        """The Gauss–Newton factor R, (n_L m, W), rows (k, n) (bpgpu/per_sample.py): one call (its
        rows are seed-major, so a block of samples is not a block of rows)."""
        X, T = self._inputs(X, T, targets=True)
        m, K = X.shape[0], self._n_out
        out = np.empty((K * m, self._n_params), dtype=self._dtype)
        work, kernel, args = self._buffers(m, K), self._module.gauss_newton_rows, (self.net.params, self._plan)
        if not blas_threads.run(self._cost(m, K)[0], kernel, X, T, *args, self._loss, work, out, self._weights(s_col)):
            self._not_finite(X, T)
        return out


def _splits(size: int) -> bool:
    """Whether a call of ``size`` K m W (result entries, about its multiply-adds) runs in one block
    per core: two cores or more, and either at least ``_SPLIT_WORK`` with a load average per core of
    at most ``_SPLIT_MAX_LOAD`` (benchmarks/NOTES.md, "S4"), or at least ``_SPLIT_WORK_QUIET`` with a
    fresh reading of the cores showing them free of other processes (:meth:`BlasThreads.quiet_elsewhere`)."""
    if size < _SPLIT_WORK_QUIET or _CORES < 2:
        return False
    if size < _SPLIT_WORK:
        return blas_threads.quiet_elsewhere()
    return blas_threads.load() <= _SPLIT_MAX_LOAD or blas_threads.quiet_elsewhere()


def sample_blocks(m: int, largest: int, size: int, part: Any, buffers: Any, dtype: Any = np.float64) -> list[Any]:
    """[part(lo, hi, buffers(hi − lo, i))] for the blocks i of samples lo..hi − 1 of a batch of m:
    one block, BLAS threads as :meth:`BlasThreads.run` decides for a call whose largest product has
    ``largest`` multiply-adds; or, where :func:`_splits` (``size``: K m W, about its multiply-adds),
    one block per core, each on one BLAS thread, the blocks on Python threads (numba releases the
    GIL), which wait on a lock where OpenBLAS's spin (benchmarks/NOTES.md, "S4"). float32 calls
    stay in one block: on an idle machine one OpenBLAS GEMM on both cores beat two one-thread
    blocks for float32 ([784,256,10] input Jacobian 3.5 against 3.9 ms, HVP 1.14 against 1.24 ms;
    equal at [64,128,128,10]) while float64 gained from the blocks (NOTES "P9")."""
    if m < _CORES or np.dtype(dtype).itemsize < 8 or not _splits(size):
        return [blas_threads.run(largest, part, 0, m, buffers(m, 0))]
    bounds = [m * i // _CORES for i in range(_CORES + 1)]
    blocks = [(bounds[i], bounds[i + 1], buffers(bounds[i + 1] - bounds[i], i)) for i in range(_CORES)]
    return blas_threads.one_thread(_run_blocks, part, blocks)


def _run_blocks(part: Any, blocks: list[tuple[Any, ...]]) -> list[Any]:
    """[part(*block)] for every block: the first on this thread, the others on the pool's; returns
    (or raises) only once every block has finished, since they write into the call's buffers."""
    others = [_pool().submit(part, *block) for block in blocks[1:]]
    try:
        first = part(*blocks[0])
    except BaseException:
        concurrent.futures.wait(others)
        raise
    return [first] + [f.result() for f in others]


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, _CORES - 1), thread_name_prefix="bpgpu")


_DERIVATIVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def derivatives_for(net: Any) -> CompiledDerivatives | None:
    """The compiled seeded tools of ``net`` (built once per net), or None when there are none:
    numba unavailable, or a backend other than numpy."""
    return _per_net(_DERIVATIVES, net, CompiledDerivatives)


def plan(net: Any, module: ModuleType | None = None) -> np.ndarray:
    """The compiled kernels' description of ``net``: (3, L + 1) int64, one column per layer
    l = 0..L, rows ``codes.SIZE`` n_l, ``codes.OFFSET`` where Θ(l + 1) starts in w, ``codes.CODE``
    the activation of layer l (column 0 unused). ``module`` is not read (the rows are
    :mod:`bpgpu.kernels.codes`', which the table no longer has to be loaded for); the callers that
    pass their table keep working."""
    out = np.empty((3, net.n_layers + 1), dtype=np.int64)
    out[codes.SIZE] = net.sizes
    out[codes.OFFSET] = net.layout.offsets
    out[codes.CODE] = [-1] + [ACTIVATIONS.index(g.name) for g in net.activations]
    return out


_GRADIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _per_net(cache: weakref.WeakKeyDictionary, net: Any, kind: type) -> Any:
    """``kind(net, module)``, built once per net and kept in ``cache``, or None when numba is
    unavailable or the backend is not numpy."""
    cached = cache.get(net)
    if cached is None:
        module = kernels()
        if module is None or net.backend.name != "numpy":
            return None
        cached = cache[net] = kind(net, module)
    return cached


def gradient_for(net: Any) -> CompiledGradient | None:
    """The compiled loss-and-gradient of ``net`` (built once per net), or None when there is
    none: numba unavailable, or a backend other than numpy."""
    return _per_net(_GRADIENTS, net, CompiledGradient)


def kronecker_gram(
    net: Any, deltas: list[np.ndarray], A: list[np.ndarray], K: int, split: bool
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The residuals form's N × N matrices of Levenberg–Marquardt by one compiled call
    (:func:`bpgpu.kernels.compiled.kronecker_gram`), or None without the compiled table or off numpy.

    deltas: δ(l) for l = 1..L, (N, n_l) each, rows (k, n) (N = K m); A: a(l−1) for l = 1..L,
    (m, n_{l−1}) each. Returns (Q, None) with Q = Σ_l δδᵀ ⊙ (1 + aaᵀ), or with ``split``
    (Q, S): Q = Σ_l δδᵀ ⊙ aaᵀ and S = Σ_l δδᵀ; only their upper triangles (c ≥ r) are
    filled, the lower ones are 0.
    """
    module = kernels()
    if module is None or net.backend.name != "numpy":
        return None
    D = np.concatenate(deltas, axis=1)
    Acat = np.concatenate(A, axis=1)
    N = D.shape[0]
    Q = np.zeros((N, N), dtype=D.dtype)
    S = np.zeros((N, N), dtype=D.dtype) if split else Q  # Q: a placeholder numba reads as the same type
    scratch = np.empty(2 * module.GRAM_BLOCK * N, dtype=D.dtype)
    slots = np.empty(2, dtype=D.dtype)
    module.kronecker_gram(D, Acat, np.asarray(net.sizes, dtype=np.int64), K, Q, S, split, scratch, slots)
    return Q, (S if split else None)


def compiled_train_step(net: Any, optimizer_or_lr: Any) -> CompiledStep | None:
    """A compiled ``step(X, T) -> loss`` (forward, backprop, L2 term, update), or None.

    optimizer_or_lr: a learning rate (plain SGD), or a :mod:`bpgpu.optim`
    optimizer ("sgd", "momentum", "nesterov", "adam"; L2 penalty included).
    The loss is the batch loss with the penalty, as :func:`bpgpu.training.train_step`
    returns it. None (the caller keeps the numpy path) when numba is missing, the
    backend is not numpy, or the optimizer is of another kind. X and T must be
    numpy arrays of the net's dtype, T of shape (m, nL), already validated (as
    ``net.check_inputs`` returns them).
    """
    module = kernels()
    if module is None or net.backend.name != "numpy":
        return None
    if not isinstance(optimizer_or_lr, numbers.Real):
        if getattr(optimizer_or_lr, "name", None) not in _IN_KERNEL + _AFTER_KERNEL:
            return None
    return CompiledStep(net, optimizer_or_lr, module)


def train_step_for(net: Any, optimizer: Any) -> CompiledStep | None:
    """``compiled_train_step(net, optimizer)``, built once per optimizer and kept on it."""
    cached = optimizer.__dict__.get("compiled_step", False)  # False: not built yet (or unpickled)
    if cached is False or (cached is not None and cached.net is not net):
        cached = optimizer.compiled_step = compiled_train_step(net, optimizer)
    return cached


# --- Hessian-vector products and the exact Hessian -------------------------------------------


class CompiledCurvature:
    """H V and H of ``net`` at ``net.params``, each in one compiled call
    (:func:`bpgpu.kernels.compiled.hessian_vector_products`, :func:`~bpgpu.kernels.compiled.exact_hessian`):
    forward pass, backprop and the R-passes, with work buffers made once per batch size and
    reused. X (m, n_0), T (m, n_L): validated numpy arrays in the net's dtype."""

    def __init__(self, net: Any, module: ModuleType):
        self.net = net
        self._module = module
        self._plan = plan(net, module)
        self._loss = LOSSES.index(net.loss_function.name)
        self._mean = net.reduction == "mean"
        self._work: dict[tuple[int, int, int], np.ndarray] = {}
        self._partials: dict[tuple[int, int], np.ndarray] = {}
        self._product = largest_product(net)
        self._results = Recycler()  # a large H reuses the memory of the last one dropped

    def _buffers(self, m: int, K: int, part: int = 0) -> np.ndarray:
        """The work vector for batch size m and K directions (K = 0: the exact Hessian's), one per
        block ``part`` of a split call."""

        def make() -> np.ndarray:  # sized on a miss only: the lengths are compiled calls
            module, rows = self._module, self._plan
            length = module.hessian_work_length(rows, m) if K == 0 else module.curvature_work_length(rows, m, K)
            return np.empty(length, dtype=self.net.xp_dtype)

        return kept(self._work, (m, K, part), make, _BUFFERS_KEPT * _CORES)

    def hessian_vector_products(self, X: np.ndarray, T: np.ndarray, V: np.ndarray) -> np.ndarray:
        """H vᵣ for every row vᵣ of V (K, W): a new (K, W) array. Run as :func:`sample_blocks` decides:
        at once, BLAS threads as :meth:`BlasThreads.run` decides (the R-passes' GEMMs are many and
        mid-sized, and with OpenBLAS's threads on an oversubscribed machine they ran 8–30× slower,
        each call waiting for its slowest thread: benchmarks/NOTES.md, "R3"; on an idle one the second
        thread pays for the larger nets, "R7"); or, for large calls, one block of samples per core,
        each block's H V (a sum over its samples) into its own (K, W) array, added at the end ("P5")."""
        X, T, V = _contiguous(X), _contiguous(T), _contiguous(V)
        m, K = X.shape[0], V.shape[0]
        out = np.empty(V.shape, dtype=V.dtype)
        c = self.net.reduction_factor(m)  # J = c Σ_n J_n over the whole batch, whatever the block
        kernel, w, plan_, loss = self._module.hessian_vector_products, self.net.params, self._plan, self._loss

        def part(lo: int, hi: int, work: np.ndarray) -> np.ndarray:
            dst = out if lo == 0 else kept(self._partials, (K, lo), lambda: np.empty_like(out), _BUFFERS_KEPT)
            kernel(X[lo:hi], T[lo:hi], w, V, dst, work, plan_, loss, c)
            return dst

        def buffers(rows: int, i: int) -> np.ndarray:
            return self._buffers(rows, K, i)

        parts = sample_blocks(m, m * K * self._product, m * K * self.net.n_params, part, buffers, V.dtype)
        for partial in parts[1:]:
            out += partial
        return out

    def hessian(self, X: np.ndarray, T: np.ndarray) -> np.ndarray:
        """The exact Hessian (W, W), exactly symmetric: a new array (one of 32 MiB or more in the
        memory of the last such H that the caller has dropped, :mod:`bpgpu.kernels.recycle`).

        A call of m W² ≥ ``_SPLIT_WORK`` (:func:`_splits`) forms its rows in one part per core
        (each layer's units j′ split into contiguous ranges, each part on its own work vector and
        one BLAS thread, the parts on Python threads as the seeded tools' sample blocks are), then,
        once every part's rows are formed, mirrors the upper triangle in one part per core (benchmarks/NOTES.md,
        "H2"–"H6"). Otherwise one
        call, BLAS threads as for the HVP (:meth:`BlasThreads.run`; its largest products are
        [1, A]ᵀ G, about m n W multiply-adds)."""
        X, T = _contiguous(X), _contiguous(T)
        m, W, module = X.shape[0], self.net.n_params, self._module
        out = self._results.empty((W, W), self.net.xp_dtype)
        args, tail = (X, T, self.net.params, out), (self._plan, self._loss, self._mean)
        if not _splits(m * W * W):
            blas_threads.run(m * W * max(self.net.sizes), module.exact_hessian, *args, self._buffers(m, 0), *tail)
            return out
        parts = [(part, self._buffers(m, 0, part)) for part in range(_CORES)]

        def rows(part: int, work: np.ndarray) -> None:
            module.exact_hessian_part(*args, work, *tail, part, _CORES)

        def mirror(part: int, work: np.ndarray) -> None:
            module.hessian_mirror(out, part, _CORES)

        # two rounds: a part's mirror tiles read rows that the other parts form
        blas_threads.one_thread(_run_blocks, rows, parts)
        blas_threads.one_thread(_run_blocks, mirror, parts)
        return out


def _contiguous(x: np.ndarray) -> np.ndarray:
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)  # one compiled layout only


_CURVATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def curvature_for(net: Any) -> CompiledCurvature | None:
    """The compiled H V and H of ``net`` (built once per net), or None: numba unavailable, or a
    backend other than numpy."""
    return _per_net(_CURVATURES, net, CompiledCurvature)
