"""``bpgpu bench``: the project's main job, and the measurement code of benchmarks/.

Two experiments, both on the backend "auto" picks (CuPy when a CUDA device is
usable, else numpy):

1. Gradient cost versus the number of parameters W. Backpropagation costs one
   forward and one backward pass, O(m W) for a batch of m; finite differences
   cost W (forward) or 2W (central) forward passes, O(m W²). The nets are
   [h, h, 1] (tanh, squared error, float64) with W = (h + 1)², timed from
   W ≈ 10² to 10⁶ for backprop and as far as a time budget allows for finite
   differences; log-log slopes are fitted where one pass is compute-bound.
2. One training step (forward + backward + SGD update of the flat vector) for
   tiny [2,2,2,1] b1, small [64,32,10] b32, medium [784,256,256,10] b128 and
   large [4096,4096,4096,10] b512 (relu, identity output, squared error), per
   backend and dtype, next to a GEMM of the same shape timed in the same run,
   a plain preallocated numpy step, and the peers that are installed
   (PyTorch eager, JAX jit, scikit-learn's MLPRegressor), plus the bytes
   allocated per step after warm-up.

benchmarks/ imports the builders and timers below, so ``pytest benchmarks/``
and ``bpgpu bench`` measure exactly the same code. Heavy imports (matplotlib,
tqdm, torch, jax, sklearn) happen inside functions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import bpgpu
from bpgpu.backend import Backend, gpu_status, resolve
from bpgpu.network import MLP

# name: (layer sizes, batch)
CONFIGS = {
    "tiny": ([2, 2, 2, 1], 1),
    "small": ([64, 32, 10], 32),
    "medium": ([784, 256, 256, 10], 128),
    "large": ([4096, 4096, 4096, 10], 512),
}
LEARNING_RATE = 0.01
STEP_NET = {"hidden": "relu", "output": "identity", "loss": "squared_error"}
GRADIENT_HIDDEN = 16
GRADIENT_NET = {"hidden": "tanh", "output": "identity", "loss": "squared_error"}
METHODS = ("backprop", "central_difference", "forward_difference")
IMPLEMENTATIONS = ("bpgpu", "numpy_reference", "torch_eager", "jax_jit", "sklearn")
OVERHEAD_FACTOR = 4.0  # a pass is "compute-bound" once it takes 4x the smallest net's pass


@dataclass(frozen=True)
class Plan:
    """How much work one run does."""

    configs: tuple[str, ...]
    dtypes: tuple[str, ...]
    gradient_batch: int
    gradient_log10_W: tuple[float, ...]  # the W grid, as exponents of 10
    fd_budget_s: float  # total seconds for the finite-difference sweeps
    min_time_s: float  # seconds of calls behind each timing
    peers: bool
    repeats: int = 5  # interleaved rounds per training-step group
    settle_s: float = 0.05  # idle seconds before each burst of a training-step group (see interleaved_timings)


def plan_for(mode: str) -> Plan:
    """full: everything; quick: under 2 minutes on 2 cores; smoke: a few seconds (tests)."""
    grid = tuple(np.round(np.arange(2.0, 6.01, 0.25), 2))
    if mode == "full":
        return Plan(tuple(CONFIGS), ("float32", "float64"), 512, grid, 120.0, 1.0, True, 10)
    if mode == "quick":
        return Plan(("tiny", "small", "medium"), ("float32", "float64"), 512, grid, 20.0, 0.3, True, 7)
    if mode == "smoke":
        return Plan(("tiny", "small"), ("float32",), 64, (2.0, 2.5, 3.0, 3.5), 0.5, 0.01, False, settle_s=0.0)
    raise ValueError(f"mode must be 'full', 'quick' or 'smoke', got {mode!r}")


# --- timing ------------------------------------------------------------------


@dataclass
class Case:
    """A callable under test: ``fn()`` does one unit of work and returns a handle
    that ``finish(handle)`` waits on (a device scalar for the GPU), so timings
    include the work and not only its launch."""

    fn: Callable[[], Any]
    finish: Callable[[Any], Any] = lambda handle: handle


def seconds_per_call(case: Case, min_time: float = 0.2, repeats: int = 5, long_call: float = 1.0) -> dict:
    """Time one case: see :func:`interleaved_timings`."""
    return interleaved_timings({"case": case}, min_time, repeats, long_call)["case"]


def interleaved_timings(cases: dict[str, Case], min_time: float = 0.2, repeats: int = 5,
                        long_call: float = 1.0, settle: float = 0.0, seed: int = 0) -> dict[str, dict]:
    """Time several cases in interleaved rounds, so they share the machine's state.

    Each case gets a warm-up call and a calibration call, then ``repeats`` rounds; in
    every round each case runs n calls (n chosen from the calibration call so its
    round lasts about min_time / repeats) before
    the next case runs. On a shared machine a burst of load then hits all cases
    alike and the ratios between them stay meaningful. Returns, per case, the best
    and median round in seconds per call. A call longer than ``long_call`` is timed
    once (finite differences at large W), with no warm-up spent on it.

    The order of the cases is shuffled in every round (``seed``) and each burst
    starts after ``settle`` idle seconds: thread pools (OpenBLAS, PyTorch's OpenMP,
    XLA's) spin for a while after their last call, and on 2 cores that spinning
    would slow whichever case always came next (benchmarks/NOTES.md, N2).
    """
    calls, stats = {}, {}
    for name, case in cases.items():
        t0 = time.perf_counter()
        case.finish(case.fn())
        first = time.perf_counter() - t0
        if first >= long_call:
            stats[name] = {"best": first, "median": first, "calls": 1}
            continue
        # calibrate on a second call: the first may have compiled (numba, XLA, NVRTC)
        t0 = time.perf_counter()
        case.finish(case.fn())
        calls[name] = max(1, int(min_time / repeats / max(time.perf_counter() - t0, 1e-7)))
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    order, shuffle = list(calls), random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            case, n = cases[name], calls[name]
            time.sleep(settle)
            t0 = time.perf_counter()
            for _ in range(n):
                handle = case.fn()
            case.finish(handle)
            rounds[name].append((time.perf_counter() - t0) / n)
    for name, times in rounds.items():
        stats[name] = {"best": min(times), "median": float(np.median(times)), "calls": calls[name] * repeats}
    return {name: stats[name] for name in cases}


def sync_scalar(handle: Any) -> float:
    """Wait for a device computation by reading one scalar it produced."""
    return float(handle)


# --- data and nets -----------------------------------------------------------


def batch(backend: Backend, sizes, m: int, dtype: str, seed: int = 0):
    """Inputs and targets on the backend (drawn on the host, moved once)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, sizes[0]))
    T = rng.standard_normal((m, sizes[-1]))
    xdt = backend.dtype(dtype)
    return backend.asarray(X, xdt), backend.asarray(T, xdt)


