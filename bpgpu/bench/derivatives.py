"""The derivative tools of bpgpu against JAX jit and torch.func, as timed cases.

Four quantities on the same net (tanh hidden layers, identity output, squared error,
reduction "mean", parameters in bpgpu's flat layout w):

    quantity                                bpgpu                     JAX                       torch.func
    gradient   (J, ∂J/∂w)                   net.loss_and_gradient     jit(value_and_grad)       grad_and_value
    jacobian   ∂y/∂x per sample (m, nL, n0) bp.jacobian               jit(vmap(jacrev))         vmap(jacrev)
    hvp        H v                          bp.hvp                    jit(jvp of grad)          jvp of grad
    hessian    H (W, W)                     bp.hessian                jit(hessian)              hessian

bpgpu is called through its public functions (input checks included); the peers get
their arrays ready-made and are compiled (JAX) before any timing. :func:`cases`
checks that the three agree (float64: 1e-9 relative) before it returns them. Used by
``bpgpu bench``'s ``derivatives`` section and by benchmarks/test_derivatives.py.
"""

from __future__ import annotations

import numpy as np

import bpgpu as bp
from bpgpu.backend import resolve
from bpgpu.kernels import jit

from .cases import gemm_case
from .plan import DERIVATIVE_SETTLE_S
from .timing import Case, interleaved_timings

# (layer sizes, batch m) of the table; the exact Hessian only where W² fits easily
NETS = {
    "8-16-1": ([8, 16, 1], 64),
    "32-64-64-4": ([32, 64, 64, 4], 128),
    "64-128-128-10": ([64, 128, 128, 10], 256),
    "784-256-10": ([784, 256, 10], 128),
}
HESSIAN_MAX_W = 7000
QUANTITIES = ("gradient", "jacobian", "hvp", "hessian")
AGREEMENT = {"float64": 1e-9, "float32": 2e-3}


def problem(sizes, m: int, dtype: str, seed: int = 0):
    """(net, X, T, v) with X, T, v host numpy arrays in ``dtype``."""
    net = bp.MLP(
        sizes,
        hidden="tanh",
        output="identity",
        loss="squared_error",
        dtype=dtype,
        backend="numpy",
        init="glorot",
        seed=seed,
    )
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((m, sizes[0])).astype(dtype)
    T = rng.standard_normal((m, sizes[-1])).astype(dtype)
    v = rng.standard_normal(net.n_params).astype(dtype)
    return net, X, T, v


def _unflatten(w, sizes, reshape):
    """[(b(l), Wᵀ(l))] of a flat vector in bpgpu's layout, for a peer's own array type."""
    layers, off = [], 0
    for n_in, n_out in zip(sizes, sizes[1:]):
        block = reshape(w[off : off + n_out * (n_in + 1)], (n_in + 1, n_out))
        layers.append((block[0], block[1:]))
        off += n_out * (n_in + 1)
    return layers


def _model(sizes, lib, X, T):
    """(forward(w, x), loss(w)) of the benchmark net in a peer's array library ``lib`` (jax.numpy,
    torch): tanh hidden layers, identity output, J = ½ Σ (a − t)² / m, w in bpgpu's layout."""
    m = X.shape[0]

    def forward(w, x):
        a = x
        layers = _unflatten(w, sizes, lib.reshape)
        for l, (b, wt) in enumerate(layers, start=1):
            a = a @ wt + b
            if l < len(layers):
                a = lib.tanh(a)
        return a

    def loss(w):
        r = forward(w, X) - T
        return 0.5 * lib.sum(r * r) / m

    return forward, loss


def bpgpu_fns(net, X, T, v) -> dict:
    return {
        "gradient": lambda: net.loss_and_gradient(X, T),
        "jacobian": lambda: bp.jacobian(net, X),
        "hvp": lambda: bp.hvp(net, X, T, v),
        "hessian": lambda: bp.hessian(net, X, T),
    }


def jax_fns(net, X, T, v) -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # float64 cases; explicit dtypes keep float32 as float32
    sizes = list(net.sizes)
    w, Xj, Tj, vj = (jnp.asarray(np.asarray(a)) for a in (net.params, X, T, v))

    forward, loss = _model(sizes, jnp, Xj, Tj)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    jacobian = jax.jit(jax.vmap(jax.jacrev(forward, argnums=1), in_axes=(None, 0)))
    hvp = jax.jit(lambda w, v: jax.jvp(jax.grad(loss), (w,), (v,))[1])
    hessian = jax.jit(jax.hessian(loss))

    def ready(f):
        return lambda: jax.block_until_ready(f())

    return {
        "gradient": ready(lambda: value_and_grad(w)),
        "jacobian": ready(lambda: jacobian(w, Xj)),
        "hvp": ready(lambda: hvp(w, vj)),
        "hessian": ready(lambda: hessian(w)),
    }


