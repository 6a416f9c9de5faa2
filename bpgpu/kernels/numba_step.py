"""One training step (forward, backprop, L2 term, optimizer update) compiled by numba into one call.

Imported only by :mod:`bpgpu.kernels.jit`, and only when numba is installed.
The arithmetic is the numpy path's, operation for operation and in the same
order where it decides the rounding (bpgpu/kernels/cpu.py says why each form
was chosen): σ through tanh, softplus through logaddexp, canonical losses
from the logits, clipped probabilities elsewhere. Every scalar is cast to the
arrays' dtype first, as numpy does with a Python float, so float32 stays
float32. Only the loss sum is accumulated in float64 (numpy sums pairwise;
a float64 running sum is at least as accurate).

Buffers: the caller passes one flat ``work`` vector of length
m (2 Σ_l n_l + n_L) holding a(l), δ(l) for l = 1..L and z(L); the kernel
slices it into (m, n_l) views, so a step allocates nothing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Codes in the order of bpgpu.kernels.ACTIVATIONS and LOSSES (jit.py maps names to them).
IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, SOFTPLUS, SOFTMAX = range(7)
SQUARED_ERROR, BINARY_CROSS_ENTROPY, CROSS_ENTROPY = range(3)
GRADIENT_ONLY, SGD, MOMENTUM, NESTEROV = range(4)  # the update applied after backprop
SIZE, OFFSET, CODE = range(3)  # the rows of train_step's plan

# Below this many multiply-adds (m k n) a plain loop beats the BLAS call made
# through np.dot (measured: benchmarks/NOTES.md, "Compiled CPU step (numba)", G1).
SMALL_GEMM = 512


@njit(cache=True)
def _gemm(a, b, out):
    """out = a @ b: BLAS for real layers, an axpy loop for tiny ones."""
    m, k = a.shape
    n = b.shape[1]
    if m * k * n >= SMALL_GEMM:
        np.dot(a, b, out)
        return
    for i in range(m):
        for j in range(n):
            out[i, j] = 0
        for p in range(k):
            aip = a[i, p]
            for j in range(n):
                out[i, j] += aip * b[p, j]


@njit(cache=True)
def _colsum(d, out):
    """out = Σ_rows d, row after row as np.sum(axis=0) adds them."""
    m, n = d.shape
    out[:] = d[0]
    for i in range(1, m):
        for j in range(n):
            out[j] += d[i, j]


@njit(cache=True)
def _activate(code, z, b, out, slope):
    """z ← z + b; out = g(z) (out may be z). The forward twin of *_fwd in cpu.py."""
    m, n = z.shape
    one, half, zero = z.dtype.type(1), z.dtype.type(0.5), z.dtype.type(0)
    for i in range(m):
        for j in range(n):
            z[i, j] += b[j]
    if code == SOFTMAX:
        for i in range(m):
            top = z[i, 0]
            for j in range(1, n):
                top = max(top, z[i, j])
            total = zero
            for j in range(n):
                out[i, j] = np.exp(z[i, j] - top)
                total += out[i, j]
            for j in range(n):
                out[i, j] /= total
        return
    for i in range(m):
        for j in range(n):
            x = z[i, j]
            if code == IDENTITY:
                y = x
            elif code == SIGMOID:
                y = (np.tanh(x * half) + one) * half  # σ(z) = (1 + tanh(z/2)) / 2, overflow-free
            elif code == TANH:
                y = np.tanh(x)
            elif code == RELU:
                y = max(x, zero)
            elif code == LEAKY_RELU:
                y = max(x, x * slope)
            else:  # SOFTPLUS
                y = np.logaddexp(x, zero)
            out[i, j] = y


@njit(cache=True)
def _derive(code, s, a, slope, rest):
    """s ← s ⊙ g′(z), g′ written through a = g(z) (rest = 1 − slope). The twin of *_bwd in cpu.py."""
    m, n = s.shape
    one, zero = s.dtype.type(1), s.dtype.type(0)
    if code == SOFTMAX:  # δ = a ⊙ (s − Σ_k s_k a_k)
        for i in range(m):
            dot = zero
            for j in range(n):
                dot += s[i, j] * a[i, j]
            for j in range(n):
                s[i, j] = (s[i, j] - dot) * a[i, j]
        return
    if code == IDENTITY:
        return
    for i in range(m):
        for j in range(n):
            x = a[i, j]
            if code == SIGMOID:
                s[i, j] = s[i, j] * x * (one - x)
            elif code == TANH:
                s[i, j] = s[i, j] * (one - x * x)
            elif code == RELU:
                s[i, j] = s[i, j] * (one if x > zero else zero)
            elif code == LEAKY_RELU:
                s[i, j] = s[i, j] * ((one if x > zero else zero) * rest + slope)
            else:  # SOFTPLUS: g′ = σ(z) = 1 − e^{−a}
                s[i, j] = s[i, j] * -np.expm1(-x)


@njit(cache=True)
def _loss_and_delta(loss, output, z, a, t, c, delta, slope, rest, tiny):
    """Σ_n J_n (float64) and δ(L) into delta: the twin of losses.Loss.value_and_delta."""
    m, n = z.shape
    one = z.dtype.type(1)
    below_one = np.nextafter(one, z.dtype.type(0))
    total = 0.0
    canonical = (
        (loss == SQUARED_ERROR and output == IDENTITY)
        or (loss == BINARY_CROSS_ENTROPY and output == SIGMOID)
        or (loss == CROSS_ENTROPY and output == SOFTMAX)
    )
    if loss == SQUARED_ERROR:  # J = ½ Σ (a − t)²
        for i in range(m):
            for j in range(n):
                e = a[i, j] - t[i, j]
                total += e * e
        total *= 0.5
    elif canonical and loss == BINARY_CROSS_ENTROPY:  # softplus(z) − t z, exact for any z
        for i in range(m):
            for j in range(n):
                total += np.logaddexp(z[i, j], z.dtype.type(0)) - t[i, j] * z[i, j]
    elif canonical:  # cross-entropy from the logits: (Σ_k t_k) lse(z) − Σ_k t_k z_k
        for i in range(m):
            top = z[i, 0]
            for j in range(1, n):
                top = max(top, z[i, j])
            se = z.dtype.type(0)
            mass = 0.0
            for j in range(n):
                se += np.exp(z[i, j] - top)
                mass += t[i, j]
                total -= t[i, j] * z[i, j]
            total += mass * (np.log(se) + top)
    else:  # probabilities clipped into [tiny, 1⁻] so the logarithms stay finite
        for i in range(m):
            for j in range(n):
                p = min(max(a[i, j], tiny), below_one)
                total -= t[i, j] * np.log(p)
                if loss == BINARY_CROSS_ENTROPY:
                    total -= (one - t[i, j]) * np.log1p(-p)
    if canonical:  # the link cancels: δ = c (a − t)
        for i in range(m):
            for j in range(n):
                delta[i, j] = (a[i, j] - t[i, j]) * c
        return total
    for i in range(m):  # δ = c ∂J/∂a ⊙ g′
        for j in range(n):
            p = min(max(a[i, j], tiny), below_one)
            if loss == SQUARED_ERROR:
                delta[i, j] = (a[i, j] - t[i, j]) * c
            elif loss == BINARY_CROSS_ENTROPY:
                delta[i, j] = (a[i, j] - t[i, j]) / ((one - p) * p) * c
            else:
                delta[i, j] = t[i, j] / p * -c
    _derive(output, delta, a, slope, rest)
    return total


@njit(cache=True)
def _view(work, start, m, n):
    return work[start : start + m * n].reshape(m, n)


@njit(cache=True)
def _update(rule, w, grad, velocity, lr, mu):
    """The optimizer's one pass over the flat vector, as the *_update twins in cpu.py."""
    step, mu_ = w.dtype.type(lr), w.dtype.type(mu)
    for i in range(w.shape[0]):
        g = grad[i] * step
        if rule == SGD:  # w ← w − lr g
            w[i] = w[i] - g
        elif rule == MOMENTUM:  # v ← μ v − lr g ;  w ← w + v
            velocity[i] = velocity[i] * mu_ - g
            w[i] = w[i] + velocity[i]
        elif rule == NESTEROV:  # v ← μ v − lr g ;  w ← w + μ v − lr g
            velocity[i] = velocity[i] * mu_ - g
            w[i] = (w[i] - g) + velocity[i] * mu_


