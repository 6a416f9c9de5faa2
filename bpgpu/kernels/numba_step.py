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

import numpy as np
from numba import njit, types

# Codes in the order of bpgpu.kernels.ACTIVATIONS and LOSSES (jit.py maps names to them).
IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, SOFTPLUS, SOFTMAX, EXP = range(8)
SQUARED_ERROR, BINARY_CROSS_ENTROPY, CROSS_ENTROPY, POISSON = range(4)
GRADIENT_ONLY, SGD, MOMENTUM, NESTEROV = range(4)  # the update applied after backprop
SIZE, OFFSET, CODE = range(3)  # the rows of train_step's plan

# Below this many multiply-adds (m k n) a plain loop beats the BLAS call made
# through np.dot (measured: benchmarks/NOTES.md, "Compiled CPU step (numba)", G1).
SMALL_GEMM = 512

# ?gemm through the helper numba's own np.dot calls (numba's helper library, which
# loads scipy.linalg.cython_blas): a named symbol, so the kernels stay cacheable,
# unlike a ctypes pointer to scipy's function. np.dot has no α and β, which the fused
# updates need. Arguments: kind ('s' or 'd'), transa, transb, m, n, k, &α, A, lda,
# B, ldb, &β, C, ldc, in BLAS's column-major terms.
_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char, types.intp, types.intp, types.intp,
    types.voidptr, types.voidptr, types.intp, types.voidptr, types.intp, types.voidptr, types.voidptr, types.intp,
))


