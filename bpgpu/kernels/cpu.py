"""numpy twins of the fused kernels: ufuncs with ``out=``, in place, no hidden temporaries.

Every function writes its result into ``out`` (which may alias an input where
the docstring says so) and returns it, so callers use one calling convention on
every backend. ``scratch`` is a caller-owned buffer of the same shape as the
layer, ``rows`` an ``(m, 2)`` buffer for row reductions; the CUDA twins ignore
both. Derivatives are written in terms of the activation's output a = g(z), as
scikit-learn's MLP does, so the pre-activation never has to be stored.
"""

from __future__ import annotations

import functools

import numpy as np

LEAKY_SLOPE = 0.01


# --- linear algebra (BLAS) -------------------------------------------------


def matmul(a, b, out):
    """out = a @ b straight into a preallocated buffer (or a view of the flat vector).

    ``a`` may be a scipy.sparse matrix (the input X of layer 1, or its transpose): then the
    product is scipy's sparse × dense, copied into out; a is never densified."""
    if type(a) is np.ndarray:  # every dense operand of the passes, views included: no further test
        return np.matmul(a, b, out=out)
    if hasattr(a, "tocsr"):  # scipy.sparse
        out[...] = a @ b
        return out
    return np.matmul(a, b, out=out)


@functools.lru_cache(maxsize=8)
def _ones(m, dtype):
    """A read-only vector of m ones, made once per batch size and dtype."""
    ones = np.ones(m, dtype=dtype)
    ones.flags.writeable = False
    return ones


def colsum(d, out):
    """out = Σ_rows d = 1ᵀ d: the bias gradient ∂J/∂b = Σ_n δ_n.

    As a BLAS product because np.sum(axis=0, out=) allocates a reduction buffer on every call.
    """
    return np.dot(_ones(d.shape[0], d.dtype), d, out=out)


# --- activations: bias + g forward, s ⊙ g′(a) backward ----------------------
# Each ``*_fwd(z, b, out, ...)`` adds the bias row to z in place (z keeps z + b)
# and writes g(z + b) into out; out may be z itself.  Each ``*_bwd(s, a, out, ...)``
# writes s ⊙ g′(z) into out (out may be s), with g′ expressed through a.


def _add_bias(z, b, scratch):
    # z ← z + b on every row. np.add(z, b) with b broadcast allocates numpy's 8192-element
    # iterator buffer on every call; a broadcast copy and a same-shape add allocate nothing.
    np.copyto(scratch, b)
    return np.add(z, scratch, out=z)


def identity_fwd(z, b, out, scratch, rows):
    _add_bias(z, b, scratch)
    if out is not z:
        np.copyto(out, z)
    return out


def identity_bwd(s, a, out, scratch, rows):
    if out is not s:
        np.copyto(out, s)
    return out


def sigmoid_fwd(z, b, out, scratch, rows):
    # σ(z) = exp(−softplus(−z)): no overflow for any z, and full relative precision
    # where σ is tiny (the (1 + tanh(z/2))/2 form cancels there, which spoils log σ).
    _add_bias(z, b, scratch)
    np.negative(z, out=out)
    np.logaddexp(out, 0.0, out=out)
    np.negative(out, out=out)
    return np.exp(out, out=out)


def sigmoid_bwd(s, a, out, scratch, rows):
    # σ′ = a (1 − a)
    np.subtract(1.0, a, out=scratch)
    np.multiply(s, a, out=out)
    out *= scratch
    return out


def tanh_fwd(z, b, out, scratch, rows):
    _add_bias(z, b, scratch)
    return np.tanh(z, out=out)


def tanh_bwd(s, a, out, scratch, rows):
    # tanh′ = 1 − a²
    np.multiply(a, a, out=scratch)
    np.subtract(1.0, scratch, out=scratch)
    return np.multiply(s, scratch, out=out)


def relu_fwd(z, b, out, scratch, rows):
    _add_bias(z, b, scratch)
    return np.maximum(z, 0.0, out=out)


def relu_bwd(s, a, out, scratch, rows):
    # relu′ = [a > 0], as floats straight away (np.greater would cast bools through a buffer)
    np.heaviside(a, 0.0, out=scratch)
    return np.multiply(s, scratch, out=out)


def leaky_relu_fwd(z, b, out, scratch, rows):
    # max(z, k z) for a slope 0 < k < 1
    _add_bias(z, b, scratch)
    np.multiply(z, LEAKY_SLOPE, out=scratch)
    return np.maximum(z, scratch, out=out)


def leaky_relu_bwd(s, a, out, scratch, rows):
    # g′ = 1 where a > 0, else k  (a has the sign of z)
    np.heaviside(a, 0.0, out=scratch)
    scratch *= 1.0 - LEAKY_SLOPE
    scratch += LEAKY_SLOPE
    return np.multiply(s, scratch, out=out)