@njit(cache=True)
def train_step(X, T, w, grad, work, plan, loss, mean, slope, tiny, alpha, rule, lr, mu, velocity):
    """Forward, backprop (plus the L2 term) into grad, then the update ``rule``; returns the batch loss.

    plan (3, L + 1) int64, one column per layer l = 0..L: row SIZE n_l, row
    OFFSET where Θ(l + 1) starts in w (Θ column-major: the bias, then Wᵀ
    (n_l, n_{l+1})), row CODE the activation of layer l (column 0 unused).
    alpha: the L2 weight (0 for none); rule: GRADIENT_ONLY, SGD, MOMENTUM or
    NESTEROV, with lr, mu and the velocity vector (any vector for SGD).
    The loss is c Σ_n J_n + (alpha c / 2) ‖W‖², c = 1/m (mean) or 1 (sum).
    """
    sizes, offsets, codes = plan[SIZE], plan[OFFSET], plan[CODE]
    dt = w.dtype.type
    m, L = X.shape[0], sizes.shape[0] - 1
    scale = 1.0 / m if mean else 1.0  # the reduction factor c
    c = dt(scale)
    slope_, rest, tiny_, decay = dt(slope), dt(1.0 - slope), dt(tiny), dt(alpha * scale)
    total_units = 0
    for l in range(1, L + 1):
        total_units += sizes[l]
    d_start = m * total_units  # work = [a(1)..a(L) | δ(1)..δ(L) | z(L)]
    z_out = _view(work, 2 * d_start, m, sizes[L])

    a_prev = X
    start = 0
    for l in range(1, L + 1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        a = _view(work, start, m, n_out)
        z = z_out if l == L else a  # hidden layers activate in place
        _gemm(a_prev, w[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out), z)
        _activate(codes[l], z, w[off : off + n_out], a, slope_)
        a_prev = a
        start += m * n_out

    start -= m * sizes[L]  # a(L)
    total = _loss_and_delta(
        loss, codes[L], z_out, a_prev, T, c, _view(work, d_start + start, m, sizes[L]), slope_, rest, tiny_
    )
    squares = 0.0
    for l in range(L, 0, -1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        wt = w[off + n_out : off + n_out * (n_in + 1)]
        gt = grad[off + n_out : off + n_out * (n_in + 1)]
        delta = _view(work, d_start + start, m, n_out)
        a_in = X if l == 1 else _view(work, start - m * n_in, m, n_in)
        _gemm(a_in.T, delta, gt.reshape(n_in, n_out))
        _colsum(delta, grad[off : off + n_out])
        if alpha != 0.0:  # L2 on the weights only: g ← g + alpha c w, J += (alpha c / 2) ‖W‖²
            for i in range(wt.shape[0]):
                gt[i] = gt[i] + wt[i] * decay
                squares += wt[i] * wt[i]
        if l > 1:
            s = _view(work, d_start + start - m * n_in, m, n_in)
            _gemm(delta, wt.reshape(n_in, n_out).T, s)
            _derive(codes[l - 1], s, a_in, slope_, rest)
            start -= m * n_in

    if rule != GRADIENT_ONLY:
        _update(rule, w, grad, velocity, lr, mu)
    return total * scale + 0.5 * alpha * scale * squares
