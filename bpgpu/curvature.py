"""The Hessian's spectrum without forming it: extreme eigenvalues by Lanczos and the
trace by Hutchinson's estimator, both on exact Hessian-vector products (PyHessian's
tools, on numpy or CuPy, without PyTorch).

H = ∂²J/∂w² (W × W) is never formed: each product H v is Pearlmutter's R-operator
pass (:func:`bpgpu.engine.hessian_vector_products`, as :func:`bpgpu.hvp`: O(W), about two gradients),
after one forward and backward pass at the current parameters; Hutchinson's probes
go through it in blocks, as one batched pass each.

    hessian_eigenvalues   the k extreme eigenvalues: implicitly restarted Lanczos
                          (ARPACK, ``scipy.sparse.linalg.eigsh``) on the CPU, CuPy's
                          thick-restart Lanczos (``cupyx.scipy.sparse.linalg.eigsh``) on
                          the GPU, each with a LinearOperator v ↦ H v
    hessian_trace         tr H ≈ (1/n) Σ_i v_iᵀ H v_i with Rademacher v_i (entries ±1,
                          E[v vᵀ] = I, so E[vᵀ H v] = tr H); its variance is
                          2 Σ_{i≠j} H_ij² / n, the smallest of any i.i.d. probe law
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bpgpu import engine
from bpgpu.backend import to_numpy
from bpgpu.derivatives import hessian
from bpgpu.network import MLP

# Hutchinson probes per batched R-pass: about this many elements per intermediate array.
_PROBE_ELEMENTS = 1 << 22

# which= → (ARPACK/CuPy mode, sort key of the eigenvalues returned)
_WHICH = {
    "largest": ("LA", lambda lam: -lam),
    "smallest": ("SA", lambda lam: lam),
    "magnitude": ("LM", lambda lam: -np.abs(lam)),
}


def _count(value: Any, name: str, upper: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if value > upper:
        raise ValueError(f"{name}={value} is larger than {what}")
    return int(value)


def hessian_eigenvalues(
    net: MLP,
    X: Any,
    T: Any,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 0.0,
    maxiter: int | None = None,
    return_eigenvectors: bool = False,
) -> Any:
    """The k extreme eigenvalues of the Hessian of J at the net's parameters, by Lanczos.

    Parameters
    ----------
    net, X (m, n_0), T (m, n_L) : the net and the data J is taken on.
    k : how many, 1 ≤ k ≤ W (k = W: every eigenvalue, from the dense exact Hessian,
        since Lanczos needs k < W).
    which : "largest" (algebraic, the sharpness), "smallest" (algebraic: the most
        negative curvature) or "magnitude" (largest absolute value ``abs(λ)``).
    tol : relative accuracy of each eigenvalue (0: machine precision).
    maxiter : Lanczos restarts (None: the solver's default).
    return_eigenvectors : also return the eigenvectors, (W, k), columns in the params layout.

    Returns
    -------
    eigenvalues : (k,) on the net's device, sorted from the most extreme: descending
        for "largest", ascending for "smallest", by descending ``abs(λ)`` for "magnitude";
        with return_eigenvectors, the pair (eigenvalues, eigenvectors).
    """
    if not isinstance(which, str) or which not in _WHICH:
        raise ValueError(f"which must be one of {', '.join(map(repr, _WHICH))}, got {which!r}")
    W = net.n_params
    k = _count(
        k,
        "k",
        W,
        f"the number of parameters W={W} of MLP {list(net.sizes)}: the Hessian is {W} × {W}, so it has {W} eigenvalues",
    )
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    X, T = net.check_inputs(X, T)
    backend = net.backend
    mode, key = _WHICH[which]
    if k == W:
        lam, vec = np.linalg.eigh(to_numpy(hessian(net, X, T, method="exact")).astype(np.float64))
    else:
        lam, vec = _lanczos(net, X, T, k, mode, float(tol), maxiter)
    order = np.argsort(key(lam), kind="stable")[:k]
    eigenvalues = backend.asarray(lam[order], net.xp_dtype)
    if not return_eigenvectors:
        return eigenvalues
    return eigenvalues, backend.asarray(vec[:, order], net.xp_dtype)


def _lanczos(net: MLP, X: Any, T: Any, k: int, mode: str, tol: float, maxiter: int | None):
    """eigsh with the operator v ↦ H v; host float64 (lam, vec) on every backend."""
    backend = net.backend
    linalg = backend.sparse_linalg()
    W = net.n_params
    on_device = backend.name == "cupy"  # CuPy's eigsh works on device vectors
    dtype = np.float64 if not on_device else net.xp_dtype

    def matvec(v: Any) -> Any:
        V = backend.xp.reshape(backend.asarray(v, net.xp_dtype), (1, -1))
        Hv = engine.hessian_vector_products(net, X, T, V)[0, :]
        return Hv if on_device else to_numpy(Hv).astype(np.float64)

    operator = linalg.LinearOperator((W, W), matvec=matvec, dtype=dtype)
    lam, vec = linalg.eigsh(operator, k=k, which=mode, tol=tol, maxiter=maxiter)
    return to_numpy(lam).astype(np.float64), to_numpy(vec).astype(np.float64)


def hessian_trace(net: MLP, X: Any, T: Any, n_samples: int = 100, seed: int | None = None) -> float:
    """tr H, the trace of the Hessian of J at the net's parameters, by Hutchinson's estimator.

    (1/n) Σ_{i=1..n} v_iᵀ H v_i with v_i Rademacher vectors (entries ±1 with probability ½,
    drawn on the host from ``numpy.random.default_rng(seed)``, so a seed gives the same
    estimate on every backend), each H v_i an exact R-operator pass. Unbiased, with
    standard error √(2 Σ_{i≠j} H_ij² / n). n_samples: the number of probes n.
    """
    n_samples = _count(n_samples, "n_samples", 1 << 31, "2**31")
    X, T = net.check_inputs(X, T)
    backend, xp = net.backend, net.backend.xp
    rng = np.random.default_rng(seed)
    block = max(1, min(n_samples, _PROBE_ELEMENTS // (X.shape[0] * max(net.sizes) + net.n_params)))
    total, done = 0.0, 0
    while done < n_samples:
        k = min(block, n_samples - done)
        V = backend.asarray(rng.integers(0, 2, size=(k, net.n_params)) * 2.0 - 1.0, net.xp_dtype)
        total += float(xp.sum(V * engine.hessian_vector_products(net, X, T, V)))
        done += k
    return total / n_samples


__all__ = ["hessian_eigenvalues", "hessian_trace"]
