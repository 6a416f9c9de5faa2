"""bpgpu's own training-step cases, the plain numpy step and the GEMM they are judged by.

:func:`step_case` builds any implementation by name (``IMPLEMENTATIONS``), the
peers through :mod:`bpgpu.bench.peers`; :func:`implementations` says which of
them run next to bpgpu on a backend.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from bpgpu import engine
from bpgpu.backend import Backend, gpu_status, resolve
from bpgpu.network import MLP

from .configs import LEARNING_RATE, STEP_NET
from .peers import jax_case, peer_device, sklearn_case, torch_case
from .timing import Case, sync_scalar

IMPLEMENTATIONS = ("bpgpu", "numpy_reference", "torch_eager", "jax_jit", "sklearn")


def batch(backend: Backend, sizes, m: int, dtype: str, seed: int = 0):
    """Inputs and targets on the backend (drawn on the host, moved once)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, sizes[0]))
    T = rng.standard_normal((m, sizes[-1]))
    xdt = backend.dtype(dtype)
    return backend.asarray(X, xdt), backend.asarray(T, xdt)


def step_net(sizes, m: int, dtype: str, backend: Backend) -> tuple[MLP, object, object]:
    """The training-step net (He init, seed 0) and a batch of m already on its backend."""
    net = MLP(sizes, dtype=dtype, backend=backend, init="he", seed=0, **STEP_NET)
    X, T = net.check_inputs(*batch(backend, sizes, m, dtype))
    return net, X, T


def gemm_case(backend: Backend, m: int, k: int, n: int, dtype: str) -> Case:
    """(m, k) @ (k, n) into a preallocated buffer, through the backend's kernel table."""
    rng = np.random.default_rng(1)
    xdt = backend.dtype(dtype)
    a = backend.asarray(rng.standard_normal((m, k)), xdt)
    b = backend.asarray(rng.standard_normal((k, n)), xdt)
    out = backend.xp.empty((m, n), dtype=xdt)
    ops = backend.ops
    return Case(lambda: ops.matmul(a, b, out), lambda c: float(c[0, 0]))


def bpgpu_step_case(sizes, m: int, dtype: str, backend: Backend, lr: float = LEARNING_RATE) -> Case:
    """bpgpu.training.train_step with optim.SGD on already-validated backend arrays."""
    from bpgpu.optim import SGD
    from bpgpu.training import train_step

    net, X, T = step_net(sizes, m, dtype, backend)
    opt = SGD(net, learning_rate=lr)
    return Case(lambda: train_step(net, X, T, opt), sync_scalar)


def numpy_reference_case(sizes, m: int, dtype: str, lr: float = LEARNING_RATE) -> Case:
    """The plain preallocated numpy step the CPU targets measure against (benchmarks/NOTES.md): one (n_in, n_out)
    weight matrix and one bias per layer, every buffer allocated up front, ufuncs
    with out=; the same math as bpgpu's step (relu, identity, ½‖a − t‖² / m)."""
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    L = len(sizes) - 1
    W = [(rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(dt) for a, b in pairwise(sizes)]
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


def bpgpu_numpy_path_case(sizes, m: int, dtype: str, backend: Backend, lr: float = LEARNING_RATE) -> Case:
    """bpgpu's numpy path, whatever train_step routes to: forward, backward and the
    optimizer's update, the three calls of a step."""
    from bpgpu.optim import SGD

    net, X, T = step_net(sizes, m, dtype, backend)
    opt = SGD(net, learning_rate=lr)
    ws = net.workspace(m)

    def step():
        engine.forward(net, X, ws, net.params)
        loss = engine.backward(net, X, T, ws, net.params, ws.grad)
        opt.update(ws.grad)
        return loss

    return Case(step, sync_scalar)


def bpgpu_jit_case(sizes, m: int, dtype: str, backend: Backend, lr: float = LEARNING_RATE) -> Case | None:
    """The compiled step (bpgpu.kernels.jit.compiled_train_step), one numba call per
    step, compiled before timing; None where numba is missing."""
    from bpgpu.kernels import jit
    from bpgpu.optim import SGD

    net, X, T = step_net(sizes, m, dtype, backend)
    step = jit.compiled_train_step(net, SGD(net, learning_rate=lr))
    if step is None:
        return None
    step(X, T)  # compile (or load numba's cache)
    return Case(lambda: step(X, T), sync_scalar)


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


def implementations(backend: Backend, peers: list[str]) -> list[str]:
    """What runs next to bpgpu on this backend: on numpy the plain numpy step and every
    peer; on a GPU only the peers that run on it (the CPU ones ran with numpy)."""
    if backend.name == "numpy":
        return ["bpgpu", "numpy_reference", *peers]
    return ["bpgpu", *[p for p in peers if peer_device(backend, p) != "cpu"]]


def available_backends() -> list[Backend]:
    """numpy always; CuPy too when a CUDA device is usable."""
    backends = [resolve("numpy")]
    if gpu_status().usable:
        backends.append(resolve("cupy"))
    return backends