def softplus_fwd(z, b, out, scratch, rows):
    # log(1 + e^z), overflow-free through logaddexp
    _add_bias(z, b, scratch)
    return np.logaddexp(z, 0.0, out=out)


def softplus_bwd(s, a, out, scratch, rows):
    # g′ = σ(z) = 1 − e^{−a} = −expm1(−a)
    np.negative(a, out=scratch)
    np.expm1(scratch, out=scratch)
    np.negative(scratch, out=scratch)
    return np.multiply(s, scratch, out=out)


def softmax_fwd(z, b, out, scratch, rows):
    # a_k = e^{z_k − max z} / Σ_j e^{z_j − max z}: the shift keeps exp from overflowing.
    _add_bias(z, b, scratch)
    top = rows[:, :1]
    np.max(z, axis=1, keepdims=True, out=top)
    np.subtract(z, top, out=out)
    np.exp(out, out=out)
    np.sum(out, axis=1, keepdims=True, out=top)
    out /= top
    return out


def exp_fwd(z, b, out, scratch, rows):
    # a = e^z, the inverse of the log link (overflows to inf as numpy's exp does)
    _add_bias(z, b, scratch)
    return np.exp(z, out=out)


def exp_bwd(s, a, out, scratch, rows):
    # exp′ = exp = a
    return np.multiply(s, a, out=out)


def softmax_bwd(s, a, out, scratch, rows):
    # Jacobian-vector product of softmax: δ = a ⊙ (s − Σ_k s_k a_k)
    dot = rows[:, :1]
    np.multiply(s, a, out=scratch)
    np.sum(scratch, axis=1, keepdims=True, out=dot)
    np.subtract(s, dot, out=out)
    out *= a
    return out


# --- losses: Σ_n J_n forward, c ∂J/∂a backward ------------------------------
# Forward ops return the unscaled sum over samples and outputs as a 0-d array
# (no host transfer); backward ops write c ∂J/∂a into out, with c = 1/m or 1.


def _clip_unit(a, scratch):
    """a clipped into [tiny, 1⁻] so log and 1/a stay finite for saturated outputs."""
    info = np.finfo(a.dtype)
    return np.clip(a, info.tiny, np.nextafter(a.dtype.type(1), a.dtype.type(0)), out=scratch)


def _clip_positive(a, scratch):
    """a raised to at least tiny, so log a and 1/a stay finite (NaN stays NaN)."""
    return np.maximum(a, np.finfo(a.dtype).tiny, out=scratch)


def _t_log_t(t, scratch):
    # Σ t log t with 0 log 0 = 0: t · log max(t, tiny) is exactly 0 at t = 0
    p = _clip_positive(t, scratch)
    return np.vdot(t, np.log(p, out=p))


def squared_error_fwd(a, t, scratch, rows):
    # J = ½ Σ (a − t)²
    np.subtract(a, t, out=scratch)
    return 0.5 * np.vdot(scratch, scratch)


def squared_error_bwd(a, t, c, out, scratch):
    # c (a − t); also the output delta of every canonical pair
    np.subtract(a, t, out=out)
    out *= c
    return out


def binary_cross_entropy_fwd(a, t, scratch, rows):
    # J = −Σ [t log a + (1 − t) log(1 − a)], a clipped away from 0 and 1
    p = _clip_unit(a, scratch)
    total = -np.vdot(t, np.log(p, out=p))
    p = _clip_unit(a, scratch)
    np.negative(p, out=p)
    np.log1p(p, out=p)
    return total - np.sum(p) + np.vdot(t, p)


def binary_cross_entropy_bwd(a, t, c, out, scratch):
    # c (a − t) / (a (1 − a)), the denominator from a clipped away from 0 and 1
    p = _clip_unit(a, scratch)
    np.subtract(1.0, p, out=out)
    out *= p
    np.subtract(a, t, out=scratch)
    np.divide(scratch, out, out=out)
    out *= c
    return out


def cross_entropy_fwd(a, t, scratch, rows):
    # J = −Σ t log a, a clipped away from 0
    p = _clip_unit(a, scratch)
    return -np.vdot(t, np.log(p, out=p))


def cross_entropy_bwd(a, t, c, out, scratch):
    # −c t / a
    _clip_unit(a, out)
    np.divide(t, out, out=out)
    out *= -c
    return out


def poisson_fwd(a, t, scratch, rows):
    # J = Σ [t log(t / a) − t + a] (half the Poisson deviance), a raised to at least tiny in the log
    p = _clip_positive(a, scratch)
    total = -np.vdot(t, np.log(p, out=p))
    return total + _t_log_t(t, scratch) + (np.sum(a) - np.sum(t))


def poisson_bwd(a, t, c, out, scratch):
    # c (1 − t / a), a raised to at least tiny
    _clip_positive(a, out)
    np.divide(t, out, out=out)
    np.subtract(1.0, out, out=out)
    out *= c
    return out