def torch_fns(net, X, T, v) -> dict:
    import torch
    from torch import func

    sizes = list(net.sizes)
    w, Xt, Tt, vt = (torch.from_numpy(np.array(a)) for a in (net.params, X, T, v))

    forward, loss = _model(sizes, torch, Xt, Tt)

    grad_and_value = func.grad_and_value(loss)
    jacobian = func.vmap(func.jacrev(forward, argnums=1), in_dims=(None, 0))
    hessian = func.hessian(loss)

    def no_grad(f):
        def call():
            with torch.no_grad():
                return f()

        return call

    return {
        "gradient": no_grad(lambda: grad_and_value(w)),
        "jacobian": no_grad(lambda: jacobian(w, Xt)),
        "hvp": no_grad(lambda: func.jvp(func.grad(loss), (w,), (vt,))[1]),
        "hessian": no_grad(lambda: hessian(w)),
    }


def _array(x) -> np.ndarray:
    """The derivative part of one result, as float64 numpy (the gradient: its vector)."""
    if isinstance(x, tuple):  # (J, g) of bpgpu and JAX, (g, J) of torch.func
        x = next(p for p in x if np.ndim(np.asarray(p)) == 1)
    return np.asarray(x, dtype=np.float64)


def relative_error(a, b) -> float:
    a, b = _array(a), _array(b)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def cases(name: str, dtype: str, quantity: str, peers=("jax", "torch")) -> dict[str, Case]:
    """{"bpgpu": Case, "jax": Case, "torch": Case} for one net, dtype and quantity, after
    checking that every peer agrees with bpgpu (AGREEMENT, relative to the largest entry)."""
    sizes, m = NETS[name]
    net, X, T, v = problem(sizes, m, dtype)
    makers = {"bpgpu": bpgpu_fns, "jax": jax_fns, "torch": torch_fns}
    fns = {impl: makers[impl](net, X, T, v)[quantity] for impl in ("bpgpu", *peers)}
    reference = fns["bpgpu"]()
    for impl in peers:
        err = relative_error(fns[impl](), reference)
        if not err <= AGREEMENT[dtype]:
            raise AssertionError(
                f"{impl} {quantity} on {name} {dtype}: relative difference {err:.3g} from bpgpu > {AGREEMENT[dtype]:g}"
            )
    return {impl: Case(fn) for impl, fn in fns.items()}


GEMM_SIZE = 1024  # the square GEMM whose rate the exact Hessian is judged by, timed in the same run


def hessian_flops(sizes, m: int) -> float:
    """Flops of the compiled exact Hessian's GEMMs, the pair GEMMs of the blocks of a layer of
    ≥ 16 units with itself and the next, [1, A(l′−1)]ᵀ G_j′ for each unit j′ elsewhere
    (bpgpu.kernels.compiled, the R-operator section): 2 × ``compiled.hessian_gemm_macs``, about
    m W² (the diagonal blocks' GEMMs stop at their diagonal); NaN without
    the compiled table (bp.hessian then runs the array-API passes, not these GEMMs)."""
    module = jit.kernels()
    if module is None:
        return float("nan")
    plan = np.zeros((3, len(sizes)), dtype=np.int64)
    plan[module.SIZE] = sizes
    return 2.0 * module.hessian_gemm_macs(plan, m)


def ratios(
    name: str,
    dtype: str,
    quantity: str,
    peers=("jax", "torch"),
    min_time: float = 1.0,
    settle: float = DERIVATIVE_SETTLE_S,
) -> dict:
    """One interleaved timing of bpgpu and ``peers`` (agreement checked first): seconds per call
    and each peer's time over bpgpu's (> 1: bpgpu is faster), each burst after ``settle`` idle
    seconds. For the exact Hessian also a GEMM_SIZE³ GEMM in the same rounds, and ``gemm_fraction``:
    the rate of bpgpu's Hessian GEMMs (:func:`hessian_flops` / time) over that GEMM's."""
    timed = cases(name, dtype, quantity, peers)
    if quantity == "hessian":
        timed["gemm"] = gemm_case(resolve("numpy"), GEMM_SIZE, GEMM_SIZE, GEMM_SIZE, dtype)
    times = interleaved_timings(timed, min_time=min_time, settle=settle)
    best = {impl: t["best"] for impl, t in times.items()}
    row = {
        "net": name,
        "dtype": dtype,
        "quantity": quantity,
        "seconds": best,
        "over_bpgpu": {impl: best[impl] / best["bpgpu"] for impl in peers},
    }
    if quantity == "hessian":
        sizes, m = NETS[name]
        gemm_rate = 2 * GEMM_SIZE**3 / best["gemm"]
        row["gemm_fraction"] = hessian_flops(sizes, m) / best["bpgpu"] / gemm_rate
    return row


def applies(name: str, quantity: str) -> bool:
    sizes, _ = NETS[name]
    W = sum(n * (k + 1) for k, n in zip(sizes, sizes[1:]))
    return quantity != "hessian" or W <= HESSIAN_MAX_W