def step_flops(sizes, m: int) -> int:
    """GEMM flops of one training step: per layer 2 m n_in n_out for the forward
    product and the weight gradient, and for every layer but the first one more
    for the delta sent back (elementwise work is not counted)."""
    return sum(2 * m * a * b * (2 if l == 1 else 3) for l, (a, b) in enumerate(zip(sizes, sizes[1:]), start=1))


def largest_layer(sizes) -> tuple[int, int]:
    return max(zip(sizes, sizes[1:]), key=lambda ab: ab[0] * ab[1])


def gemm_case(backend: Backend, m: int, k: int, n: int, dtype: str) -> Case:
    """(m, k) @ (k, n) into a preallocated buffer, through the backend's kernel table."""
    rng = np.random.default_rng(1)
    xdt = backend.dtype(dtype)
    a = backend.asarray(rng.standard_normal((m, k)), xdt)
    b = backend.asarray(rng.standard_normal((k, n)), xdt)
    out = backend.xp.empty((m, n), dtype=xdt)
    ops = backend.ops
    return Case(lambda: ops.matmul(a, b, out), lambda c: float(c[0, 0]))


# --- one training step: bpgpu and its peers ------------------------------------


def bpgpu_step_case(sizes, m: int, dtype: str, backend: Backend, lr: float = LEARNING_RATE) -> Case:
    """bpgpu.training.train_step with optim.SGD on already-validated backend arrays."""
    from bpgpu.optim import SGD
    from bpgpu.training import train_step

    net = MLP(sizes, dtype=dtype, backend=backend, init="he", seed=0, **STEP_NET)
    X, T = net._inputs(*batch(backend, sizes, m, dtype))
    opt = SGD(net, learning_rate=lr)
    return Case(lambda: train_step(net, X, T, opt), sync_scalar)