def sigmoid_binary_cross_entropy_fwd(z, t, scratch, rows):
    # From the logits: −t log σ(z) − (1 − t) log(1 − σ(z)) = softplus(z) − t z, exact for any z.
    np.logaddexp(z, 0.0, out=scratch)
    return np.sum(scratch) - np.vdot(t, z)


def softmax_cross_entropy_fwd(z, t, scratch, rows):
    # From the logits: −Σ_k t_k log a_k = (Σ_k t_k) lse(z) − Σ_k t_k z_k, lse = log Σ e^{z}.
    top, lse = rows[:, :1], rows[:, 1:]
    np.max(z, axis=1, keepdims=True, out=top)
    np.subtract(z, top, out=scratch)
    np.exp(scratch, out=scratch)
    np.sum(scratch, axis=1, keepdims=True, out=lse)
    np.log(lse, out=lse)
    lse += top
    np.sum(t, axis=1, keepdims=True, out=top)
    return np.vdot(top, lse) - np.vdot(t, z)


def exp_poisson_fwd(z, t, scratch, rows):
    # From the logits (a = e^z): Σ [t log t − t − t z + e^z], no log of a at all.
    np.exp(z, out=scratch)
    total = np.sum(scratch) - np.vdot(t, z) - np.sum(t)
    return total + _t_log_t(t, scratch)


_FROM_LOGITS = {
    "squared_error": squared_error_fwd,
    "binary_cross_entropy": sigmoid_binary_cross_entropy_fwd,
    "cross_entropy": softmax_cross_entropy_fwd,
    "poisson": exp_poisson_fwd,
}


def canonical_value_and_delta(loss, z, a, t, c, delta, scratch, rows):
    # A canonical (output, loss) pair: Σ_n J_n from the logits z, and δ(L) = c (a − t),
    # the link's derivative cancelling ∂J/∂a (one fused pass in the CUDA twin).
    total = _FROM_LOGITS[loss](z, t, scratch, rows)
    squared_error_bwd(a, t, c, delta, scratch)
    return total


# --- optimizer updates -------------------------------------------------------
# One pass over the flat parameter vector w (or, for outer_sgd_update, over one
# layer's views of it), in place; scikit-learn's equations (_stochastic_optimizers.py).
# ``scratch`` is an optimizer-owned buffer shaped like w (like wt for the outer
# update): numpy needs it to hold lr·g and similar terms without temporaries.


def sgd_update(w, g, lr, scratch):
    # w ← w − lr g
    np.multiply(g, lr, out=scratch)
    return np.subtract(w, scratch, out=w)


def momentum_update(w, g, v, lr, mu, scratch):
    # v ← μ v − lr g ;  w ← w + v
    np.multiply(g, lr, out=scratch)
    v *= mu
    v -= scratch
    return np.add(w, v, out=w)


def nesterov_update(w, g, v, lr, mu, scratch):
    # v ← μ v − lr g ;  w ← w + μ v − lr g  (the look-ahead step, with the new v)
    np.multiply(g, lr, out=scratch)
    v *= mu
    v -= scratch
    w -= scratch
    np.multiply(v, mu, out=scratch)
    return np.add(w, scratch, out=w)


def adam_update(w, g, m, v, lr_t, beta1, beta2, eps, scratch):
    # m ← β1 m + (1 − β1) g ;  v ← β2 v + (1 − β2) g² ;  w ← w − lr_t m / (√v + ε)
    np.multiply(g, 1.0 - beta1, out=scratch)
    m *= beta1
    m += scratch
    np.multiply(g, g, out=scratch)
    scratch *= 1.0 - beta2
    v *= beta2
    v += scratch
    np.sqrt(v, out=scratch)
    scratch += eps
    np.divide(m, scratch, out=scratch)
    scratch *= lr_t
    return np.subtract(w, scratch, out=w)


def l2_grad(g, w, mask, alpha, scratch):
    # g ← g + α mask ⊙ w: the gradient of (α/2)‖weights‖², biases masked out
    np.multiply(w, mask, out=scratch)
    scratch *= alpha
    return np.add(g, scratch, out=g)


def outer_sgd_update(wt, b, a, delta, lr, scratch):
    # One sample: Wᵀ ← Wᵀ − lr a ⊗ δ ;  b ← b − lr δ  (the gradient matrix is never stored)
    np.multiply.outer(a, delta, out=scratch)
    scratch *= lr
    np.subtract(wt, scratch, out=wt)
    step = scratch[0]
    np.multiply(delta, lr, out=step)
    return np.subtract(b, step, out=b)


def take_rows(x, idx, out):
    # out ← x[idx]: gather one shuffled batch into a reused buffer (no new array per step)
    return np.take(x, idx, axis=0, out=out)
