"""The compiled CPU kernels: every kernel of the numpy backend, and the training step, compiled by numba.

The kernels behind one of the three kernel tables (compiled CPU, CUDA C in :mod:`bpgpu.kernels.cuda`,
the array-API reference in :mod:`bpgpu.kernels.generic`): the table itself, every name of
:data:`bpgpu.kernels.OPS` with the reference's signature, is :mod:`bpgpu.kernels.cpu`, whose
thin ops call the loops here (``_activate``, ``_derive``, the loss kernels, the optimizer
updates) through :mod:`bpgpu.kernels.aot`: compiled ahead of time into an extension built
from this module when it is fresh, numba's JIT otherwise. Also here: :func:`train_step`, the
whole training step in one call (:mod:`bpgpu.kernels.jit` drives it), and the passes it is
built from, for the derivative tools: :func:`forward_pass` (a(l) for every layer and z(L)) and
:func:`seeded_backprop` (a stack of K seeds δ(L) → δ(l) for every layer, one GEMM of K·m
rows per layer).

Each equation is written once, as a scalar function that every loop here calls:

    g(code, z)            the activation: identity, σ = exp(−softplus(−z)), tanh (by :func:`tanh`), relu,
                          leaky_relu max(z, k z), softplus log(1 + e^z), exp e^z
    g1(code, a)           g′(z) through a = g(z): 1, a(1 − a), 1 − a², [a > 0], 1 or k, 1 − e^{−a}, a
    g2(code, a)           g″(z) through a: 0, a(1 − a)(1 − 2a), −2a(1 − a²), 0, 0, (1 − e^{−a}) e^{−a}, a
    loss_term(ℓ, a, t)    ℓ per output: ½(a − t)², −t log p − (1 − t) log(1 − p), −t log p,
                          t log t − t log q − t + a (Poisson, 0 log 0 = 0)
    loss_grad(ℓ, a, t)    ∂ℓ/∂a: a − t, (a − t) / (p (1 − p)), −t / p, 1 − t / q
    loss_curvature        ∂²ℓ/∂a²: 1, t/p² + (1 − t)/(1 − p)², t/p², t/q²
                          (p: a clipped into [tiny, 1⁻]; q: a raised to at least tiny)
    logit_term(ℓ, z, t)   ℓ from the logit of a canonical elementwise pair: softplus(z) − t z
                          (sigmoid + binary cross-entropy), t log t − t z − t + e^z (exp + Poisson)
    softmax rows          a_k = e^{z_k − max z} / Σ_j e^{z_j − max z}; the product a ⊙ (s − Σ_k s_k a_k);
                          cross-entropy from the logits, (Σ_k t_k) lse(z) − Σ_k t_k z_k

Scalars are cast to the arrays' dtype first, so float32 stays float32; loss sums
are accumulated in float64. Everything compiles with numba's numpy error model:
x / 0 is ±inf or NaN, as in numpy, never an exception. Matrix products go to BLAS: the table's ``matmul`` and
``colsum`` through numpy, the training step through the ?gemm helper that numba's
own np.dot calls (with α and β, which the fused updates need).

Why one module: numba's on-disk cache (``cache=True``) checks a function only
against its own source file, so a cached function calling an edited function of
another module would go on running the stale code.

The training step's buffers: the caller passes one flat ``work`` vector of length
m (2 Σ_l n_l + n_L) + max_l n_l + 2 holding a(l), δ(l) for l = 1..L, z(L), a
row for the bias-gradient sums and the two scalars BLAS reads through pointers
(α, β); the kernel slices it into views, so a step allocates nothing.

SGD and momentum are fused into backprop: the weight-gradient product of each
layer is one BLAS call C ← α a(l−1)ᵀ δ(l) + β C with C the weights (SGD) or
the velocity (momentum), so the gradient of the weights is never written to
memory and no extra pass over the parameters reads it back (measured in
benchmarks/NOTES.md, "N1").
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from bpgpu.kernels import LEAKY_SLOPE
from bpgpu.kernels.codes import (  # the codes, numba-free (bpgpu.kernels.codes); numba reads them as constants
    BINARY_CROSS_ENTROPY,
    CODE,
    CROSS_ENTROPY,
    EXP,
    IDENTITY,
    LEAKY_RELU,
    MOMENTUM,
    NESTEROV,
    OFFSET,
    POISSON,
    RELU,
    SGD,
    SIGMOID,
    SIZE,
    SOFTMAX,
    SOFTPLUS,
    SQUARED_ERROR,
    TANH,
)

_TINY32, _TINY64 = float(np.finfo(np.float32).tiny), float(np.finfo(np.float64).tiny)

# Below this many multiply-adds (m k n) a plain loop beats the BLAS call made
# through np.dot (measured: benchmarks/NOTES.md, "Compiled CPU step (numba)", G1).
SMALL_GEMM = 512

# ?gemm through the helper numba's own np.dot calls (numba's helper library, which
# loads scipy.linalg.cython_blas): a named symbol, so the kernels stay cacheable,
# unlike a ctypes pointer to scipy's function. np.dot has no α and β, which the fused
# updates need. Arguments: kind ('s' or 'd'), transa, transb, m, n, k, &α, A, lda,
# B, ldb, &β, C, ldc, in BLAS's column-major terms.
_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(
        types.char,
        types.char,
        types.char,
        types.intp,
        types.intp,
        types.intp,
        types.voidptr,
        types.voidptr,
        types.intp,
        types.voidptr,
        types.intp,
        types.voidptr,
        types.voidptr,
        types.intp,
    ),
)


# --- tanh, vectorizable ---------------------------------------------------------------
# numba's np.tanh is a call into libm, one element at a time (measured 15–25 ns an element here,
# numpy's SIMD tanh 2–3 ns: benchmarks/NOTES.md, "S3"). This one is arithmetic only, so LLVM
# vectorizes the loops that call it: tanh|x| = e/(e + 2) with e = e^{2|x|} − 1 = 2^k (1 + q(r)) − 1,
# 2|x| = k ln 2 + r, |r| ≤ ln(2)/2, q(r) = e^r − 1 = r + r² p(r) by its Taylor polynomial, 2^k as the
# integer 1 << k. float64: degree 13 (truncation below half an ulp), within 3 ulp of numpy's tanh over
# [−20, 20] and down to the smallest subnormals (3 at a few points near ±0.2, where e/(e + 2) rounds
# three times; tests/test_tables.py). float32: the same steps in float32 arithmetic
# (twice the SIMD width, numba types the branch at compile time), degree 7 (truncation r⁸/8!, 1.3·10⁻⁸ of
# q at |r| = ln(2)/2, a tenth of an ulp), float32 ln 2 = hi + lo (fdlibm's expf split, hi with 16 bits so
# k hi is exact), |x| capped at 10 (tanh(10) rounds to 1); measured within 2 ulp of the correctly
# rounded tanh and 3 of numpy's float32 tanh (the same test; benchmarks/NOTES.md, "P1"). tanh(±0) = ±0,
# NaN stays NaN.
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # ln 2 = hi + lo, hi with 32 bits
_INV_LN2 = 1.44269504088896338700e00
_F = tuple(1.0 / math.factorial(j) for j in range(14))  # 1/j!
_LN2_HI32, _LN2_LO32 = np.float32(6.9314575195e-01), np.float32(1.4286067653e-06)
_INV_LN2_32 = np.float32(_INV_LN2)
_F32 = tuple(np.float32(f) for f in _F[:8])


@njit(cache=True, error_model="numpy", inline="always")
def tanh(x):
    """tanh x by arithmetic only (the section's comment), in float32 for a float32 x, else float64."""
    if isinstance(x, types.float32):
        one = np.float32(1.0)
        y = min(abs(x) * np.float32(2.0), np.float32(20.0))  # NaN passes through min
        kf = np.floor(y * _INV_LN2_32 + np.float32(0.5))
        kf = kf if kf == kf else np.float32(0.0)
        r = (y - kf * _LN2_HI32) - kf * _LN2_LO32
        p = _F32[7]
        p = _F32[6] + r * p
        p = _F32[5] + r * p
        p = _F32[4] + r * p
        p = _F32[3] + r * p
        p = _F32[2] + r * p
        q = r + r * (r * p)  # r + (r² p): one rounding on r's scale, an ulp less than r (1 + r p)
        two_k = np.float32(np.int32(1) << np.int32(kf))
        e = two_k * q + (two_k - one)
        t = e / (e + np.float32(2.0))
        return t if x > 0 else (-t if x < 0 else x)
    y = min(abs(x) * 2.0, 40.0)  # tanh(20) = 1 in float64; NaN passes through min
    kf = np.floor(y * _INV_LN2 + 0.5)
    kf = kf if kf == kf else 0.0  # NaN: any k (the polynomial carries the NaN)
    r = (y - kf * _LN2_HI) - kf * _LN2_LO
    p = _F[13]  # Horner, unrolled (a loop here defeats numba's inlining): q = r (1 + r (1/2! + r (1/3! + ...)))
    p = _F[12] + r * p
    p = _F[11] + r * p
    p = _F[10] + r * p
    p = _F[9] + r * p
    p = _F[8] + r * p
    p = _F[7] + r * p
    p = _F[6] + r * p
    p = _F[5] + r * p
    p = _F[4] + r * p
    p = _F[3] + r * p
    p = _F[2] + r * p
    q = r * (1.0 + r * p)
    two_k = float(1 << int(kf))
    e = two_k * q + (two_k - 1.0)
    t = e / (e + 2.0)
    return t if x > 0 else (-t if x < 0 else x)  # ±0 and NaN: x itself


# --- the scalar definitions ----------------------------------------------------------
# ``one`` is 1 in the arrays' dtype (numba has no type(x)(1)), ``slope`` k in it; the loops
# below make them once per call with :func:`_constants`.


@njit(cache=True, error_model="numpy", inline="always")
def g(code, x, one, slope):
    """a = g(z) for an elementwise activation (softmax works on rows: :func:`_softmax_rows`)."""
    zero = one - one
    if code == SIGMOID:
        return np.exp(-np.logaddexp(-x, zero))  # exp(−softplus(−z)): no overflow, full precision where σ is tiny
    if code == TANH:
        return tanh(x)  # in x's own precision (float32 arrays: float32 arithmetic, twice the SIMD width)
    if code == RELU:
        return zero if x < zero else x  # not max(x, 0): NaN stays NaN
    if code == LEAKY_RELU:
        return x if x > zero else x * slope
    if code == SOFTPLUS:
        return np.logaddexp(x, zero)  # log(1 + e^z), overflow-free
    if code == EXP:
        return np.exp(x)  # the inverse of the log link (overflows to inf, as numpy's exp)
    return x  # IDENTITY


@njit(cache=True, error_model="numpy", inline="always")
def g1(code, a, one, slope):
    """g′(z) written through the output a = g(z)."""
    zero = one - one
    if code == SIGMOID:
        return a * (one - a)
    if code == TANH:
        return one - a * a
    if code == RELU:
        return one if a > zero else zero
    if code == LEAKY_RELU:
        return one if a > zero else slope  # a has the sign of z
    if code == SOFTPLUS:
        return -np.expm1(-a)  # σ(z) = 1 − e^{−a}
    if code == EXP:
        return a  # exp′ = exp
    return one  # IDENTITY


@njit(cache=True, error_model="numpy", inline="always")
def g2(code, a, one):
    """g″(z) written through a = g(z); 0 for identity and (almost everywhere) relu and leaky_relu."""
    if code == SIGMOID:
        return a * (one - a) * (one - (a + a))  # σ″ = σ′ (1 − 2σ)
    if code == TANH:
        return -(a + a) * (one - a * a)  # tanh″ = −2 tanh · tanh′
    if code == SOFTPLUS:
        return -np.expm1(-a) * np.exp(-a)  # σ(z)(1 − σ(z)) with σ = 1 − e^{−a}
    if code == EXP:
        return a  # exp″ = exp
    return one - one


@njit(cache=True, error_model="numpy", inline="always")
def clip_unit(a, tiny, below_one):
    """a clipped into [tiny, 1⁻] so log and 1/a stay finite for saturated outputs (NaN stays NaN)."""
    return tiny if a < tiny else (below_one if a > below_one else a)


@njit(cache=True, error_model="numpy", inline="always")
def clip_positive(a, tiny):
    """a raised to at least tiny, so log a and 1/a stay finite (NaN stays NaN)."""
    return tiny if a < tiny else a


@njit(cache=True, error_model="numpy", inline="always")
def _t_log_t(t, tiny):
    return t * np.log(clip_positive(t, tiny))  # 0 log 0 = 0: exactly 0 at t = 0


@njit(cache=True, error_model="numpy", inline="always")
def loss_term(loss, a, t, one, tiny, below_one):
    """ℓ for one output: the per-sample loss is the sum over the outputs."""
    if loss == SQUARED_ERROR:
        e = a - t
        return e * e * (one / (one + one))
    if loss == POISSON:  # half the Poisson deviance
        return _t_log_t(t, tiny) - t * np.log(clip_positive(a, tiny)) - t + a
    p = clip_unit(a, tiny, below_one)
    if loss == BINARY_CROSS_ENTROPY:
        return -(t * np.log(p) + (one - t) * np.log1p(-p))
    return -(t * np.log(p))  # CROSS_ENTROPY


@njit(cache=True, error_model="numpy", inline="always")
def loss_grad(loss, a, t, one, tiny, below_one):
    """∂ℓ/∂a for one output."""
    if loss == SQUARED_ERROR:
        return a - t
    if loss == POISSON:
        return one - t / clip_positive(a, tiny)
    p = clip_unit(a, tiny, below_one)
    if loss == BINARY_CROSS_ENTROPY:
        return (a - t) / (p * (one - p))
    return -(t / p)  # CROSS_ENTROPY


@njit(cache=True, error_model="numpy", inline="always")
def loss_curvature(loss, a, t, one, tiny, below_one):
    """∂²ℓ/∂a² for one output (the losses' Hessians are diagonal)."""
    if loss == SQUARED_ERROR:
        return one
    if loss == POISSON:
        q = clip_positive(a, tiny)
        return t / (q * q)
    p = clip_unit(a, tiny, below_one)
    if loss == BINARY_CROSS_ENTROPY:
        return t / (p * p) + (one - t) / ((one - p) * (one - p))
    return t / (p * p)  # CROSS_ENTROPY


@njit(cache=True, error_model="numpy", inline="always")
def logit_term(loss, z, t, one, tiny):
    """ℓ from the logit z of a canonical elementwise pair, exact for any z: binary cross-entropy
    −t log σ(z) − (1 − t) log(1 − σ(z)) = softplus(z) − t z; Poisson (a = e^z) t log t − t z − t + e^z."""
    if loss == POISSON:
        return _t_log_t(t, tiny) - t * z - t + np.exp(z)
    return np.logaddexp(z, one - one) - t * z


@njit(cache=True, error_model="numpy", inline="always")
def _constants(x):
    """(1, k, tiny, 1⁻) in the dtype of array x."""
    one = x.dtype.type(1)
    tiny = x.dtype.type(_TINY32 if x.itemsize == 4 else _TINY64)
    return one, x.dtype.type(LEAKY_SLOPE), tiny, np.nextafter(one, one - one)


# --- whole arrays: the loops over the scalar definitions -------------------------------


@njit(cache=True, error_model="numpy")
def _softmax_rows(z, out):
    """out = softmax of every row of z (out may be z)."""
    m, n = z.shape
    for i in range(m):
        top = z[i, 0]
        for j in range(1, n):
            top = max(top, z[i, j])
        total = z.dtype.type(0)
        for j in range(n):
            out[i, j] = np.exp(z[i, j] - top)
            total += out[i, j]
        for j in range(n):
            out[i, j] /= total


@njit(cache=True, error_model="numpy")
def _activate(code, z, b, out):
    """z ← z + b; out = g(z) (out may be z); returns out."""
    m, n = z.shape
    one, slope, _, _ = _constants(z)
    if code == SOFTMAX:
        for i in range(m):
            for j in range(n):
                z[i, j] += b[j]
        _softmax_rows(z, out)
        return out
    if code == TANH:  # the code as a constant: g folds to tanh alone, a loop LLVM vectorizes
        _activate_loop(TANH, z, b, out, one, slope)
    else:
        _activate_loop(code, z, b, out, one, slope)
    return out


@njit(cache=True, error_model="numpy", inline="always")
def _softmax_times(s, a, out):
    """out = J_gᵀ s = a ⊙ (s − Σ_k s_k a_k) for one row of softmax outputs a (out may be s)."""
    dot = s.dtype.type(0)
    for j in range(s.shape[0]):
        dot += s[j] * a[j]
    for j in range(s.shape[0]):
        out[j] = (s[j] - dot) * a[j]


@njit(cache=True, error_model="numpy", inline="always")
def _activate_loop(code, z, b, out, one, slope):
    """z ← z + b; out = g(z), as one loop through one array (out is z) or two distinct ones: where
    out and z might overlap LLVM keeps the loop scalar (5× slower for tanh: benchmarks/NOTES.md, "S3")."""
    m, n = z.shape
    if out.ctypes.data == z.ctypes.data:
        for i in range(m):
            for j in range(n):
                z[i, j] = g(code, z[i, j] + b[j], one, slope)
    else:
        for i in range(m):
            for j in range(n):
                v = z[i, j] + b[j]
                z[i, j] = v
                out[i, j] = g(code, v, one, slope)


@njit(cache=True, error_model="numpy")
def _derive(code, s, a, out):
    """out = s ⊙ g′(z), g′ through a = g(z) (out may be s; returns out); softmax: a ⊙ (s − Σ_k s_k a_k) per row."""
    m, n = s.shape
    one, slope, _, _ = _constants(s)
    if code == SOFTMAX:
        for i in range(m):
            _softmax_times(s[i], a[i], out[i])
        return out
    if code == TANH:  # the code as a constant: a loop LLVM vectorizes (as in _activate; NOTES "P3")
        _derive_loop(TANH, s, a, out, one, slope)
    else:
        _derive_loop(code, s, a, out, one, slope)
    return out


@njit(cache=True, error_model="numpy", inline="always")
def _derive_loop(code, s, a, out, one, slope):
    """out = s ⊙ g′(z) through a, elementwise, as one loop; in place through out alone when out is s
    (as in :func:`_activate_loop`: through both, LLVM kept the loop scalar, 4× slower)."""
    m, n = s.shape
    if out.ctypes.data == s.ctypes.data:
        for i in range(m):
            for j in range(n):
                out[i, j] = out[i, j] * g1(code, a[i, j], one, slope)
    else:
        for i in range(m):
            for j in range(n):
                out[i, j] = s[i, j] * g1(code, a[i, j], one, slope)


@njit(cache=True, error_model="numpy")
def _softmax_cross_entropy_row(z, t, i):
    """J_i of softmax + cross-entropy from the logits: (Σ_k t_k) lse(z) − Σ_k t_k z_k, lse = top + log Σ e^{z − top}."""
    n = z.shape[1]
    top = z[i, 0]
    for j in range(1, n):
        top = max(top, z[i, j])
    se = z.dtype.type(0)
    mass, row = 0.0, 0.0
    for j in range(n):
        se += np.exp(z[i, j] - top)
        mass += t[i, j]
        row -= t[i, j] * z[i, j]
    return row + mass * (np.log(se) + top)


@njit(cache=True, error_model="numpy")
def _loss_sum(loss, x, t, from_logits=False, weights=None):
    """Σ_n s_n J_n (s_n = 1 without weights; float64): from the outputs x = a (clipped), or, with
    ``from_logits``, from the logits x = z of a canonical pair (exact for any z)."""
    m, n = x.shape
    one, _, tiny, below_one = _constants(x)
    total = 0.0
    for i in range(m):
        s = 1.0 if weights is None else weights[i]
        if from_logits and loss == CROSS_ENTROPY:
            row = _softmax_cross_entropy_row(x, t, i)
        elif from_logits and loss != SQUARED_ERROR:  # ½ (z − t)² is the identity pair's own form
            row = 0.0
            for j in range(n):
                row += logit_term(loss, x[i, j], t[i, j], one, tiny)
        else:
            row = 0.0
            for j in range(n):
                row += loss_term(loss, x[i, j], t[i, j], one, tiny, below_one)
        total += row * s
    return total


@njit(cache=True, error_model="numpy")
def _loss_grad(loss, a, t, c, out):
    """out = c ∂ℓ/∂a (out may be a); returns out."""
    m, n = a.shape
    one, _, tiny, below_one = _constants(a)
    c_ = a.dtype.type(c)
    for i in range(m):
        for j in range(n):
            out[i, j] = loss_grad(loss, a[i, j], t[i, j], one, tiny, below_one) * c_
    return out


@njit(cache=True, error_model="numpy")
def _residual(a, t, c, delta):
    """δ = c (a − t): the output delta of every canonical pair."""
    m, n = a.shape
    c_ = a.dtype.type(c)
    for i in range(m):
        for j in range(n):
            delta[i, j] = (a[i, j] - t[i, j]) * c_


# --- optimizer updates over the flat vector, in place (scikit-learn's equations) ---------------
# The table's sgd_update, adam_update, … (bpgpu.kernels.cpu) call these.


@njit(cache=True, error_model="numpy")
def _sgd(w, g_, lr):
    step = w.dtype.type(lr)
    for i in range(w.shape[0]):
        w[i] -= g_[i] * step


@njit(cache=True, error_model="numpy")
def _momentum(w, g_, v, lr, mu, nesterov):
    step, mu_ = w.dtype.type(lr), w.dtype.type(mu)
    for i in range(w.shape[0]):
        d = g_[i] * step
        v[i] = v[i] * mu_ - d
        w[i] = w[i] + v[i] if not nesterov else (w[i] - d) + v[i] * mu_


@njit(cache=True, error_model="numpy")
def _adam(w, g_, m, v, lr_t, beta1, beta2, eps):
    dt = w.dtype.type
    b1, b2, one = dt(beta1), dt(beta2), dt(1)
    step, eps_ = dt(lr_t), dt(eps)
    for i in range(w.shape[0]):
        m[i] = m[i] * b1 + g_[i] * (one - b1)
        v[i] = v[i] * b2 + g_[i] * g_[i] * (one - b2)
        w[i] -= m[i] / (np.sqrt(v[i]) + eps_) * step


@njit(cache=True, error_model="numpy")
def _l2(g_, w, mask, alpha):
    a = w.dtype.type(alpha)
    for i in range(w.shape[0]):
        g_[i] += w[i] * mask[i] * a


@njit(cache=True, error_model="numpy")
def _outer_sgd(wt, b, a, delta, lr):
    step = wt.dtype.type(lr)
    for i in range(wt.shape[0]):
        for j in range(wt.shape[1]):
            wt[i, j] -= a[i] * delta[j] * step
    for j in range(b.shape[0]):
        b[j] -= delta[j] * step


# --- compiled passes: the forward pass and seeded backprop (building blocks) -----------------
# Defined before the training step, which calls forward_pass; they take the step's plan
# (3, L + 1) and the helpers _gemm and _view below it (numba resolves globals at compile time).
# A stack of K seeds is K·m rows in one of two orders: seed-major (row k m + n, a (K, m, n_l)
# array) or sample-major (row n K + k, a (m, K, n_l) array); every backprop product is then
# one GEMM of K·m rows.


@njit(cache=True, error_model="numpy")
def activations_size(plan, m):
    """Length of the forward work vector: m Σ_l n_l for a(1)..a(L), then m n_L for z(L)."""
    sizes = plan[SIZE]
    total = 0
    for l in range(1, sizes.shape[0]):
        total += sizes[l]
    return m * (total + sizes[sizes.shape[0] - 1])


@njit(cache=True, error_model="numpy")
def layer_start(plan, l, rows):
    """Where layer l's (rows, n_l) block starts in a work vector that stores l = 1..L in turn."""
    sizes = plan[SIZE]
    start = 0
    for j in range(1, l):
        start += sizes[j]
    return rows * start


@njit(cache=True, error_model="numpy")
def forward_pass(X, w, plan, work, z_out, slots):
    """The forward pass a(l) = g_l(a(l−1) Wᵀ(l) + b(l)) at parameters w; returns a(L) (a view of work).

    work: a(1), ..., a(L) in turn, each (m, n_l) row-major (hidden layers activate in place,
    :func:`layer_start` with rows = m); z_out: (m, n_L), receives z(L); slots: BLAS's α, β.
    """
    sizes, offsets, codes = plan[SIZE], plan[OFFSET], plan[CODE]
    m, L = X.shape[0], sizes.shape[0] - 1
    a_prev = X
    start = 0
    for l in range(1, L + 1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        a = _view(work, start, m, n_out)
        z = z_out if l == L else a
        _gemm(a_prev, w[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out), z, 1.0, 0.0, slots)
        _activate(codes[l], z, w[off : off + n_out], a)
        a_prev = a
        start += m * n_out
    return a_prev


@njit(cache=True, error_model="numpy", inline="always")
def _sample_of(r, m, K, sample_major):
    """The sample n of row r of a seed stack (row k m + n seed-major, n K + k sample-major)."""
    return r // K if sample_major else r % m


@njit(cache=True, error_model="numpy")
def times_g1_rows(code, s, a, K, sample_major):
    """s ← s ⊙ g′(z) for a stack of K·m rows s (K·m, n), g′ through a = g(z) (m, n), the row's
    sample given by the stack's order; softmax: s_r ← a_n ⊙ (s_r − Σ_j s_rj a_nj)."""
    if code == SOFTMAX:
        rows, n = s.shape
        for r in range(rows):
            i = _sample_of(r, a.shape[0], K, sample_major)
            dot = s.dtype.type(0)
            for j in range(n):
                dot += s[r, j] * a[i, j]
            for j in range(n):
                s[r, j] = (s[r, j] - dot) * a[i, j]
    elif code == TANH:  # the code as a constant: a loop LLVM vectorizes (as in _activate)
        _times_g1_loop(TANH, s, a, K, sample_major)
    else:
        _times_g1_loop(code, s, a, K, sample_major)


@njit(cache=True, error_model="numpy", inline="always")
def _times_g1_loop(code, s, a, K, sample_major):
    rows, n = s.shape
    one, slope, _, _ = _constants(s)
    for r in range(rows):
        i = _sample_of(r, a.shape[0], K, sample_major)
        for j in range(n):
            s[r, j] = s[r, j] * g1(code, a[i, j], one, slope)


@njit(cache=True, error_model="numpy")
def seeded_backprop(w, plan, acts, deltas, m, K, sample_major, slots, lowest=1):
    """Backprop of a stack of K seeds: δ(l−1) = (δ(l) W(l)) ⊙ g′_{l−1}, l = L..lowest + 1.

    acts: the forward work vector of :func:`forward_pass` (a(l), m rows each); deltas: δ(1)..δ(L),
    each K·m rows (:func:`layer_start` with rows = K m), δ(L) written by the caller (the seeds);
    each product is one GEMM of K·m rows (:func:`_gemm`, BLAS with α = 1, β = 0).
    """
    sizes, offsets, codes = plan[SIZE], plan[OFFSET], plan[CODE]
    L = sizes.shape[0] - 1
    rows = K * m
    for l in range(L, lowest, -1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        wt = w[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out)
        delta = _view(deltas, layer_start(plan, l, rows), rows, n_out)
        below = _view(deltas, layer_start(plan, l - 1, rows), rows, n_in)
        _gemm(delta, wt.T, below, 1.0, 0.0, slots)
        times_g1_rows(codes[l - 1], below, _view(acts, layer_start(plan, l - 1, m), m, n_in), K, sample_major)


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def all_finite(x):
    """Whether every entry of the 2-D array x is finite (no temporary, unlike np.isfinite): Σ (x − x)
    is 0 for finite entries and NaN once one is NaN or ±inf. Reassociation (no other fast-math
    flag, so NaN and inf keep their meaning) lets LLVM vectorize the sum: 100,352 float32 entries
    in 5 µs against 34 µs for an early-exit loop and 21 µs for numpy's sum (NOTES "P7")."""
    total = x.dtype.type(0)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            total += x[i, j] - x[i, j]
    return total == 0


@njit(cache=True, error_model="numpy")
def seeded_work_size(plan, m, K):
    """Length of the work vector of the seeded tools: the forward pass's a(l) and z(L)
    (:func:`activations_size`), δ(1)..δ(L) of K·m rows each, and BLAS's α, β."""
    return activations_size(plan, m) + layer_start(plan, plan.shape[1], K * m) + 2


@njit(cache=True, error_model="numpy")
def _split_work(plan, work, m, K):
    """(acts, z(L), deltas, slots): the views of a :func:`seeded_work_size` vector."""
    L = plan.shape[1] - 1
    n_top = plan[SIZE, L]
    size = activations_size(plan, m)
    acts = work[:size]
    z = _view(acts, size - m * n_top, m, n_top)
    end = size + layer_start(plan, L + 1, K * m)
    return acts, z, work[size:end], work[end : end + 2]


@njit(cache=True, error_model="numpy")
def _top_seeds(plan, deltas, m, K):
    """δ(L) of a seed stack, (K·m, n_L), a view of deltas."""
    L = plan.shape[1] - 1
    return _view(deltas, layer_start(plan, L, K * m), K * m, plan[SIZE, L])


@njit(cache=True, error_model="numpy")
def output_seeds(code, a, s, K, sample_major):
    """s ← the seeds ∂y_k/∂z(L) of y = a(L) for every sample n and output k = 0..K−1 (K = n_L):
    row (k, n) is e_k ⊙ g′(z_n) (softmax: a_n ⊙ (e_k − a_nk)); s (K·m, n_L), a (m, n_L)."""
    rows, n = s.shape
    m = a.shape[0]
    zero = s.dtype.type(0)
    for r in range(rows):
        k = r % K if sample_major else r // m
        for j in range(n):
            s[r, j] = zero
        s[r, k] = zero + 1
    times_g1_rows(code, s, a, K, sample_major)


@njit(cache=True, error_model="numpy")
def outer_rows(X, acts, deltas, plan, m, K, sample_major, out):
    """out[r] = the gradient in w of seed row r: per layer l, [δ_r(l), a_n(l−1) ⊗ δ_r(l)] laid
    out like Θ(l) (the bias, then Wᵀ row by row), n the row's sample; out (K·m, W)."""
    sizes, offsets = plan[SIZE], plan[OFFSET]
    L, rows = sizes.shape[0] - 1, K * m
    for l in range(1, L + 1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        delta = _view(deltas, layer_start(plan, l, rows), rows, n_out)
        a_in = X if l == 1 else _view(acts, layer_start(plan, l - 1, m), m, n_in)
        for r in range(rows):
            # through 1-D views of the row: indexing out[r, base + j] directly kept LLVM from
            # vectorizing the inner loop (measured 3–6× slower: benchmarks/NOTES.md, "S3")
            n, src = _sample_of(r, m, K, sample_major), delta[r]
            block = out[r, off : off + n_out * (n_in + 1)].reshape(n_in + 1, n_out)  # Θ(l) column-major
            for j in range(n_out):
                block[0, j] = src[j]
            for i in range(n_in):
                ai, dst = a_in[n, i], block[i + 1]
                for j in range(n_out):
                    dst[j] = ai * src[j]


@njit(cache=True, error_model="numpy", nogil=True)  # run on sample blocks in threads (jit.py)
def input_jacobian(X, w, plan, work, out):
    """∂y_k/∂x per sample into out (m·n_L, n_0), rows (n, k): the output seeds backpropagated
    (sample-major), then δ(1) W(1) in one GEMM. False (nothing computed) when X is not finite."""
    if not all_finite(X):
        return False
    m, L = X.shape[0], plan.shape[1] - 1
    K, n_in, n_out, off = plan[SIZE, L], plan[SIZE, 0], plan[SIZE, 1], plan[OFFSET, 0]
    acts, z, deltas, slots = _split_work(plan, work, m, K)
    a = forward_pass(X, w, plan, acts, z, slots)
    output_seeds(plan[CODE, L], a, _top_seeds(plan, deltas, m, K), K, True)
    seeded_backprop(w, plan, acts, deltas, m, K, True, slots)
    wt = w[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out)
    _gemm(_view(deltas, 0, K * m, n_out), wt.T, out, 1.0, 0.0, slots)
    return True


@njit(cache=True, error_model="numpy", nogil=True)  # run on sample blocks in threads (jit.py)
def parameter_jacobian(X, w, plan, work, out):
    """∂y_nk/∂w into out (m·n_L, W), rows (n, k); False (nothing computed) when X is not finite."""
    if not all_finite(X):
        return False
    m, L = X.shape[0], plan.shape[1] - 1
    K = plan[SIZE, L]
    acts, z, deltas, slots = _split_work(plan, work, m, K)
    a = forward_pass(X, w, plan, acts, z, slots)
    output_seeds(plan[CODE, L], a, _top_seeds(plan, deltas, m, K), K, True)
    seeded_backprop(w, plan, acts, deltas, m, K, True, slots)
    outer_rows(X, acts, deltas, plan, m, K, True, out)
    return True


@njit(cache=True, error_model="numpy", nogil=True)  # run on sample blocks in threads (jit.py)
def per_sample_gradients(X, T, w, plan, loss, work, out, weights=None):
    """s_n ∂ℓ_n/∂w into out (m, W): δ_n(L) = s_n ∂ℓ_n/∂z(L) (the step's output delta with c = 1),
    backprop, the outer products. False (nothing computed) when X or T is not finite."""
    if not (all_finite(X) and all_finite(T)):
        return False
    m, L = X.shape[0], plan.shape[1] - 1
    acts, z, deltas, slots = _split_work(plan, work, m, 1)
    a = forward_pass(X, w, plan, acts, z, slots)
    _loss_and_delta(loss, plan[CODE, L], z, a, T, 1.0, _top_seeds(plan, deltas, m, 1), weights)
    seeded_backprop(w, plan, acts, deltas, m, 1, False, slots)
    outer_rows(X, acts, deltas, plan, m, 1, False, out)
    return True


@njit(cache=True, error_model="numpy")
def gauss_newton_seeds(loss, code, a, T, s, weights=None):
    """s ← the Gauss–Newton seeds √s_n Fᵀ_n ∂u/∂z(L), rows (k, n) (seed-major, K = n_L), s (K·m, n_L):
    u = z(L) for a canonical pair (identity: e_k; sigmoid: e_k √(a(1 − a)); exp: e_k √a;
    softmax: √a_k (e_k − a)); otherwise u = a(L): (e_k √ℓ″_k) ⊙ g′ (bpgpu/per_sample.py)."""
    m, K = a.shape
    one, _, tiny, below_one = _constants(a)
    zero = one - one
    canonical = _canonical(loss, code)
    for r in range(K * m):
        k, n = r // m, r % m
        for j in range(K):
            s[r, j] = zero
        akk = a[n, k]
        if not canonical:
            s[r, k] = np.sqrt(loss_curvature(loss, akk, T[n, k], one, tiny, below_one))
        elif code == SIGMOID:
            s[r, k] = np.sqrt(akk * (one - akk))
        elif code == EXP:
            s[r, k] = np.sqrt(akk)
        elif code == SOFTMAX:
            root = np.sqrt(akk)
            for j in range(K):
                s[r, j] = -root * a[n, j]
            s[r, k] += root
        else:
            s[r, k] = one
    if not canonical:
        times_g1_rows(code, s, a, K, False)
    if weights is not None:
        for r in range(K * m):
            root = s.dtype.type(np.sqrt(weights[r % m]))
            for j in range(K):
                s[r, j] *= root


@njit(cache=True, error_model="numpy")
def gauss_newton_pass(X, T, w, plan, loss, work, weights=None):
    """The forward pass and the backprop of the Gauss–Newton seeds (:func:`gauss_newton_seeds`):
    a(l) and δ(l) of every seed row (k, n) in work's views (:func:`seeded_work_size`, K = n_L).
    False (nothing computed) when X or T is not finite."""
    if not (all_finite(X) and all_finite(T)):
        return False
    m, L = X.shape[0], plan.shape[1] - 1
    K = plan[SIZE, L]
    acts, z, deltas, slots = _split_work(plan, work, m, K)
    a = forward_pass(X, w, plan, acts, z, slots)
    gauss_newton_seeds(loss, plan[CODE, L], a, T, _top_seeds(plan, deltas, m, K), weights)
    seeded_backprop(w, plan, acts, deltas, m, K, False, slots)
    return True


@njit(cache=True, error_model="numpy")
def gauss_newton_rows(X, T, w, plan, loss, work, out, weights=None):
    """The Gauss–Newton factor R into out (n_L·m, W), rows (k, n): :func:`gauss_newton_pass`, then
    the outer products. False (nothing computed) when X or T is not finite."""
    if not gauss_newton_pass(X, T, w, plan, loss, work, weights):
        return False
    m = X.shape[0]
    K = plan[SIZE, plan.shape[1] - 1]
    acts, _, deltas, _ = _split_work(plan, work, m, K)
    outer_rows(X, acts, deltas, plan, m, K, False, out)
    return True


@njit(cache=True, error_model="numpy", inline="always")
def _canonical(loss, output):
    """Whether (output, loss) is a canonical pair: the link cancels, δ(L) = c (a − t)."""
    return (
        (loss == SQUARED_ERROR and output == IDENTITY)
        or (loss == BINARY_CROSS_ENTROPY and output == SIGMOID)
        or (loss == CROSS_ENTROPY and output == SOFTMAX)
        or (loss == POISSON and output == EXP)
    )


# --- Levenberg–Marquardt: the residuals form's N × N matrix ----------------------------------

# rows of the N × N matrix per block: the block's two products (rows × N) stay in the L1/L2 cache
GRAM_BLOCK = 32


@njit(cache=True, error_model="numpy")
def kronecker_gram(D, A, sizes, K, Q, S, split, scratch, slots):
    """The upper triangle (c ≥ r, row-major) of the residuals form's N × N matrices, N = K m,
    row r = k m + n (seed k, sample n), from R's Kronecker rows [1, a_n(l−1)] ⊗ δ_kn(l):

        split False:  Q = Σ_l (δ(l) δ(l)ᵀ) ⊙ (1 + a(l−1) a(l−1)ᵀ)      (= R Rᵀ; S not touched)
        split True:   S = Σ_l δ(l) δ(l)ᵀ,  Q = Σ_l (δ(l) δ(l)ᵀ) ⊙ (a(l−1) a(l−1)ᵀ)   (bias and weight parts)

    D (N, Σ_l n_l): δ(1)..δ(L) side by side; A (m, Σ_l n_{l−1}): a(0)..a(L−1) side by side; sizes:
    [n_0, ..., n_L]. The lower triangles are not written. Per block of GRAM_BLOCK rows and per
    layer, two BLAS products into ``scratch`` (2 GRAM_BLOCK N) and one pass over the block, so
    that Q and S are each written once instead of through N × N temporaries.
    """
    N, m = D.shape[0], A.shape[0]
    L = sizes.shape[0] - 1
    one = Q.dtype.type(1)
    dd = scratch[: GRAM_BLOCK * N].reshape(GRAM_BLOCK, N)
    aa = scratch[GRAM_BLOCK * N : 2 * GRAM_BLOCK * N].reshape(GRAM_BLOCK, N)
    for k in range(K):
        for n0 in range(0, m, GRAM_BLOCK):
            n1 = min(n0 + GRAM_BLOCK, m)
            b, r0 = n1 - n0, k * m + n0
            a0 = n0 if K == 1 else 0  # the samples of the columns c ≥ r0 (all of them when K > 1)
            d_col, a_col = 0, 0
            for l in range(1, L + 1):
                n_in, n_out = sizes[l - 1], sizes[l]
                Dl, Al = D[:, d_col : d_col + n_out], A[:, a_col : a_col + n_in]
                _gemm(Dl[r0 : r0 + b], Dl[r0:N].T, dd[:b, : N - r0], 1.0, 0.0, slots)
                _gemm(Al[n0:n1], Al[a0:m].T, aa[:b, : m - a0], 1.0, 0.0, slots)
                for i in range(b):
                    r = r0 + i
                    for k2 in range(k, K):
                        lo, c0 = (n0 + i if k2 == k else 0), k2 * m - r0  # columns c = k2 m + n, n ≥ lo
                        q, x, y = Q[r, k2 * m : (k2 + 1) * m], dd[i], aa[i]
                        # the branches outside the loops over n, so that those vectorise
                        if split:
                            t = S[r, k2 * m : (k2 + 1) * m]
                            if l == 1:
                                for n in range(lo, m):
                                    t[n] = x[c0 + n]
                                    q[n] = x[c0 + n] * y[n - a0]
                            else:
                                for n in range(lo, m):
                                    t[n] += x[c0 + n]
                                    q[n] += x[c0 + n] * y[n - a0]
                        elif l == 1:
                            for n in range(lo, m):
                                q[n] = x[c0 + n] * (one + y[n - a0])
                        else:
                            for n in range(lo, m):
                                q[n] += x[c0 + n] * (one + y[n - a0])
                d_col += n_out
                a_col += n_in


# --- the compiled training step ---------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _operand(x):
    """(trans, ld) of a row-major matrix or a transposed view of one, as column-major BLAS sees it."""
    size = x.itemsize
    if x.strides[1] == size or x.shape[1] == 1:  # row-major: BLAS sees xᵀ, no transpose needed
        return ord("n"), max(x.strides[0] // size, x.shape[1], 1)
    return ord("t"), max(x.strides[1] // size, x.shape[0], 1)


@njit(cache=True, error_model="numpy")
def _gemm(a, b, out, alpha, beta, slots):
    """out ← α a @ b + β out (β = 0: out is only written): BLAS for real layers, a loop for tiny ones.

    slots: two elements of the work vector that hold α and β for BLAS, which takes them by pointer.
    """
    m, k = a.shape
    n = b.shape[1]
    if m * k * n >= SMALL_GEMM:
        slots[0], slots[1] = alpha, beta
        tb, ldb = _operand(b)
        ta, lda = _operand(a)
        kind = ord("s") if out.itemsize == 4 else ord("d")
        # row-major out = a @ b is column-major outᵀ = bᵀ aᵀ
        status = _xxgemm(
            kind,
            tb,
            ta,
            n,
            m,
            k,
            slots[0:].ctypes,
            b.ctypes,
            ldb,
            a.ctypes,
            lda,
            slots[1:].ctypes,
            out.ctypes,
            max(out.strides[0] // out.itemsize, n, 1),
        )
        if status < 0:  # the helper could not load SciPy's BLAS: out was not written
            raise RuntimeError("BLAS ?gemm failed: numba's BLAS helper could not load scipy.linalg.cython_blas")
        return
    alpha_, beta_ = out.dtype.type(alpha), out.dtype.type(beta)
    for i in range(m):
        for j in range(n):
            total = out.dtype.type(0)
            for p in range(k):
                total += a[i, p] * b[p, j]
            if beta == 0.0:
                out[i, j] = total if alpha == 1.0 else total * alpha_
            else:
                out[i, j] = total * alpha_ + out[i, j] * beta_


@njit(cache=True, error_model="numpy")
def _colsum(d, out):
    """out = Σ_rows d, row after row."""
    m, n = d.shape
    out[:] = d[0]
    for i in range(1, m):
        for j in range(n):
            out[j] += d[i, j]


@njit(cache=True, error_model="numpy", inline="always")
def _sgd_layer(a_in, delta, wt, b, row, lr, decay, slots):
    """SGD on one layer, the weight gradient a_inᵀ δ + decay Wᵀ folded into one BLAS call:
    Wᵀ ← (1 − lr decay) Wᵀ − lr a_inᵀ δ ;  b ← b − lr Σ_n δ_n  (row: scratch for the sum)."""
    _colsum(delta, row)
    _gemm(a_in.T, delta, wt, -lr, 1.0 - lr * decay, slots)
    step = b.dtype.type(lr)
    for j in range(b.shape[0]):
        b[j] = b[j] - row[j] * step


@njit(cache=True, error_model="numpy", inline="always")
def _momentum_layer(a_in, delta, wt, b, vt, vb, row, lr, mu, decay, slots):
    """Momentum on one layer, the product folded into the velocity:
    Vᵀ ← μ Vᵀ − lr a_inᵀ δ − lr decay Wᵀ ;  Wᵀ ← Wᵀ + Vᵀ ;  the same for b, with no decay."""
    _colsum(delta, row)
    _gemm(a_in.T, delta, vt, -lr, mu, slots)
    step, mu_, shrink = b.dtype.type(lr), b.dtype.type(mu), b.dtype.type(lr * decay)
    for i in range(wt.shape[0]):
        for j in range(wt.shape[1]):
            if decay != 0.0:
                vt[i, j] = vt[i, j] - wt[i, j] * shrink
            wt[i, j] = wt[i, j] + vt[i, j]
    for j in range(b.shape[0]):
        vb[j] = vb[j] * mu_ - row[j] * step
        b[j] = b[j] + vb[j]


@njit(cache=True, error_model="numpy")
def _weigh_rows(delta, weights):
    """δ_n ← s_n δ_n (nothing without weights)."""
    if weights is None:
        return
    for i in range(delta.shape[0]):
        s = delta.dtype.type(weights[i])
        for j in range(delta.shape[1]):
            delta[i, j] *= s


@njit(cache=True, error_model="numpy")
def _loss_and_delta(loss, output, z, a, t, c, delta, weights):
    """Σ_n J_n (float64) and δ(L) into delta: the compiled twin of losses.Loss.value_and_delta.

    weights: None, or one weight per row: Σ_n s_n J_n, and each row of δ(L) times s_n (as
    bpgpu.engine.output_delta weighs them). None is pruned at compile time: the unweighted
    step has no extra work.
    """
    if _canonical(loss, output):  # the loss from the logits; the link cancels: δ = c (a − t)
        total = _loss_sum(loss, z, t, True, weights)
        _residual(a, t, c, delta)
    else:  # δ = c ∂J/∂a ⊙ g′
        total = _loss_sum(loss, a, t, False, weights)
        _loss_grad(loss, a, t, c, delta)
        _derive(output, delta, a, delta)
    _weigh_rows(delta, weights)
    return total


@njit(cache=True, error_model="numpy")
def _view(work, start, m, n):
    return work[start : start + m * n].reshape(m, n)


@njit(cache=True, error_model="numpy")
def train_step(X, T, w, grad, work, plan, loss, mean, alpha, rule, lr, mu, velocity, weights=None):
    """Forward, backprop and the update ``rule``; returns the batch loss (with the L2 term).

    plan (3, L + 1) int64, one column per layer l = 0..L: row SIZE n_l, row
    OFFSET where Θ(l + 1) starts in w (Θ column-major: the bias, then Wᵀ
    (n_l, n_{l+1})), row CODE the activation of layer l (column 0 unused).
    alpha: the L2 weight (0 for none); rule: GRADIENT_ONLY or NESTEROV (the
    gradient, with the L2 term, is written to grad) or SGD or MOMENTUM (fused,
    grad is not touched), with lr, mu and the velocity vector (any vector for SGD).
    The loss is c Σ_n J_n + (alpha c / 2) ‖W‖², c = 1/m (mean) or 1 (sum); with
    ``weights`` (one per row of X) c Σ_n s_n J_n with c = 1/Σ s (mean; 0 when every
    weight is 0) or 1, and δ(L) rows times s_n, as MLP.weighting defines them.
    """
    sizes, offsets, codes = plan[SIZE], plan[OFFSET], plan[CODE]
    dt = w.dtype.type
    m, L = X.shape[0], sizes.shape[0] - 1
    total_weight = float(m)
    if weights is not None:
        total_weight = 0.0
        for i in range(m):
            total_weight += weights[i]
    scale = (1.0 / total_weight if total_weight > 0.0 else 0.0) if mean else 1.0  # the reduction factor c
    c = dt(scale)
    decay = dt(alpha * scale)
    total_units, widest = 0, 0
    for l in range(1, L + 1):
        total_units += sizes[l]
        widest = max(widest, sizes[l])
    d_start = m * total_units  # work = [a(1)..a(L) | δ(1)..δ(L) | z(L) | a row | α, β]
    z_out = _view(work, 2 * d_start, m, sizes[L])
    row_start = 2 * d_start + m * sizes[L]
    slots = work[row_start + widest : row_start + widest + 2]

    a_prev = forward_pass(X, w, plan, work, z_out, slots)
    start = d_start - m * sizes[L]  # a(L)
    total = _loss_and_delta(loss, codes[L], z_out, a_prev, T, c, _view(work, d_start + start, m, sizes[L]), weights)
    squares = 0.0
    for l in range(L, 0, -1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        wt = w[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out)
        delta = _view(work, d_start + start, m, n_out)
        a_in = X if l == 1 else _view(work, start - m * n_in, m, n_in)
        if alpha != 0.0:  # L2 on the weights only: J += (alpha c / 2) ‖W‖², before W changes
            for i in range(n_in):
                for j in range(n_out):
                    squares += wt[i, j] * wt[i, j]
        if l > 1:  # δ(l − 1) = (δ(l) W(l)) ⊙ g′, while W(l) still holds the forward pass's weights
            s = _view(work, d_start + start - m * n_in, m, n_in)
            _gemm(delta, wt.T, s, 1.0, 0.0, slots)
        if rule == SGD:
            _sgd_layer(a_in, delta, wt, w[off : off + n_out], work[row_start : row_start + n_out], lr, decay, slots)
        elif rule == MOMENTUM:
            _momentum_layer(
                a_in,
                delta,
                wt,
                w[off : off + n_out],
                velocity[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out),
                velocity[off : off + n_out],
                work[row_start : row_start + n_out],
                lr,
                mu,
                decay,
                slots,
            )
        else:  # the gradient: ∂J/∂Wᵀ = a_inᵀ δ (+ alpha c Wᵀ), ∂J/∂b = Σ_n δ_n
            gt = grad[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out)
            _gemm(a_in.T, delta, gt, 1.0, 0.0, slots)
            _colsum(delta, grad[off : off + n_out])
            if alpha != 0.0:
                for i in range(n_in):
                    for j in range(n_out):
                        gt[i, j] = gt[i, j] + wt[i, j] * decay
        if l > 1:
            _derive(codes[l - 1], s, a_in, s)
            start -= m * n_in

    if rule == NESTEROV:
        _momentum(w, grad, velocity, lr, mu, True)  # one pass after backprop: the new w needs lr g and the new v
    return total * scale + 0.5 * alpha * scale * squares


# --- the R-operator: Hessian-vector products and the exact Hessian ----------------------------
# Pearlmutter's R{f} = d/dr f(w + r v) at r = 0 on every line of the passes (bpgpu.engine.r_pass is
# the array-API twin), for a stack of K directions at once:
#
#   R{z(l)} = R{A(l−1)} Wᵀ(l) + A(l−1) Vᵀ_W(l) + v_b(l),  R{A(l)} = g′ ⊙ R{z(l)}      (R{A(0)} = 0)
#   R{δ(L)} = coef ⊙ R{z(L)} for an elementwise output: coef = c g′ (canonical pair),
#             c ℓ″ g′² + r g″ otherwise (r = c ∂ℓ/∂a); softmax: c R{a} (cross-entropy) or
#             J_gᵀ(c ℓ″ ⊙ R{a}) + R{a} ⊙ (r − aᵀr) − a (R{a}ᵀ r)
#   R{δ(l)} = R{s(l)} ⊙ g′ + (s(l) ⊙ g″) ⊙ R{z(l)},  R{s(l)} = R{δ(l+1)} W(l+1) + δ(l+1) V_W(l+1)
#   rows of H v:  R{∂J/∂Wᵀ(l)} = A(l−1)ᵀ R{δ(l)} + R{A(l−1)}ᵀ δ(l),  R{∂J/∂b(l)} = Σ_n R{δ_n(l)}
#
# Stacks are (m, K, n_l): row n holds sample n of every direction, so A(l−1)ᵀ R{δ(l)} is one
# GEMM (n_{l−1} × m) (m × K n_l), R{A(l−1)}ᵀ δ(l) one GEMM (K n_{l−1} × m) (m × n_l), and the
# products with W(l) one GEMM over all m K rows.
#
# The exact Hessian needs the R-pass of every unit vector, but per sample n the R-pass is linear
# in R{z_n(l′)}, and the direction of θ_j′i′ of layer l′ (i′ = 0 the bias) starts it at
# R{z_n(l′)} = ã_n,i′ e_j′ with ã = [1, A(l′−1)]: every R-quantity of that direction is ã_n,i′
# times the same quantity of the bias direction b_j′. So only the n_l′ bias directions of each
# layer l′ are R-passed (from l′ up: R{z(l)} = 0 below it; R{z(l′)} = e_j′ is a placement and
# R{z(l′+1)} = R{A(l′)} Wᵀ(l′+1) is rank 1), keeping R{δ(l)} and R{A(l)} for every l ≥ l′, and
#
#   H[θ_j′i′(l′), θ_ji(l)] = Σ_n ã_n,i′ G_j′[n, θ_ji(l)],
#   G_j′[n, θ_ji(l)] = ã_n,i(l−1) R{δ_n,j(l)} + R{A_n,i−1(l−1)} δ_n,j(l)   (l > l′, i ≥ 1 for the second term)
#
# for every l ≥ l′ at once: one GEMM A(l′−1)ᵀ G_j′ (n_l′−1 × m) (m × the columns from l′ on) per
# j′, written straight into H's rows (j′ + n_l′ (i′ + 1)), and the bias row Σ_n G_j′. The rows of
# later layers' columns before l′ are not formed: H is symmetric, and its upper triangle is
# mirrored at the end (so H is exactly symmetric); in the diagonal block of l′ a slice's GEMM
# forms only the rows ĩ′ that meet its columns on or above the diagonal. All of H's flops are in
# those GEMMs, about m W²/2 multiply-adds (:func:`hessian_gemm_macs`). Large calls form the rows of
# disjoint ranges of units j′ on several threads (:func:`exact_hessian_part`), then mirror.
#
# Work vectors: the primal pass A(l), δ(l), s(l) ⊙ g″ (or the output's coef), z(L), c ℓ″
# (softmax output) for l = 1..L; then R{z(l)} (R{δ(l)} in place) and R{A(l)} as (m, K, n_l)
# stacks; for H v the two gradient products (K, n_l−1, n_l), (n_l−1, K, n_l) and the bias sums
# (K, n_l); for H the stack R{s} and G_j′ (m, W); last BLAS's α, β.


@njit(cache=True, error_model="numpy", inline="always")
def _widest(sizes):
    """(max_l n_l, max_l n_{l−1} n_l) over the layers l = 1..L."""
    units, product = 0, 0
    for l in range(1, sizes.shape[0]):
        units = max(units, sizes[l])
        product = max(product, sizes[l - 1] * sizes[l])
    return units, product


@njit(cache=True, error_model="numpy", inline="always")
def _stacks_end(plan, m, K):
    """Where the R-pass's stacks end in a work vector: the primal pass, then R{z(l)}, R{A(l)}."""
    sizes = plan[SIZE]
    L = sizes.shape[0] - 1
    units = layer_start(plan, L + 1, 1)
    return m * (3 * units + 2 * sizes[L]) + 2 * m * K * units


@njit(cache=True, error_model="numpy")
def curvature_work_length(plan, m, K):
    """Length of the work vector of :func:`hessian_vector_products` for K directions and batch size m."""
    widest, product = _widest(plan[SIZE])
    return _stacks_end(plan, m, K) + 2 * K * product + K * widest + 2


@njit(cache=True, error_model="numpy")
def _stack(work, start, m, K, n):
    return work[start : start + m * K * n].reshape(m, K, n)


@njit(cache=True, error_model="numpy", inline="always")
def _wt(w, plan, l):
    """Wᵀ(l), (n_{l−1}, n_l), a view of the flat vector (any vector in the params layout)."""
    n_in, n_out, off = plan[SIZE, l - 1], plan[SIZE, l], plan[OFFSET, l - 1]
    return w[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out)


@njit(cache=True, error_model="numpy")
def _output_coefficients(loss, output, a, t, c, coef, curv):
    """What R{δ(L)} needs from the primal pass: coef (m, n_L) with R{δ(L)} = coef ⊙ R{z(L)} for an
    elementwise output; softmax: coef = r = c ∂ℓ/∂a and curv = c ℓ″ (both unused for cross-entropy)."""
    one, slope, tiny, below_one = _constants(a)
    c_ = a.dtype.type(c)
    canonical = _canonical(loss, output)
    if output == SOFTMAX:
        if not canonical:
            _loss_grad(loss, a, t, c, coef)
            for i in range(a.shape[0]):
                for j in range(a.shape[1]):
                    curv[i, j] = loss_curvature(loss, a[i, j], t[i, j], one, tiny, below_one) * c_
        return
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            d = g1(output, a[i, j], one, slope)
            if canonical:  # δ(L) = c (a − t): R{δ(L)} = c R{a}
                coef[i, j] = c_ * d
            else:  # δ(L) = g′ ⊙ r: R{δ(L)} = g′ ⊙ (c ℓ″ ⊙ R{a}) + r ⊙ g″ ⊙ R{z}
                r = loss_grad(loss, a[i, j], t[i, j], one, tiny, below_one) * c_
                curv_ = loss_curvature(loss, a[i, j], t[i, j], one, tiny, below_one) * c_
                coef[i, j] = d * curv_ * d + r * g2(output, a[i, j], one)


@njit(cache=True, error_model="numpy")
def _primal(X, T, w, work, plan, loss, c):
    """Forward pass and backprop at w for the R-passes: A(l), δ(l), s(l) ⊙ g″_l (hidden l) and the
    output's coefficients into the work vector (no gradient products)."""
    sizes, codes = plan[SIZE], plan[CODE]
    m, L = X.shape[0], sizes.shape[0] - 1
    units = layer_start(plan, L + 1, 1)
    slots = work[work.shape[0] - 2 :]
    z_out = _view(work, 3 * m * units, m, sizes[L])
    a_prev = forward_pass(X, w, plan, work, z_out, slots)  # A(l) at layer_start(plan, l, m)
    at = m * layer_start(plan, L, 1)
    _loss_and_delta(loss, codes[L], z_out, a_prev, T, c, _view(work, m * units + at, m, sizes[L]), None)
    _output_coefficients(
        loss,
        codes[L],
        a_prev,
        T,
        c,
        _view(work, 2 * m * units + at, m, sizes[L]),
        _view(work, 3 * m * units + m * sizes[L], m, sizes[L]),
    )
    for l in range(L, 1, -1):
        at = m * layer_start(plan, l - 1, 1)
        a = _view(work, at, m, sizes[l - 1])
        s = _view(work, 2 * m * units + at, m, sizes[l - 1])
        _gemm(_view(work, m * units + m * layer_start(plan, l, 1), m, sizes[l]), _wt(w, plan, l).T, s, 1.0, 0.0, slots)
        _derive(codes[l - 1], s, a, _view(work, m * units + at, m, sizes[l - 1]))
        if codes[l - 1] == TANH:  # the code as a constant: a loop LLVM vectorizes (as in _activate)
            _times_g2_loop(TANH, s, a)
        else:
            _times_g2_loop(codes[l - 1], s, a)


@njit(cache=True, error_model="numpy", inline="always")
def _times_g2_loop(code, s, a):
    """s ← s ⊙ g″(z) through a = g(z), in place."""
    one = a.dtype.type(1)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = s[i, j] * g2(code, a[i, j], one)


@njit(cache=True, error_model="numpy")
def _r_activate(code, rz, a, ra):
    """R{A} = g′ ⊙ R{z} for a stack (m, K, n), R{z} kept (softmax: J_g R{z} per row)."""
    m, K, n = rz.shape
    ra[:] = rz
    times_g1_rows(code, ra.reshape(m * K, n), a, K, True)


@njit(cache=True, error_model="numpy")
def _r_output_delta(loss, output, rz, ra, a, coef, curv, c):
    """R{δ(L)} into rz (it held R{z(L)}); ra: R{a(L)} (softmax only)."""
    K = rz.shape[1]
    if output != SOFTMAX:
        for n in range(rz.shape[0]):
            for k in range(K):
                for j in range(rz.shape[2]):
                    rz[n, k, j] = coef[n, j] * rz[n, k, j]
        return
    c_ = a.dtype.type(c)
    canonical = _canonical(loss, output)
    for n in range(rz.shape[0]):
        if canonical:  # δ(L) = c (a − t)
            for k in range(K):
                for j in range(rz.shape[2]):
                    rz[n, k, j] = ra[n, k, j] * c_
            continue
        ar = a.dtype.type(0)
        for j in range(rz.shape[2]):
            ar += a[n, j] * coef[n, j]
        for k in range(K):
            rar = a.dtype.type(0)
            for j in range(rz.shape[2]):
                rz[n, k, j] = curv[n, j] * ra[n, k, j]
                rar += ra[n, k, j] * coef[n, j]
            _softmax_times(rz[n, k], a[n], rz[n, k])
            for j in range(rz.shape[2]):
                rz[n, k, j] += ra[n, k, j] * (coef[n, j] - ar) - a[n, j] * rar


@njit(cache=True, error_model="numpy")
def _r_block(X, w, V, out, work, plan, loss, c, first, K, lo):
    """The R-pass of K directions after :func:`_primal` on the same work vector: with V (K, W)
    its rows from layer first = 1, H vᵣ written into the rows of ``out`` (K, W) (lo = 0); with V
    None the bias directions b_lo .. b_lo+K−1 of layer ``first``, whose R{δ(l)} stay in R{z(l)}'s
    stack and R{A(l)} in its own for every l ≥ first, direction b_lo+k at index k (``out`` is not
    written)."""
    sizes, offsets, codes = plan[SIZE], plan[OFFSET], plan[CODE]
    m, L = X.shape[0], sizes.shape[0] - 1
    units = layer_start(plan, L + 1, 1)
    slots = work[work.shape[0] - 2 :]
    base = m * (3 * units + 2 * sizes[L])
    _, widest = _widest(sizes)
    products = _stacks_end(plan, m, K)
    t1 = work[products : products + K * widest]
    t2 = work[products + K * widest : products + 2 * K * widest]
    bias = work[products + 2 * K * widest : work.shape[0] - 2]
    unit = V is None
    one = w.dtype.type(1)
    zero = one - one

    # the forward R-pass, l = first..L (the loops over directions run inside the loops over
    # samples: a stack's rows n are far apart)
    ra_prev = _stack(work, base, m, K, 1)  # R{A(first − 1)} = 0: not read
    for l in range(first, L + 1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        a_prev = X if l == 1 else _view(work, m * layer_start(plan, l - 1, 1), m, n_in)
        rz = _stack(work, base + m * K * layer_start(plan, l, 1), m, K, n_out)
        ra = _stack(work, base + m * K * (units + layer_start(plan, l, 1)), m, K, n_out)
        wt = _wt(w, plan, l)
        if unit and l == first:  # R{z}[n, k] = e_k: a placement
            rz[:] = zero
            for n in range(m):
                for k in range(K):
                    rz[n, k, lo + k] = one
        elif unit and l == first + 1:  # rank 1: R{z}[n, k, :] = R{A}[n, k, k] Wᵀ[k, :]
            for n in range(m):
                for k in range(K):
                    x = ra_prev[n, k, lo + k]
                    for q in range(n_out):
                        rz[n, k, q] = x * wt[lo + k, q]
        else:
            if l > first:
                _gemm(ra_prev.reshape(m * K, n_in), wt, rz.reshape(m * K, n_out), 1.0, 0.0, slots)
            if not unit:
                for k in range(K):
                    _gemm(a_prev, _wt(V[k], plan, l), rz[:, k, :], 1.0, 1.0 if l > first else 0.0, slots)
                    vb = V[k, off : off + n_out]
                    for n in range(m):  # through row views: V[k, off + q] kept numba's negative-index wrap
                        row = rz[n, k]
                        for q in range(n_out):
                            row[q] += vb[q]
        if l < L or codes[L] == SOFTMAX:
            _r_activate(codes[l], rz, _view(work, m * layer_start(plan, l, 1), m, n_out), ra)
        ra_prev = ra

    # the backward R-pass, l = L..first
    at = m * layer_start(plan, L, 1)
    _r_output_delta(
        loss,
        codes[L],
        _stack(work, base + m * K * layer_start(plan, L, 1), m, K, sizes[L]),
        _stack(work, base + m * K * (units + layer_start(plan, L, 1)), m, K, sizes[L]),
        _view(work, at, m, sizes[L]),
        _view(work, 2 * m * units + at, m, sizes[L]),
        _view(work, 3 * m * units + m * sizes[L], m, sizes[L]),
        c,
    )
    for l in range(L, first - 1, -1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        delta = _view(work, m * units + m * layer_start(plan, l, 1), m, n_out)
        rd = _stack(work, base + m * K * layer_start(plan, l, 1), m, K, n_out)  # R{δ(l)}
        ra_prev = _stack(work, base + m * K * (units + layer_start(plan, l - 1, 1)), m, K, n_in if l > first else 1)
        if not unit:  # the rows of H v for layer l
            a_prev = X if l == 1 else _view(work, m * layer_start(plan, l - 1, 1), m, n_in)
            # one direction: both products have the layout of Wᵀ(l)'s rows of H v, so they go straight
            # into out (the second with β = 1), with no scratch and no pass adding them (NOTES "P4")
            direct = K == 1
            t2_ = _wt(out[0], plan, l) if direct else t2[: n_in * K * n_out].reshape(n_in, K * n_out)
            _gemm(a_prev.T, rd.reshape(m, K * n_out), t2_, 1.0, 0.0, slots)
            if l > first:
                t1_ = t2_ if direct else t1[: K * n_in * n_out].reshape(K * n_in, n_out)
                _gemm(ra_prev.reshape(m, K * n_in).T, delta, t1_, 1.0, 1.0 if direct else 0.0, slots)
            bias[: K * n_out] = zero
            sums = bias[: K * n_out].reshape(K, n_out)
            for n in range(m):  # Σ_n R{δ_n(l)}, sample after sample, through row views (as above)
                for k in range(K):
                    total, row = sums[k], rd[n, k]
                    for q in range(n_out):
                        total[q] += row[q]
            for k in range(K):
                row = out[k]
                for q in range(n_out):
                    row[off + q] = bias[k * n_out + q]
                for i in range(0 if direct else n_in):
                    at = off + n_out + i * n_out
                    for q in range(n_out):
                        x = t2[(i * K + k) * n_out + q]
                        row[at + q] = x + t1[(k * n_in + i) * n_out + q] if l > first else x
        if l > first:  # R{δ(l−1)} = R{s} ⊙ g′ + (s ⊙ g″) ⊙ R{z(l−1)}
            rs = _stack(work, products, m, K, n_in) if unit else ra_prev  # H keeps R{A(l−1)}
            _gemm(rd.reshape(m * K, n_out), _wt(w, plan, l).T, rs.reshape(m * K, n_in), 1.0, 0.0, slots)
            if not unit:
                for k in range(K):
                    _gemm(delta, _wt(V[k], plan, l).T, rs[:, k, :], 1.0, 1.0, slots)
            at = m * layer_start(plan, l - 1, 1)
            a = _view(work, at, m, n_in)
            s2 = _view(work, 2 * m * units + at, m, n_in)
            rz = _stack(work, base + m * K * layer_start(plan, l - 1, 1), m, K, n_in)
            if codes[l - 1] == TANH:  # the code as a constant: a loop LLVM vectorizes (as in _activate)
                _r_delta_loop(TANH, rs, a, s2, rz)
            else:
                _r_delta_loop(codes[l - 1], rs, a, s2, rz)


@njit(cache=True, error_model="numpy", inline="always")
def _r_delta_loop(code, rs, a, s2, rz):
    """R{δ(l)} = R{s} ⊙ g′ + (s ⊙ g″) ⊙ R{z(l)} into rz (it holds R{z(l)}), stacks (m, K, n), g′ through a."""
    m, K, n = rz.shape
    one, slope, _, _ = _constants(a)
    for i in range(m):
        for k in range(K):
            for j in range(n):
                rz[i, k, j] = rs[i, k, j] * g1(code, a[i, j], one, slope) + s2[i, j] * rz[i, k, j]


@njit(cache=True, error_model="numpy")
def _scale(mean, m):
    return 1.0 / m if mean else 1.0


@njit(cache=True, error_model="numpy", nogil=True)  # run on sample blocks in threads (jit.py)
def hessian_vector_products(X, T, w, V, out, work, plan, loss, c):
    """out (K, W) ← H vᵣ for every row vᵣ of V (K, W): one forward pass, backprop and the R-pass
    of all K directions. work: :func:`curvature_work_length` (plan, m, K) elements; plan as for
    :func:`train_step`; J = c Σ_n J_n (c = 1/m for the mean over a batch of m, 1 for the sum: X may
    be one block of that batch, whose H V is then the block's share of the sum)."""
    _primal(X, T, w, work, plan, loss, c)
    _r_block(X, w, V, out, work, plan, loss, c, 1, V.shape[0], 0)


# An H of this many bytes or more is far larger than the caches, so its mirror writes go past them:
# a non-temporal store needs no read of the line before the write (NOTES "H8", "H14"). A small H
# stays with plain stores (in cache, and its runs shorter than a line: H8 measured 18× slower).
HESSIAN_STREAM_BYTES = 1 << 25


_LINE = 64  # bytes of a cache line


def _store_nontemporal(context, builder, rowty, row, j, value, align):
    """The LLVM of row[j] ← value (a scalar, or a vector of the entries from row[j] on) marked
    ``!nontemporal`` (LLVM's movnt on x86-64, a plain store where the target has none)."""
    ary = context.make_array(rowty)(context, builder, row)
    ptr = cgutils.get_item_pointer(context, builder, rowty, ary, [j], wraparound=False, boundscheck=False)
    store = builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=align)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


@intrinsic
def _stream(typingctx, row, j, x):
    """row[j] ← x by a non-temporal store. Such stores are weakly ordered: :func:`_store_fence`
    after the last."""

    def codegen(context, builder, sig, args):
        _store_nontemporal(context, builder, sig.args[0], args[0], args[1], args[2], sig.args[0].dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(row, j, row.dtype), codegen


@intrinsic
def _stream_line(typingctx, row, j, H, i, c):
    """row[j + k] ← H[i + k, c] for k < 64 / itemsize: one cache line, gathered from a column of
    H and written by one non-temporal vector store (a 64-byte aligned &row[j], which the caller
    ensures). The column gathered and stored entry by entry took 1.5–2× as long (NOTES "H17")."""

    def codegen(context, builder, sig, args):
        hty, i, c = sig.args[2], args[3], args[4]
        elt = context.get_data_type(hty.dtype)
        line = ir.Constant(ir.VectorType(elt, _LINE // context.get_abi_sizeof(elt)), ir.Undefined)
        src = context.make_array(hty)(context, builder, args[2])
        for k in range(line.type.count):
            at = [builder.add(i, ir.Constant(i.type, k)), c]
            ptr = cgutils.get_item_pointer(context, builder, hty, src, at, wraparound=False, boundscheck=False)
            line = builder.insert_element(line, builder.load(ptr), ir.Constant(ir.IntType(32), k))
        _store_nontemporal(context, builder, sig.args[0], args[0], args[1], line, _LINE)
        return context.get_dummy_value()

    return types.void(row, j, H, i, c), codegen


@intrinsic
def _store_fence(typingctx):
    """A full fence: every earlier store (non-temporal ones too) is visible before any later one."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, error_model="numpy", nogil=True)  # the parts run on Python threads (jit.py)
def hessian_mirror(H, part, parts):
    """H[j, i] ← H[i, j] for every i < j, tile by tile (so the strided accesses stay in cache):
    the tile rows t ≡ part (mod parts), so that ``parts`` calls at once mirror all of H. A tile's
    rows are 512 bytes (64 float64, 128 float32: measured, NOTES "H3"; 32 or 16 were slower). An H
    of HESSIAN_STREAM_BYTES or more is written by non-temporal stores in runs along its rows of a
    tile of 2 KiB of rows (NOTES "H17"), whole cache lines at a time (:func:`_stream_line`)."""
    W = H.shape[0]
    tile = 512 // H.itemsize
    if H.size * H.itemsize < HESSIAN_STREAM_BYTES:
        for i0 in range(part * tile, W, parts * tile):
            for j0 in range(i0, W, tile):
                for i in range(i0, min(i0 + tile, W)):
                    row = H[i]
                    for j in range(max(j0, i + 1), min(j0 + tile, W)):
                        H[j, i] = row[j]
        return
    size = H.itemsize
    tile, line, start = 2048 // size, _LINE // size, H.ctypes.data  # tiles of 2 KiB of rows
    for i0 in range(part * tile, W, parts * tile):
        i1 = min(i0 + tile, W)
        for j in range(i0 + 1, W):  # row j's run of the tile's columns i0 ≤ i < min(i1, j)
            dst, end, i = H[j], min(i1, j), i0
            while i < end and (start + (j * W + i) * size) % _LINE != 0:  # up to a line's start
                _stream(dst, i, H[i, j])
                i += 1
            while i + line <= end:
                _stream_line(dst, i, H, i, j)
                i += line
            while i < end:
                _stream(dst, i, H[i, j])
                i += 1
    _store_fence()


# Columns of G_j′ formed and multiplied at a time, so that the slice (m, ≤ HESSIAN_COLUMNS) is
# still in cache for its GEMM: (128, 1024) float64 is 1 MiB, this machine's L2 per core. Measured
# (NOTES "H3"): 1024–2048 columns are best, 512 and 4096 are 5–15% slower.
HESSIAN_COLUMNS = 1024
DIAGONAL_SPLIT = 4  # measured (NOTES "H4"): 1, 2, 4 gave 6.28, 5.87, 5.67 GFLOP at [32,64,64,4] m = 128, 4 the fastest


# The blocks of Θ(l′) with itself and with Θ(l′ + 1) as GEMMs over pairs of inputs (NOTES "H13"):
# there, G_j′'s first term factors as ã_n,ĩ′ ã_n,ĩ(l) R{δ_n,j(l)}, and the second vanishes (l = l′)
# or, since R{A(l′)} of the bias direction b_j′ is g′ ⊙ e_j′ (hidden activations are elementwise),
# is nonzero at input i = j′ only (l = l′ + 1). So, with P[n, (ĩ′, ĩ)] = ã_n,ĩ′ ã_n,ĩ(l) over the
# pairs (ĩ′ ≤ ĩ in the diagonal block, where H's symmetry gives the rest: the mirror),
#
#   H[θ_j′ĩ′(l′), θ_jĩ(l)] = (Pᵀ R{δ(l)})[(ĩ′, ĩ), (j′, j)] + [l = l′ + 1, ĩ = j′ + 1] (ãᵀ F)[ĩ′, (j′, j)],
#   F[n, (j′, j)] = R{A_n,j′(l′)} δ_n,j(l′ + 1),
#
# with R{δ(l)} the bias directions' stack (m, n_l′ n_l) as it lies. One GEMM then serves all of a
# group of HESSIAN_UNITS units j′ and a tile of pairs: the per-unit G_j′ (each entry used n_l′−1 + 1
# times, and packed by BLAS for each GEMM) is not formed for these blocks. A tile's products O
# (≤ HESSIAN_TILE entries: 1 MiB float64, in L2) are copied to H row by row: the pairs run ĩ
# fastest (:func:`_pair_run`), so one ĩ′'s consecutive ĩ fill a contiguous stretch of H's row
# (j′, ĩ′), and P is formed by the same runs, ã_n,ĩ′ times a slice of ã_n(l) (NOTES "H20").
HESSIAN_PAIRED = 16  # a block is paired when its layer l has this many units (runs of ≥ 16 entries)
HESSIAN_UNITS = 16  # units j′ per pair GEMM; parts split paired layers in whole groups
HESSIAN_TILE = 131072  # entries of a pair tile's O: pairs per tile HESSIAN_TILE // (HESSIAN_UNITS n_l)
_PAIRS_LEAST = 16
_PAIRS_MOST = HESSIAN_TILE // (HESSIAN_UNITS * HESSIAN_PAIRED)


@njit(cache=True, error_model="numpy", inline="always")
def _paired(sizes, first, l):
    """Whether the block of Θ(first) and Θ(l) is formed by :func:`_pair_block`: l = first or
    first + 1 (False for an l past the output layer), and layer l has HESSIAN_PAIRED units or more."""
    return (l == first or l == first + 1) and l < sizes.shape[0] and sizes[l] >= HESSIAN_PAIRED


@njit(cache=True, error_model="numpy", inline="always")
def _pair_tile(n_out):
    """Pairs per tile of a paired block whose column layer has n_out units."""
    return max(_PAIRS_LEAST, HESSIAN_TILE // (HESSIAN_UNITS * n_out))


@njit(cache=True, error_model="numpy", inline="always")
def _pair_count(inputs, next_inputs, diagonal):
    return inputs * (inputs + 1) // 2 if diagonal else inputs * next_inputs


@njit(cache=True, error_model="numpy", inline="always")
def _pair_run(i_, c_, left, diagonal, next_inputs):
    """The run of pairs from (ĩ′, ĩ) = (i_, c_) in a paired block's order (ĩ fastest: from ĩ′ on in
    the diagonal block, its upper triangle, from 0 in the adjacent one; so a run is one ĩ′ and
    consecutive ĩ, a contiguous stretch of each of its H rows), at most ``left`` long: its length
    and the pair after it."""
    run = min(left, next_inputs - c_)
    if c_ + run < next_inputs:
        return run, i_, c_ + run
    return run, i_ + 1, i_ + 1 if diagonal else 0


@njit(cache=True, error_model="numpy", inline="always")
def _units_of_part(sizes, first, part, parts):
    """The units j′ of layer ``first`` that part ``part`` of ``parts`` forms: a contiguous range,
    in whole groups of HESSIAN_UNITS where a block of the layer is paired (so that every part's
    pair GEMMs are the one call's, and H the same bitwise)."""
    K = sizes[first]
    if _paired(sizes, first, first) or _paired(sizes, first, first + 1):
        groups = (K + HESSIAN_UNITS - 1) // HESSIAN_UNITS
        lo = HESSIAN_UNITS * (groups * part // parts)
        return lo, min(K, HESSIAN_UNITS * (groups * (part + 1) // parts))
    return K * part // parts, K * (part + 1) // parts


@njit(cache=True, error_model="numpy")
def _pair_block(a1, a2, H, work, plan, first, l, lo, hi):
    """H's block of Θ(first)'s rows of the units lo ≤ j′ < hi (a whole number of groups) and Θ(l)'s
    columns, l = first or first + 1, by pair GEMMs (see above). a1: ã (m, n_first−1 + 1); a2: ã(l) =
    [1, A(l − 1)] (m, n_l−1 + 1), a1 itself for the diagonal block."""
    sizes, offsets = plan[SIZE], plan[OFFSET]
    m, L = a1.shape[0], sizes.shape[0] - 1
    units = layer_start(plan, L + 1, 1)
    K, N = sizes[first], sizes[l]
    diagonal = l == first
    base = m * (3 * units + 2 * sizes[L])
    slots = work[work.shape[0] - 2 :]
    regions = _hessian_buffers(plan, m)
    D = hi - lo  # the stacks hold the R-pass of b_lo .. b_hi−1 (_r_block), direction j′ at j′ − lo
    rd = work[base + m * D * layer_start(plan, l, 1) : base + m * D * layer_start(plan, l + 1, 1)].reshape(m, D * N)
    inputs, next_inputs = a1.shape[1], a2.shape[1]
    count = _pair_count(inputs, next_inputs, diagonal)
    tile = min(count, _pair_tile(N))
    row0, col0 = offsets[first - 1], offsets[l - 1]
    P_all = work[regions[4] : regions[4] + m * tile].reshape(m, tile)
    out = work[regions[5] : regions[6]]
    i_start, c_start = 0, 0  # the pair (ĩ′, ĩ) at the tile's start
    for p0 in range(0, count, tile):
        p1 = min(p0 + tile, count)
        pairs = p1 - p0
        P = P_all[:, :pairs]
        for n in range(m):
            P_n, a2_n, i_, c_, p = P[n], a2[n], i_start, c_start, 0
            while p < pairs:
                run, i_next, c_next = _pair_run(i_, c_, pairs - p, diagonal, next_inputs)
                x, P_run = a1[n, i_], P_n[p : p + run]
                for k in range(run):
                    P_run[k] = x * a2_n[c_ + k]
                p, i_, c_ = p + run, i_next, c_next
        for u0 in range(lo, hi, HESSIAN_UNITS):
            u1 = min(u0 + HESSIAN_UNITS, hi)
            width = (u1 - u0) * N
            O = out[: pairs * width].reshape(pairs, width)
            _gemm(P.T, rd[:, (u0 - lo) * N : (u1 - lo) * N], O, 1.0, 0.0, slots)
            for j_ in range(u0, u1):  # each run's products are one stretch of H's row (j′, ĩ′)
                i_, c_, p = i_start, c_start, 0
                while p < pairs:
                    run, i_next, c_next = _pair_run(i_, c_, pairs - p, diagonal, next_inputs)
                    dst = H[row0 + j_ + K * i_, col0 + N * c_ : col0 + N * (c_ + run)]
                    for k in range(run):
                        src, d = O[p + k, (j_ - u0) * N : (j_ - u0 + 1) * N], dst[k * N : (k + 1) * N]
                        for q in range(N):
                            d[q] = src[q]
                    p, i_, c_ = p + run, i_next, c_next
        i_start, c_start = i_, c_
    if diagonal:
        return
    # the second term, at input j′ of layer first: ãᵀ F, F[n, (j′, j)] = R{A_n,j′(first)} δ_n,j(l)
    delta = _view(work, m * units + m * layer_start(plan, l, 1), m, N)
    ra = _stack(work, base + m * D * (units + layer_start(plan, first, 1)), m, D, K)
    for u0 in range(lo, hi, HESSIAN_UNITS):
        u1 = min(u0 + HESSIAN_UNITS, hi)
        width = (u1 - u0) * N
        F = work[regions[6] : regions[6] + m * width].reshape(m, width)
        for n in range(m):
            delta_n, F_n = delta[n], F[n]
            for j_ in range(u0, u1):
                r, g = ra[n, j_ - lo, j_], F_n[(j_ - u0) * N : (j_ - u0 + 1) * N]
                for q in range(N):
                    g[q] = r * delta_n[q]
        E = work[regions[7] : regions[7] + inputs * width].reshape(inputs, width)
        _gemm(a1.T, F, E, 1.0, 0.0, slots)
        for i_ in range(inputs):
            E_i = E[i_]
            for j_ in range(u0, u1):
                dst = H[row0 + j_ + K * i_, col0 + N * (j_ + 1) : col0 + N * (j_ + 2)]
                src = E_i[(j_ - u0) * N : (j_ - u0 + 1) * N]
                for q in range(N):
                    dst[q] += src[q]


@njit(cache=True, error_model="numpy", inline="always")
def _hessian_buffers(plan, m):
    """Where :func:`exact_hessian`'s work vector holds (R{s} stack, ã = [1, A(first−1)] (m, ·),
    G_j′ slices, ã of the next layer, the pair products P, a pair tile's products O, the
    adjacent block's F and ãᵀ F) and where it ends, for batch size m."""
    sizes = plan[SIZE]
    widest, _ = _widest(sizes)
    start = _stacks_end(plan, m, widest)
    inputs = 0
    for l in range(sizes.shape[0] - 1):
        inputs = max(inputs, sizes[l] + 1)
    ones = start + m * widest * widest
    slices = ones + m * inputs
    next_ones = slices + m * max(HESSIAN_COLUMNS, widest)
    pairs = next_ones + m * inputs
    tile = pairs + m * _PAIRS_MOST
    f = tile + max(HESSIAN_TILE, _PAIRS_LEAST * HESSIAN_UNITS * widest)
    ft = f + m * HESSIAN_UNITS * widest
    return start, ones, slices, next_ones, pairs, tile, f, ft, ft + inputs * HESSIAN_UNITS * widest


@njit(cache=True, error_model="numpy")
def hessian_work_length(plan, m):
    """Length of the work vector of :func:`exact_hessian` (and of each part) for batch size m."""
    return _hessian_buffers(plan, m)[8] + 2


@njit(cache=True, error_model="numpy")
def _hessian_rows(a1, H, work, plan, first, j_, lo, D):
    """H's rows of unit j′ of layer ``first`` (its bias and its weights, rows j′ + n_first i′ of
    Θ(first)'s block), columns from Θ(first) on: G_j′ from the bias direction b_j′'s R-pass
    (:func:`_r_block`, V None; its stacks hold the D directions from b_lo), slice by slice, each
    slice times ã = a1 (m, n_first−1 + 1) in one GEMM."""
    sizes, offsets = plan[SIZE], plan[OFFSET]
    m, L = a1.shape[0], sizes.shape[0] - 1
    units = layer_start(plan, L + 1, 1)
    K = sizes[first]
    base = m * (3 * units + 2 * sizes[L])
    slots = work[work.shape[0] - 2 :]
    start = offsets[first - 1]
    regions = _hessian_buffers(plan, m)
    buffer = work[regions[2] : regions[3]]
    rows = H[start + j_ : offsets[first] : K]
    for l in range(first, L + 1):
        if _paired(sizes, first, l):  # formed by _pair_block
            continue
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        a_prev = a1[:, 1:] if l == first else _view(work, m * layer_start(plan, l - 1, 1), m, n_in)
        delta = _view(work, m * units + m * layer_start(plan, l, 1), m, n_out)
        rd = _stack(work, base + m * D * layer_start(plan, l, 1), m, D, n_out)
        ra = _stack(work, base + m * D * (units + layer_start(plan, l - 1, 1)), m, D, n_in if l > first else 1)
        step = _slice_step(l, first, n_out)
        for i0 in range(-1, n_in, step):  # i = −1: the bias column block
            i1 = min(i0 + step, n_in)
            width = (i1 - i0) * n_out
            G = buffer[: m * width].reshape(m, width)
            if n_out < HESSIAN_PAIRED:  # narrow: runs along i, not along q
                _narrow_slice(G, a_prev, rd, delta, ra, j_ - lo, i0, i1, l > first)
            else:
                for n in range(m):
                    # one slice of n_out columns per i: its indices are provably ≥ 0, which lets LLVM
                    # vectorize the loops (G[n, col + q] kept numba's negative-index wrap: 3× slower)
                    rd_n, delta_n, G_n = rd[n, j_ - lo], delta[n], G[n]
                    for i in range(i0, i1):
                        g = G_n[(i - i0) * n_out : (i - i0 + 1) * n_out]
                        if i < 0:
                            g[:] = rd_n
                        elif l > first:
                            x, r = a_prev[n, i], ra[n, j_ - lo, i]
                            for q in range(n_out):
                                g[q] = x * rd_n[q] + r * delta_n[q]
                        else:
                            x = a_prev[n, i]
                            for q in range(n_out):
                                g[q] = x * rd_n[q]
            col, need = off + n_out + i0 * n_out, _slice_rows(l, first, i1, a1.shape[1])
            _gemm(a1[:, :need].T, G, rows[:need, col : col + width], 1.0, 0.0, slots)


@njit(cache=True, error_model="numpy", inline="always")
def _narrow_slice(G, a_prev, rd, delta, ra, d, i0, i1, second):
    """G (m, (i1 − i0) n_out) ← the slice of G_j′ (direction d of the stacks) over the inputs
    i0 ≤ i < i1 (i = −1: the bias column block) of a layer of n_out < HESSIAN_PAIRED units, the
    same entries as :func:`_hessian_rows`' loop (its second term where ``second``), in runs along
    i of stride n_out, one per unit q: with a loop over q inside, each run was n_out < 16 entries
    long and each (n, i) paid a slice's set-up (the rows of [32,64,64,4]'s 4-unit output blocks
    took 1.6× as long, NOTES "H18")."""
    n_out = rd.shape[2]
    i_first = max(i0, 0)  # the first input after the bias column block
    for n in range(G.shape[0]):
        rd_n, delta_n, a_n, ra_n, G_n = rd[n, d], delta[n], a_prev[n], ra[n, d], G[n]
        for q in range(n_out):
            g = G_n[(i_first - i0) * n_out + q :: n_out]  # the entries (i, q), i ≥ i_first
            r, e = rd_n[q], delta_n[q]
            if i0 < 0:
                G_n[q] = r
            if second:
                for i in range(i1 - i_first):
                    g[i] = a_n[i_first + i] * r + ra_n[i_first + i] * e
            else:
                for i in range(i1 - i_first):
                    g[i] = a_n[i_first + i] * r


@njit(cache=True, error_model="numpy", inline="always")
def _slice_step(l, first, n_out):
    """Inputs i per G slice of layer l's columns: HESSIAN_COLUMNS // n_out, DIAGONAL_SPLIT times
    fewer in the diagonal block (l = first), whose GEMMs then stop closer to the diagonal (:func:`_slice_rows`)."""
    return max(1, HESSIAN_COLUMNS // n_out // (DIAGONAL_SPLIT if l == first else 1))


@njit(cache=True, error_model="numpy", inline="always")
def _slice_rows(l, first, i1, inputs):
    """How many of a unit's rows ĩ′ = 0..inputs − 1 (ã's columns) the GEMM of a G slice of layer
    l's columns up to input i1 − 1 (ã column i1) forms: all of them right of the diagonal block
    (l > first); in it (l = first) only ĩ′ ≤ i1, since the rows ĩ′ > i1 meet these columns below
    the diagonal only, where the mirror writes (this halves the diagonal blocks' GEMMs)."""
    return inputs if l > first else min(i1 + 1, inputs)


@njit(cache=True, error_model="numpy")
def hessian_gemm_macs(plan, m):
    """Multiply-adds of :func:`exact_hessian`'s GEMMs: the pair GEMMs Pᵀ R{δ(l)} and ãᵀ F of the
    paired blocks, and ãᵀ G_j′ over every unit j′ for the others (its arithmetic; the benchmark's
    measure, bpgpu.bench.derivatives.hessian_flops): about m W²/2, plus the G_j′ slices' share
    below the diagonal of an unpaired diagonal block. plan: only its SIZE row is read."""
    sizes = plan[SIZE]
    total = 0
    for first in range(1, sizes.shape[0]):
        K, inputs = sizes[first], sizes[first - 1] + 1
        for l in range(first, sizes.shape[0]):
            n_in, n_out = sizes[l - 1], sizes[l]
            if _paired(sizes, first, l):  # Pᵀ R{δ(l)} over the pairs, and the adjacent block's ãᵀ F
                total += _pair_count(inputs, n_in + 1, l == first) * m * K * n_out
                total += 0 if l == first else inputs * m * K * n_out
                continue
            step = _slice_step(l, first, n_out)
            for i0 in range(-1, n_in, step):  # the slices of _hessian_rows
                i1 = min(i0 + step, n_in)
                total += sizes[first] * _slice_rows(l, first, i1, sizes[first - 1] + 1) * m * (i1 - i0) * n_out
    return total


@njit(cache=True, error_model="numpy", nogil=True)  # the parts run on Python threads (jit.py)
def exact_hessian_part(X, T, w, H, work, plan, loss, mean, part, parts):
    """H's rows of the units j′ of every layer l′ in part ``part`` of ``parts`` (a contiguous
    range, :func:`_units_of_part`), upper triangle (the diagonal blocks' G_j′ slices may pass it)
    only; each part on its own work vector (:func:`hessian_work_length`), so ``parts`` calls at
    once form every row, and :func:`hessian_mirror` then completes H. Each part runs the primal
    pass and the R-passes of its layers' bias directions itself (a few % of its time)."""
    m = X.shape[0]
    c = _scale(mean, m)
    _primal(X, T, w, work, plan, loss, c)
    sizes = plan[SIZE]
    regions = _hessian_buffers(plan, m)
    L = sizes.shape[0] - 1
    for first in range(1, L + 1):
        K, n_in = sizes[first], sizes[first - 1]
        lo, hi = _units_of_part(sizes, first, part, parts)
        if lo == hi:
            continue
        a_prev = X if first == 1 else _view(work, m * layer_start(plan, first - 1, 1), m, n_in)
        a1 = _with_ones(a_prev, _view(work, regions[1], m, n_in + 1))  # ã = [1, A(first − 1)]
        diagonal, adjacent = _paired(sizes, first, first), _paired(sizes, first, first + 1)
        if not (diagonal or adjacent):  # all K directions at once (every part alike), its rows
            _r_block(X, w, None, H, work, plan, loss, c, first, K, 0)
            for j_ in range(lo, hi):
                _hessian_rows(a1, H, work, plan, first, j_, 0, K)
            continue
        if adjacent:
            a2 = _with_ones(_view(work, m * layer_start(plan, first, 1), m, K), _view(work, regions[3], m, K + 1))
        for g0 in range(lo, hi, HESSIAN_UNITS):  # group by group: a part's R-passes are its own
            g1 = min(g0 + HESSIAN_UNITS, hi)
            _r_block(X, w, None, H, work, plan, loss, c, first, g1 - g0, g0)
            if diagonal:
                _pair_block(a1, a1, H, work, plan, first, first, g0, g1)
            if adjacent:
                _pair_block(a1, a2, H, work, plan, first, first + 1, g0, g1)
            for j_ in range(g0, g1):
                _hessian_rows(a1, H, work, plan, first, j_, g0, g1 - g0)


@njit(cache=True, error_model="numpy", inline="always")
def _with_ones(a, out):
    """out (m, n + 1) ← [1, a]: ã of a layer's inputs a (m, n)."""
    one = a.dtype.type(1)
    for n in range(a.shape[0]):
        out[n, 0] = one
        for i in range(a.shape[1]):
            out[n, i + 1] = a[n, i]
    return out


@njit(cache=True, error_model="numpy")
def exact_hessian(X, T, w, H, work, plan, loss, mean):
    """H (W, W) ← ∂²J/∂w∂w, exactly symmetric, from the R-passes of the bias directions of every
    layer (see the section's comment), in one call. work: :func:`hessian_work_length` (plan, m) elements."""
    exact_hessian_part(X, T, w, H, work, plan, loss, mean, 0, 1)
    hessian_mirror(H, 0, 1)