def numpy_reference_case(sizes, m: int, dtype: str, lr: float = LEARNING_RATE) -> Case:
    """The plain preallocated numpy step the CPU targets measure against (benchmarks/NOTES.md): one (n_in, n_out)
    weight matrix and one bias per layer, every buffer allocated up front, ufuncs
    with out=; the same math as bpgpu's step (relu, identity, ½‖a − t‖² / m)."""
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    L = len(sizes) - 1
    W = [(rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(dt) for a, b in zip(sizes, sizes[1:])]
    b = [np.zeros(n, dt) for n in sizes[1:]]
    A = [None] + [np.empty((m, n), dt) for n in sizes[1:]]
    D = [None] + [np.empty((m, n), dt) for n in sizes[1:]]
    mask = [None] + [np.empty((m, n), dt) for n in sizes[1:]]
    gW = [np.empty_like(w) for w in W]
    gb = [np.empty_like(v) for v in b]
    X = rng.standard_normal((m, sizes[0])).astype(dt)
    T = rng.standard_normal((m, sizes[-1])).astype(dt)
    loss = np.zeros((), dt)

    def step():
        a = X
        for l in range(1, L + 1):
            np.matmul(a, W[l - 1], out=A[l])
            A[l] += b[l - 1]
            if l < L:
                np.maximum(A[l], 0, out=A[l])
            a = A[l]
        np.subtract(A[L], T, out=D[L])
        np.divide(D[L], m, out=D[L])
        np.multiply(np.vdot(D[L], D[L]), 0.5 * m, out=loss)
        for l in range(L, 0, -1):
            np.matmul((X if l == 1 else A[l - 1]).T, D[l], out=gW[l - 1])
            np.sum(D[l], axis=0, out=gb[l - 1])
            if l > 1:
                np.matmul(D[l], W[l - 1].T, out=D[l - 1])
                np.greater(A[l - 1], 0, out=mask[l - 1])
                D[l - 1] *= mask[l - 1]
        for w, g in zip(W + b, gW + gb):
            g *= lr
            w -= g
        return loss

    return Case(step, sync_scalar)


def torch_case(sizes, m: int, dtype: str, device: str = "cpu", lr: float = LEARNING_RATE) -> Case:
    """PyTorch eager: nn.Linear/ReLU, ½ Σ (y − t)² / m, backward, optim.SGD.step()."""
    import torch

    torch.manual_seed(0)
    tdt = getattr(torch, dtype)
    layers: list = []
    for l, (a, b) in enumerate(zip(sizes, sizes[1:]), start=1):
        layers.append(torch.nn.Linear(a, b, dtype=tdt, device=device))
        if l < len(sizes) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    X = torch.randn(m, sizes[0], dtype=tdt, device=device)
    T = torch.randn(m, sizes[-1], dtype=tdt, device=device)

    def step():
        opt.zero_grad()
        loss = 0.5 * torch.sum((model(X) - T) ** 2) / m
        loss.backward()
        opt.step()
        return loss.detach()

    case = Case(step, lambda loss: loss.item())
    case.finish(case.fn())
    return case


def jax_case(sizes, m: int, dtype: str, lr: float = LEARNING_RATE) -> Case:
    """JAX: value_and_grad and the SGD update in one jit-compiled function with the
    parameters donated; compiled before timing."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # float64 cases; explicit dtypes keep float32 as float32
    rng = np.random.default_rng(0)
    params = [
        (jnp.asarray(rng.standard_normal((a, b)) * np.sqrt(2.0 / a), dtype=dtype), jnp.zeros(b, dtype=dtype))
        for a, b in zip(sizes, sizes[1:])
    ]
    X = jnp.asarray(rng.standard_normal((m, sizes[0])), dtype=dtype)
    T = jnp.asarray(rng.standard_normal((m, sizes[-1])), dtype=dtype)

    def loss_fn(params, X, T):
        a = X
        for l, (w, b) in enumerate(params, start=1):
            a = a @ w + b
            if l < len(params):
                a = jax.nn.relu(a)
        return 0.5 * jnp.sum((a - T) ** 2) / m

    def sgd(params, X, T):
        loss, grads = jax.value_and_grad(loss_fn)(params, X, T)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss

    update = jax.jit(sgd, donate_argnums=0)
    state = [params]

    def step():
        state[0], loss = update(state[0], X, T)
        return loss

    case = Case(step, lambda loss: loss.block_until_ready())
    case.finish(case.fn())
    return case


def sklearn_case(sizes, m: int, dtype: str, lr: float = LEARNING_RATE) -> Case:
    """scikit-learn's MLPRegressor(solver='sgd', momentum=0, alpha=0, batch_size=m):
    one ``partial_fit`` on m rows is exactly one SGD step (it includes sklearn's
    input validation and its own buffer allocation, which are part of its step)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((m, sizes[0])).astype(dtype)
    T = rng.standard_normal((m, sizes[-1])).astype(dtype)
    if sizes[-1] == 1:
        T = T.ravel()
    model = MLPRegressor(
        hidden_layer_sizes=tuple(sizes[1:-1]), activation="relu", solver="sgd", alpha=0.0,
        batch_size=m, learning_rate_init=lr, momentum=0.0, nesterovs_momentum=False, shuffle=False,
        random_state=0,
    )

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.partial_fit(X, T)

    case = Case(step)
    case.fn()
    return case


def step_case(impl: str, sizes, m: int, dtype: str, backend: Backend) -> Case:
    """The training-step case of one implementation; peers run on the CPU unless the
    backend is CuPy and the peer has CUDA (PyTorch)."""
    if impl == "bpgpu":
        return bpgpu_step_case(sizes, m, dtype, backend)
    if impl == "numpy_reference":
        return numpy_reference_case(sizes, m, dtype)
    if impl == "torch_eager":
        return torch_case(sizes, m, dtype, device=peer_device(backend, impl))
    if impl == "jax_jit":
        return jax_case(sizes, m, dtype)
    if impl == "sklearn":
        return sklearn_case(sizes, m, dtype)
    raise ValueError(f"impl must be one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}")


def available_peers() -> list[str]:
    """The peer implementations importable here (without importing them)."""
    import importlib.util

    modules = {"torch_eager": "torch", "jax_jit": "jax", "sklearn": "sklearn"}
    return [impl for impl, mod in modules.items() if importlib.util.find_spec(mod) is not None]


def implementations(backend: Backend, peers: list[str]) -> list[str]:
    """What runs next to bpgpu on this backend: on numpy the plain numpy step and every
    peer; on a GPU only the peers that run on it (the CPU ones ran with numpy)."""
    if backend.name == "numpy":
        return ["bpgpu", "numpy_reference", *peers]
    return ["bpgpu", *[p for p in peers if peer_device(backend, p) != "cpu"]]


def peer_device(backend: Backend, impl: str) -> str:
    """Where a peer runs: PyTorch on CUDA when the backend is CuPy and torch has CUDA."""
    if backend.device.startswith("cuda") and impl == "torch_eager":
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def available_backends() -> list[Backend]:
    """numpy always; CuPy too when a CUDA device is usable."""
    backends = [resolve("numpy")]
    if gpu_status().usable:
        backends.append(resolve("cupy"))
    return backends


# --- memory -----------------------------------------------------------------


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


# --- gradient cost ------------------------------------------------------------


def gradient_net(W_target: float, m: int, dtype: str, backend: Backend):
    """An [n, 16, 1] net with W = 16 (n + 1) + 17 ≈ W_target, and a batch of m.

    W grows through the input width, so every part of a pass grows like W: the
    two GEMMs (2 m W flops each) and the reads of X. With [h, h, 1] the
    elementwise work (m h = m √W) and the small, inefficient GEMMs of small h
    bend the curve below slope 1 over most of the range."""
    n = max(1, round((W_target - 17) / 16) - 1)
    net = MLP([n, GRADIENT_HIDDEN, 1], dtype=dtype, backend=backend, seed=0, **GRADIENT_NET)
    X, T = net._inputs(*batch(backend, net.sizes, m, dtype))
    return net, X, T


def backprop_case(net: MLP, X, T) -> Case:
    """One forward and one backward pass into the net's workspace (no copy, no checks)."""
    ws = net.workspace(X.shape[0])

    def gradient():
        net._forward(X, ws, net.params)
        return net._backward(X, T, ws, net.params, ws.grad)

    return Case(gradient, sync_scalar)


def finite_difference_case(net: MLP, X, T, method: str) -> Case:
    """The library's finite-difference gradient (bpgpu.numerical_gradient)."""
    from bpgpu.derivatives import numerical_gradient

    kind = {"central_difference": "central", "forward_difference": "forward"}[method]
    return Case(lambda: numerical_gradient(net, X, T, method=kind), lambda g: float(g[0]))


def fit_power_law(W, t) -> dict:
    """Least-squares line through (log10 W, log10 t): t ≈ c W^k."""
    k, log_c = np.polyfit(np.log10(W), np.log10(t), 1)
    return {"exponent": float(k), "prefactor": float(10**log_c), "fit_range": [int(min(W)), int(max(W))],
            "n_points": len(W)}


# passes through the net per gradient: one forward and one backward for backprop,
# W (forward) or 2W (central) loss evaluations for finite differences
PASSES = {"backprop": lambda W: 1, "forward_difference": lambda W: W, "central_difference": lambda W: 2 * W}


def compute_bound_points(points: list[dict], method: str) -> list[dict]:
    """The points whose time per pass is at least OVERHEAD_FACTOR times the smallest
    net's, so per-call overhead is at most ~1/OVERHEAD_FACTOR of it."""
    timed = [p for p in points if p.get(method) is not None]
    if not timed:
        return []
    floor = timed[0][method] / PASSES[method](timed[0]["W"])
    return [p for p in timed if p[method] / PASSES[method](p["W"]) >= OVERHEAD_FACTOR * floor]


def fit_gradient_cost(points: list[dict]) -> dict:
    """Exponents per method over its own compute-bound range, and over the range
    common to the three methods (the headline ``exponents`` / ``fit_range``)."""
    own = {}
    for method in METHODS:
        pts = compute_bound_points(points, method)
        if len(pts) < 2:  # never compute-bound within the budget: fit the largest points
            pts = [p for p in points if p.get(method) is not None][-3:]
        own[method] = fit_power_law([p["W"] for p in pts], [p[method] for p in pts]) if len(pts) >= 2 else None
    bounds = [own[m]["fit_range"] for m in METHODS if own[m]]
    lo, hi = max(b[0] for b in bounds), min(b[1] for b in bounds)
    common_pts = [p for p in points if lo <= p["W"] <= hi and all(p.get(m) is not None for m in METHODS)]
    if len(common_pts) >= 2:
        common = {m: fit_power_law([p["W"] for p in common_pts], [p[m] for p in common_pts]) for m in METHODS}
        exponents = {m: common[m]["exponent"] for m in METHODS}
        fit_range = [lo, hi]
    else:  # no overlap: report each method's own fit, over the union of the ranges
        exponents = {m: own[m]["exponent"] if own[m] else None for m in METHODS}
        fit_range = [min(b[0] for b in bounds), max(b[1] for b in bounds)]
    return {"exponents": exponents, "fit_range": fit_range, "common_fit_points": len(common_pts),
            "fit_range_is_common": len(common_pts) >= 2,
            "fits": own, "extrapolated": extrapolate_differences(points)}


def extrapolate_differences(points: list[dict]) -> list[dict]:
    """Finite-difference times beyond the budget, estimated (not measured): the number
    of loss evaluations times one loss evaluation timed at that W, scaled by the
    ratio measured at the largest W where the method itself was timed."""
    rows: dict[int, dict] = {}
    for method in METHODS[1:]:
        timed = [p for p in points if p.get(method) is not None]
        if not timed:
            continue
        last = timed[-1]
        scale = last[method] / (PASSES[method](last["W"]) * last["loss_pass"])
        for p in points:
            if p["W"] > last["W"]:
                rows.setdefault(p["W"], {"W": p["W"]})[method] = scale * PASSES[method](p["W"]) * p["loss_pass"]
    return [rows[W] for W in sorted(rows)]


def gradient_cost(backend: Backend, plan: Plan, dtype: str = "float64", tick: Callable[[str], None] = print) -> dict:
    """Time backprop on the whole W grid and finite differences while the budget lasts.

    The host BLAS runs on one thread here: OpenBLAS switches to threads above a
    size threshold (a kink in the curve), and threads on a shared machine turn
    small GEMMs erratic. The slopes are about the algorithms, not the threading.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the bench extra brings it; without it the BLAS keeps its threads
        return {**_gradient_cost(backend, plan, dtype, tick), "blas_threads": "default (threadpoolctl missing)"}
    with threadpool_limits(1, user_api="blas"):
        return {**_gradient_cost(backend, plan, dtype, tick), "blas_threads": 1}


def _gradient_cost(backend: Backend, plan: Plan, dtype: str, tick: Callable[[str], None]) -> dict:
    points = []
    spent = {"central_difference": 0.0, "forward_difference": 0.0}
    stopped = {m: False for m in spent}
    for e in plan.gradient_log10_W:
        net, X, T = gradient_net(10**e, plan.gradient_batch, dtype, backend)
        W = net.n_params
        tick(f"gradient W={W}")
        ws = net.workspace(plan.gradient_batch)
        passes = {"backprop": backprop_case(net, X, T),
                  "loss_pass": Case(lambda: net._loss(X, T, ws, net.params), sync_scalar)}
        point = {"W": W, "n": net.sizes[0],
                 **{k: t["best"] for k, t in interleaved_timings(passes, plan.min_time_s).items()}}
        for method in spent:
            if stopped[method]:
                continue
            prev = [p for p in points if p.get(method) is not None]
            # predict this point from the last one (cost ∝ W²) and stop before the budget is blown
            guess = prev[-1][method] * (W / prev[-1]["W"]) ** 2 if prev else 0.0
            if spent[method] + guess > plan.fd_budget_s / 2:
                stopped[method] = True
                continue
            t0 = time.perf_counter()
            # a call of 0.1 s or more is timed once, so the time spent stays the budget's
            case = finite_difference_case(net, X, T, method)
            point[method] = seconds_per_call(case, plan.min_time_s, long_call=0.1)["best"]
            spent[method] += time.perf_counter() - t0
        points.append(point)
    fits = fit_gradient_cost(points)
    return {
        "backend": backend.name,
        "dtype": dtype,
        "batch": plan.gradient_batch,
        "net": f"[n, {GRADIENT_HIDDEN}, 1], tanh hidden, identity output, squared error; W = {GRADIENT_HIDDEN}(n + 1) + {GRADIENT_HIDDEN + 1}",
        "finite_differences": "bpgpu.numerical_gradient(net, X, T, method='central'|'forward')",
        "extrapolation": "finite differences beyond the budget: loss evaluations x one timed loss evaluation, "
        "scaled to the last measured point (estimates, not measurements)",
        "fit_rule": f"log-log least squares over points whose time per forward pass is >= {OVERHEAD_FACTOR:g}x "
        "the smallest net's; 'exponents' and 'fit_range' use the W range common to all three methods",
        "points": points,
        **fits,
    }


# --- training step ------------------------------------------------------------


def train_step_rows(backends: list[Backend], plan: Plan, tick: Callable[[str], None] = print) -> dict:
    """Every config x dtype x backend x implementation, with GFLOP/s, the GEMM of the
    config's largest layer timed in the same run, ratios and bytes per step."""
    rows, memory = [], []
    peers = available_peers() if plan.peers else []
    for name in plan.configs:
        sizes, m = CONFIGS[name]
        flops = step_flops(sizes, m)
        k, n = largest_layer(sizes)
        for dtype in plan.dtypes:
            for backend in backends:
                cases = {"gemm": gemm_case(backend, m, k, n, dtype)}
                for impl in implementations(backend, peers):
                    tick(f"{name} {dtype} {backend.name} {impl}")
                    case = cases[impl] = step_case(impl, sizes, m, dtype, backend)
                    case.finish(case.fn())  # compile (numba, XLA) or load its cache: not a step to time
                tick(f"{name} {dtype} {backend.name} timing")
                timings = interleaved_timings(cases, plan.min_time_s, repeats=plan.repeats, settle=plan.settle_s)
                gemm_gflops = 2 * m * k * n / timings.pop("gemm")["best"] / 1e9
                group = []
                for impl, t in timings.items():
                    case = cases[impl]
                    group.append({
                        "config": name, "layer_sizes": sizes, "batch": m, "dtype": dtype, "backend": backend.name,
                        "impl": impl, "device": backend.device if impl == "bpgpu" else peer_device(backend, impl),
                        "seconds": t["best"], "seconds_median": t["median"], "calls": t["calls"],
                        "gflops": flops / t["best"] / 1e9, "gemm_shape": [m, k, n], "gemm_gflops": gemm_gflops,
                        "ratio_to_gemm": flops / t["best"] / 1e9 / gemm_gflops,
                    })
                    if impl == "bpgpu":
                        memory.append({"config": name, "dtype": dtype, "backend": backend.name,
                                       **bytes_allocated_per_step(case, backend)})
                base = {r["impl"]: r["seconds"] for r in group}
                for r in group:
                    r["ratio_to_bpgpu"] = r["seconds"] / base["bpgpu"]
                    ref = base.get("numpy_reference")
                    r["ratio_to_numpy_reference"] = r["seconds"] / ref if ref else None
                rows.extend(group)
    return {
        "net": "relu hidden, identity output, squared error (mean over the batch), SGD lr=0.01",
        "timing": "best of interleaved rounds (every implementation and the GEMM of a group take turns, in an "
        f"order shuffled per round, each burst after {plan.settle_s:g} s idle) of repeated calls after a warm-up "
        "call; seconds per step",
        "flops": "GEMM flops only: 2 m n_in n_out per product, 2 products for layer 1, 3 for the others",
        "ratio_to_gemm": "step GFLOP/s / GFLOP/s of (m, n_in) @ (n_in, n_out) for the config's largest layer",
        "ratios": "seconds / bpgpu's seconds (>1: slower than bpgpu) and / the plain numpy step's",
        "rows": rows,
        "memory": memory,
    }


# --- report -------------------------------------------------------------------


def machine_info(backend: Backend) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "bpgpu": bpgpu.__version__,
        "gpu": gpu_status().reason,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
                        for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        pass
    for peer in ("torch", "jax", "sklearn", "cupy"):
        module = sys.modules.get(peer)
        if module is not None:
            info[peer] = getattr(module, "__version__", "?")
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _range_kind(g: dict) -> str:
    return "" if g["fit_range_is_common"] else " (no range common to the three methods: each over its own)"


def duration(seconds: float) -> str:
    """A time in the unit that suits it: 35.2us, 4.10ms, 12.3s, 3.4h."""
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if seconds < 1000 * scale:
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds / 3600:.3g}h"