@njit(cache=True)
def _operand(x):
    """(trans, ld) of a row-major matrix or a transposed view of one, as column-major BLAS sees it."""
    size = x.itemsize
    if x.strides[1] == size or x.shape[1] == 1:  # row-major: BLAS sees xᵀ, no transpose needed
        return ord("n"), max(x.strides[0] // size, x.shape[1], 1)
    return ord("t"), max(x.strides[1] // size, x.shape[0], 1)


@njit(cache=True)
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
        status = _xxgemm(kind, tb, ta, n, m, k, slots[0:].ctypes, b.ctypes, ldb, a.ctypes, lda, slots[1:].ctypes,
                         out.ctypes, max(out.strides[0] // out.itemsize, n, 1))
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


@njit(cache=True)
def _colsum(d, out):
    """out = Σ_rows d, row after row."""
    m, n = d.shape
    out[:] = d[0]
    for i in range(1, m):
        for j in range(n):
            out[j] += d[i, j]


@njit(cache=True, inline="always")
def _sgd_layer(a_in, delta, wt, b, row, lr, decay, slots):
    """SGD on one layer, the weight gradient a_inᵀ δ + decay Wᵀ folded into one BLAS call:
    Wᵀ ← (1 − lr decay) Wᵀ − lr a_inᵀ δ ;  b ← b − lr Σ_n δ_n  (row: scratch for the sum)."""
    _colsum(delta, row)
    _gemm(a_in.T, delta, wt, -lr, 1.0 - lr * decay, slots)
    step = b.dtype.type(lr)
    for j in range(b.shape[0]):
        b[j] = b[j] - row[j] * step


@njit(cache=True, inline="always")
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
            elif code == EXP:
                y = np.exp(x)
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
            elif code == EXP:  # exp′ = exp = a
                s[i, j] = s[i, j] * x
            else:  # SOFTPLUS: g′ = σ(z) = 1 − e^{−a}
                s[i, j] = s[i, j] * -np.expm1(-x)


@njit(cache=True)
def _loss_and_delta(loss, output, z, a, t, c, delta, slope, rest, tiny, weights):
    """Σ_n J_n (float64) and δ(L) into delta: the twin of losses.Loss.value_and_delta.

    weights: None, or one weight per row: Σ_n s_n J_n, and each row of δ(L) times s_n (the twin
    of MLP._output_delta's weighted branch). None is pruned at compile time: the unweighted
    step has no extra work.
    """
    m, n = z.shape
    one = z.dtype.type(1)
    below_one = np.nextafter(one, z.dtype.type(0))
    total = 0.0
    canonical = (
        (loss == SQUARED_ERROR and output == IDENTITY)
        or (loss == BINARY_CROSS_ENTROPY and output == SIGMOID)
        or (loss == CROSS_ENTROPY and output == SOFTMAX)
        or (loss == POISSON and output == EXP)
    )
    if loss == SQUARED_ERROR:  # J = ½ Σ (a − t)²
        for i in range(m):
            s = 1.0 if weights is None else weights[i]
            for j in range(n):
                e = a[i, j] - t[i, j]
                total += e * e * s
        total *= 0.5
    elif canonical and loss == BINARY_CROSS_ENTROPY:  # softplus(z) − t z, exact for any z
        for i in range(m):
            s = 1.0 if weights is None else weights[i]
            for j in range(n):
                total += (np.logaddexp(z[i, j], z.dtype.type(0)) - t[i, j] * z[i, j]) * s
    elif loss == POISSON:  # Σ t log t − t log a − t + a (0 log 0 = 0), from the logits when a = e^z
        for i in range(m):
            s = 1.0 if weights is None else weights[i]
            for j in range(n):
                y = t[i, j]
                term = y * np.log(max(y, tiny)) - y + a[i, j]
                term -= y * (z[i, j] if canonical else np.log(max(a[i, j], tiny)))
                total += term * s
    elif canonical:  # cross-entropy from the logits: (Σ_k t_k) lse(z) − Σ_k t_k z_k
        for i in range(m):
            top = z[i, 0]
            for j in range(1, n):
                top = max(top, z[i, j])
            se = z.dtype.type(0)
            mass = 0.0
            s = 1.0 if weights is None else weights[i]
            for j in range(n):
                se += np.exp(z[i, j] - top)
                mass += t[i, j]
                total -= t[i, j] * z[i, j] * s
            total += mass * (np.log(se) + top) * s
    else:  # probabilities clipped into [tiny, 1⁻] so the logarithms stay finite
        for i in range(m):
            s = 1.0 if weights is None else weights[i]
            for j in range(n):
                p = min(max(a[i, j], tiny), below_one)
                total -= t[i, j] * np.log(p) * s
                if loss == BINARY_CROSS_ENTROPY:
                    total -= (one - t[i, j]) * np.log1p(-p) * s
    if canonical:  # the link cancels: δ = c (a − t)
        for i in range(m):
            for j in range(n):
                delta[i, j] = (a[i, j] - t[i, j]) * c
        _weigh_rows(delta, weights)
        return total
    for i in range(m):  # δ = c ∂J/∂a ⊙ g′
        for j in range(n):
            p = min(max(a[i, j], tiny), below_one)
            if loss == SQUARED_ERROR:
                delta[i, j] = (a[i, j] - t[i, j]) * c
            elif loss == BINARY_CROSS_ENTROPY:
                delta[i, j] = (a[i, j] - t[i, j]) / ((one - p) * p) * c
            elif loss == POISSON:  # 1 − t / a, a raised to at least tiny
                delta[i, j] = (one - t[i, j] / max(a[i, j], tiny)) * c
            else:
                delta[i, j] = t[i, j] / p * -c
    _derive(output, delta, a, slope, rest)
    _weigh_rows(delta, weights)
    return total


@njit(cache=True)
def _weigh_rows(delta, weights):
    """δ_n ← s_n δ_n (nothing without weights)."""
    if weights is None:
        return
    for i in range(delta.shape[0]):
        s = delta.dtype.type(weights[i])
        for j in range(delta.shape[1]):
            delta[i, j] *= s


@njit(cache=True)
def _view(work, start, m, n):
    return work[start : start + m * n].reshape(m, n)


@njit(cache=True)
def _nesterov(w, grad, velocity, lr, mu):
    """v ← μ v − lr g ;  w ← w + μ v − lr g: one pass after backprop, as nesterov_update in cpu.py.

    Not fused into the gradient product like SGD and momentum: the new w needs
    both lr g and the new v, so g has to exist on its own.
    """
    step, mu_ = w.dtype.type(lr), w.dtype.type(mu)
    for i in range(w.shape[0]):
        g = grad[i] * step
        velocity[i] = velocity[i] * mu_ - g
        w[i] = (w[i] - g) + velocity[i] * mu_


@njit(cache=True)
def train_step(X, T, w, grad, work, plan, loss, mean, slope, tiny, alpha, rule, lr, mu, velocity, weights=None):
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
    slope_, rest, tiny_, decay = dt(slope), dt(1.0 - slope), dt(tiny), dt(alpha * scale)
    total_units, widest = 0, 0
    for l in range(1, L + 1):
        total_units += sizes[l]
        widest = max(widest, sizes[l])
    d_start = m * total_units  # work = [a(1)..a(L) | δ(1)..δ(L) | z(L) | a row | α, β]
    z_out = _view(work, 2 * d_start, m, sizes[L])
    row_start = 2 * d_start + m * sizes[L]
    slots = work[row_start + widest : row_start + widest + 2]

    a_prev = X
    start = 0
    for l in range(1, L + 1):
        n_in, n_out, off = sizes[l - 1], sizes[l], offsets[l - 1]
        a = _view(work, start, m, n_out)
        z = z_out if l == L else a  # hidden layers activate in place
        _gemm(a_prev, w[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out), z, 1.0, 0.0, slots)
        _activate(codes[l], z, w[off : off + n_out], a, slope_)
        a_prev = a
        start += m * n_out

    start -= m * sizes[L]  # a(L)
    total = _loss_and_delta(
        loss, codes[L], z_out, a_prev, T, c, _view(work, d_start + start, m, sizes[L]), slope_, rest, tiny_, weights
    )
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
            _momentum_layer(a_in, delta, wt, w[off : off + n_out],
                            velocity[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out),
                            velocity[off : off + n_out], work[row_start : row_start + n_out], lr, mu, decay, slots)
        else:  # the gradient: ∂J/∂Wᵀ = a_inᵀ δ (+ alpha c Wᵀ), ∂J/∂b = Σ_n δ_n
            gt = grad[off + n_out : off + n_out * (n_in + 1)].reshape(n_in, n_out)
            _gemm(a_in.T, delta, gt, 1.0, 0.0, slots)
            _colsum(delta, grad[off : off + n_out])
            if alpha != 0.0:
                for i in range(n_in):
                    for j in range(n_out):
                        gt[i, j] = gt[i, j] + wt[i, j] * decay
        if l > 1:
            _derive(codes[l - 1], s, a_in, slope_, rest)
            start -= m * n_in

    if rule == NESTEROV:
        _nesterov(w, grad, velocity, lr, mu)
    return total * scale + 0.5 * alpha * scale * squares