def table(results: dict) -> str:
    """The text table ``bpgpu bench`` prints."""
    g = results["gradient_cost"]
    load = results.get("machine", {}).get("load_average")
    lines = [f"backend {results['backend']} on {results['device']}"
             + (f" (1-minute load average {load[0]:.1f} on {os.cpu_count()} CPUs at the end)" if load else ""), "",
             f"gradient cost vs W ({g['backend']}, {g['dtype']}, batch {g['batch']}); "
             f"fitted exponents over W in [{g['fit_range'][0]}, {g['fit_range'][1]}]{_range_kind(g)}:"]
    for method in METHODS:
        k = g["exponents"][method]
        own = g["fits"][method]
        lines.append(f"  {method:20s} t ~ W^{k:.2f}" if k is not None else f"  {method:20s} (not measured)")
        if own:
            lines[-1] += f"   (own range {own['fit_range'][0]}-{own['fit_range'][1]}: W^{own['exponent']:.2f})"
    lines += ["", f"  {'W':>8s} {'backprop':>10s} {'central':>10s} {'forward':>10s}   (~: extrapolated, not measured)"]
    estimates = {p["W"]: p for p in g["extrapolated"]}
    for p in g["points"]:
        cells = [duration(p["backprop"])]
        for method in METHODS[1:]:
            if p.get(method) is not None:
                cells.append(duration(p[method]))
            elif method in estimates.get(p["W"], {}):
                cells.append("~" + duration(estimates[p["W"]][method]))
            else:
                cells.append("-")
        lines.append(f"  {p['W']:8d} " + " ".join(f"{c:>10s}" for c in cells))
    lines += ["", "training step (seconds per step; ratio: time / bpgpu's time, and / plain numpy step's):",
              f"  {'config':7s} {'dtype':8s} {'backend':7s} {'impl':16s} {'time':>10s} {'GFLOP/s':>8s} "
              f"{'/GEMM':>6s} {'/bpgpu':>7s} {'/numpy':>7s}"]
    for r in results["train_step"]["rows"]:
        ref = r["ratio_to_numpy_reference"]
        lines.append(
            f"  {r['config']:7s} {r['dtype']:8s} {r['backend']:7s} {r['impl']:16s} {duration(r['seconds']):>10s} "
            f"{r['gflops']:8.2f} {r['ratio_to_gemm']:6.2f} {r['ratio_to_bpgpu']:7.2f} "
            f"{ref if ref is None else f'{ref:.2f}':>7s}"
        )
    lines += ["", "bytes allocated per bpgpu step after warm-up:"]
    for r in results["train_step"]["memory"]:
        extra = f"peak {r['peak']:.0f} B, retained {r['retained']:.0f} B" if r["method"] == "tracemalloc" else \
            f"in use {r['retained']:.0f} B, pool growth {r['pool_growth']:.0f} B"
        lines.append(f"  {r['config']:7s} {r['dtype']:8s} {r['backend']:7s} {extra} ({r['method']})")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """results.md: the run's tables in Markdown, with machine, date and command."""
    g, machine = results["gradient_cost"], results["machine"]
    load = machine.get("load_average")
    lines = [
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs"
        + (f", BLAS {'; '.join(machine['blas'])}" if machine.get("blas") else "")
        + f"; backend {results['backend']} ({results['device']}); numpy {machine['numpy']}"
        + "".join(f", {k} {machine[k]}" for k in ("torch", "jax", "sklearn", "cupy") if k in machine)
        + (f"; 1-minute load average {load[0]:.1f} at the end (shared machine)" if load else ""),
        f"Date: {results['date']}. Command: `{results['command']}` ({results['seconds']:.0f} s).",
        "",
        f"Gradient cost vs W ({g['backend']}, {g['dtype']}, batch {g['batch']}, BLAS threads: {g['blas_threads']}; {g['net']}). "
        f"Fitted exponent k of t ∝ W^k over W ∈ [{g['fit_range'][0]}, {g['fit_range'][1]}]{_range_kind(g)}:",
        "",
        "| method | exponent (common range) | own fit range | exponent (own range) |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        k, own = g["exponents"][method], g["fits"][method]
        lines.append(f"| {method.replace('_', ' ')} | {'-' if k is None else f'{k:.2f}'} | "
                     + (f"{own['fit_range'][0]}–{own['fit_range'][1]} | {own['exponent']:.2f} |" if own else "- | - |"))
    estimates = {p["W"]: p for p in g["extrapolated"]}
    lines += ["", "| W | backprop | central difference | forward difference |", "|---|---|---|---|"]
    for p in g["points"]:
        cells = [duration(p["backprop"])]
        for method in METHODS[1:]:
            value = p.get(method)
            est = estimates.get(p["W"], {}).get(method)
            cells.append(duration(value) if value is not None else f"~{duration(est)} (extrapolated)" if est else "-")
        lines.append(f"| {p['W']} | " + " | ".join(cells) + " |")
    lines += ["", "One training step (forward + backward + SGD update; relu, identity output, squared error). "
              "Time is the best interleaved round; ×bpgpu = time / bpgpu's time; ×numpy = time / the plain "
              "preallocated numpy step's; GEMM = step GFLOP/s / GFLOP/s of the config's largest layer GEMM, same run.",
              "", "| config | dtype | backend | implementation | time | GFLOP/s | of GEMM | ×bpgpu | ×numpy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["train_step"]["rows"]:
        ref = r["ratio_to_numpy_reference"]
        lines.append(f"| {r['config']} {r['layer_sizes']} b{r['batch']} | {r['dtype']} | {r['backend']} | {r['impl']} | "
                     f"{duration(r['seconds'])} | {r['gflops']:.2f} | {r['ratio_to_gemm']:.2f} | "
                     f"{r['ratio_to_bpgpu']:.2f} | {'-' if ref is None else f'{ref:.2f}'} |")
    lines += ["", "Bytes allocated per bpgpu step after warm-up:", "",
              "| config | dtype | backend | method | peak above start | retained per step | pool growth per step |",
              "|---|---|---|---|---|---|---|"]
    for r in results["train_step"]["memory"]:
        cells = ["-" if r[k] is None else f"{r[k]:.0f} B" for k in ("peak", "retained", "pool_growth")]
        lines.append(f"| {r['config']} | {r['dtype']} | {r['backend']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> list[str]:
    """gradient_cost.png (log-log, fitted slopes, extrapolation dashed) and train_step.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = results["gradient_cost"]
    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"backprop": ("C0", "o"), "central_difference": ("C1", "s"), "forward_difference": ("C2", "^")}
    for method, (color, marker) in styles.items():
        pts = [(p["W"], p[method]) for p in g["points"] if p.get(method) is not None]
        if not pts:
            continue
        k = g["fits"][method]["exponent"] if g["fits"][method] else float("nan")
        fit = g["fits"][method]
        where = f" over W in [{fit['fit_range'][0]:.0e}, {fit['fit_range'][1]:.0e}]" if fit else ""
        ax.loglog(*zip(*pts), marker=marker, color=color, label=f"{method.replace('_', ' ')}: slope {k:.2f}{where}")
        if fit:
            Ws = np.array(fit["fit_range"], dtype=float)
            ax.loglog(Ws, fit["prefactor"] * Ws ** fit["exponent"], color=color, lw=6, alpha=0.25)
        ext = [(p["W"], p[method]) for p in g["extrapolated"] if method in p]
        if ext:
            ax.loglog([pts[-1][0]] + [w for w, _ in ext], [pts[-1][1]] + [t for _, t in ext], ls="--", color=color,
                      label=f"{method.replace('_', ' ')} (extrapolated)")
    ax.set_xlabel("W (number of parameters)")
    ax.set_ylabel("seconds per gradient")
    ax.set_title(f"Gradient cost, {g['backend']} {g['dtype']}, batch {g['batch']} (shaded: fit ranges)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gradient_cost.png", dpi=110)
    plt.close(fig)

    rows = results["train_step"]["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    impls = list(dict.fromkeys((r["impl"], r["backend"]) for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    series = [(impl, backend, dtype) for dtype in dtypes for impl, backend in impls]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(1, len(series))
    for i, (impl, backend, dtype) in enumerate(series):
        xs, ys = [], []
        for j, c in enumerate(configs):
            match = [r for r in rows if (r["impl"], r["backend"], r["dtype"], r["config"]) == (impl, backend, dtype, c)]
            if match:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(match[0]["seconds"])
        # one colour per implementation, float64 hatched
        ax.bar(xs, ys, width=width, color=f"C{impls.index((impl, backend)) % 10}", edgecolor="black", linewidth=0.3,
               hatch="//" if dtype != dtypes[0] else None, label=f"{impl} ({backend}, {dtype})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{c}\n{CONFIGS[c][0]} b{CONFIGS[c][1]}" for c in configs], fontsize=8)
    ax.set_ylabel("seconds per training step (log)")
    ax.set_title("One training step (forward + backward + SGD update)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "train_step.png", dpi=110)
    plt.close(fig)
    return ["gradient_cost.png", "train_step.png"]


# --- command line ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the short run (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds of tiny work (for tests)")
    parser.add_argument("--out", default="bench-out", help="directory for results.json and the plots")
    parser.add_argument("--backend", default="auto", help="auto (default), numpy or cupy")
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch, JAX and scikit-learn")
    parser.add_argument("--no-plots", action="store_true", help="write results.json only")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = plan_for(mode)
    if args.no_peers:
        plan = Plan(**{**plan.__dict__, "peers": False})
    try:
        backend = resolve(args.backend)
    except (RuntimeError, ValueError) as exc:
        print(f"bpgpu bench: {exc}", file=sys.stderr)
        return 2
    backends = [backend] if backend.name == "numpy" else [resolve("numpy"), backend]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    peers = available_peers() if plan.peers else []
    n_steps = len(plan.configs) * len(plan.dtypes) * sum(1 + len(implementations(b, peers)) for b in backends)
    # No tqdm monitor thread: tracemalloc counts every thread's Python allocations, and the
    # monitor waking up inside the large steps' memory probe showed up as 2 KB "per step".
    tqdm.monitor_interval = 0
    bar = tqdm(total=len(plan.gradient_log10_W) + n_steps, desc=f"bpgpu bench ({mode})", unit="task")

    def tick(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)

    started = time.perf_counter()
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {
        "backend": backend.name,
        "device": _cpu_model() if backend.device == "cpu" else f"{backend.device} ({gpu_status().reason})",
        "backend_reason": backend.reason,
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bpgpu"] + sys.argv[1:]) if Path(sys.argv[0]).name == "bpgpu" else " ".join(sys.argv),
        "gradient_cost": gradient_cost(backend, plan, tick=tick),
        "train_step": train_step_rows(backends, plan, tick=tick),
    }
    bar.close()
    results["machine"] = {**machine_info(backend), "load_average_before": load_before}
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(table(results))
    files = ["results.json", "results.md"] + ([] if args.no_plots else plot(results, out))
    print(f"\nwrote {', '.join(str(out / f) for f in files)} in {results['seconds']:.0f} s")
    return 0
