"""Reference twins written in the array API standard only.

Used for any namespace that is neither numpy nor CuPy (the tests run the whole
network on ``array_api_strict`` with them, which proves the generic code uses
nothing outside the standard), for numpy when numba is missing or broken, and
as the reference every other table is tested against (tests/test_tables.py).
They build temporaries freely and copy the result into ``out`` with ``out[...] = ...``.
"""

from __future__ import annotations

from array_api_compat import array_namespace

from bpgpu.kernels import LEAKY_SLOPE


def _put(out, value):
    out[...] = value
    return out


def matmul(a, b, out):
    return _put(out, a @ b)


def colsum(d, out):
    return _put(out, array_namespace(d).sum(d, axis=0))


def _biased(z, b):
    z[...] = z + b
    return z


def identity_fwd(z, b, out, scratch, rows):
    return _put(out, _biased(z, b))


def identity_bwd(s, a, out, scratch, rows):
    return _put(out, s)


def sigmoid_fwd(z, b, out, scratch, rows):
    xp = array_namespace(z)
    zb = _biased(z, b)
    return _put(out, xp.exp(-xp.logaddexp(-zb, xp.zeros_like(zb))))  # exp(−softplus(−z))


def sigmoid_bwd(s, a, out, scratch, rows):
    return _put(out, s * a * (1.0 - a))


def tanh_fwd(z, b, out, scratch, rows):
    return _put(out, array_namespace(z).tanh(_biased(z, b)))


def tanh_bwd(s, a, out, scratch, rows):
    return _put(out, s * (1.0 - a * a))


def relu_fwd(z, b, out, scratch, rows):
    xp = array_namespace(z)
    zb = _biased(z, b)
    return _put(out, xp.where(zb > 0, zb, xp.zeros_like(zb)))


def relu_bwd(s, a, out, scratch, rows):
    xp = array_namespace(s)
    return _put(out, xp.where(a > 0, s, xp.zeros_like(s)))


def leaky_relu_fwd(z, b, out, scratch, rows):
    xp = array_namespace(z)
    zb = _biased(z, b)
    return _put(out, xp.where(zb > 0, zb, LEAKY_SLOPE * zb))


def leaky_relu_bwd(s, a, out, scratch, rows):
    xp = array_namespace(s)
    return _put(out, xp.where(a > 0, s, LEAKY_SLOPE * s))


def softplus_fwd(z, b, out, scratch, rows):
    xp = array_namespace(z)
    return _put(out, xp.logaddexp(_biased(z, b), xp.zeros_like(z)))


def softplus_bwd(s, a, out, scratch, rows):
    return _put(out, -s * array_namespace(a).expm1(-a))


def softmax_fwd(z, b, out, scratch, rows):
    xp = array_namespace(z)
    zb = _biased(z, b)
    e = xp.exp(zb - xp.max(zb, axis=1, keepdims=True))
    return _put(out, e / xp.sum(e, axis=1, keepdims=True))


def exp_fwd(z, b, out, scratch, rows):
    return _put(out, array_namespace(z).exp(_biased(z, b)))


def exp_bwd(s, a, out, scratch, rows):
    return _put(out, s * a)


def softmax_bwd(s, a, out, scratch, rows):
    xp = array_namespace(s)
    return _put(out, a * (s - xp.sum(s * a, axis=1, keepdims=True)))


def clip_unit(a):
    """a clipped into [smallest normal, 1 − ulp]: what the logarithms of the losses see."""
    xp = array_namespace(a)
    info = xp.finfo(a.dtype)
    one = xp.asarray(1.0, dtype=a.dtype)
    return xp.clip(a, info.smallest_normal, xp.nextafter(one, xp.zeros_like(one)))


def clip_positive(a):
    """a raised to at least the smallest normal: what log a and 1/a of the poisson loss see."""
    xp = array_namespace(a)
    return xp.maximum(a, xp.asarray(xp.finfo(a.dtype).smallest_normal, dtype=a.dtype))


# Second derivatives g″(z) written through the output a = g(z), like the g′ of
# the backward kernels. None: g″ = 0 (almost everywhere for the kinked ones).
# softmax, the only non-elementwise g, has no entry: the R-operator treats it on its own.
SECOND_DERIVATIVES = {
    "identity": None,
    "relu": None,
    "leaky_relu": None,
    "sigmoid": lambda a: a * (1.0 - a) * (1.0 - 2.0 * a),  # σ″ = σ′ (1 − 2σ)
    "tanh": lambda a: -2.0 * a * (1.0 - a * a),  # tanh″ = −2 tanh · tanh′
    "softplus": lambda a: -array_namespace(a).expm1(-a) * array_namespace(a).exp(-a),  # σ(z)(1 − σ(z)), σ = 1 − e^{−a}
    "exp": lambda a: a,  # exp″ = exp
}

# ∂²ℓ/∂a² per sample and output (diagonal for all three losses), with a clipped
# away from 0 and 1 exactly as the ∂ℓ/∂a kernels clip it.
LOSS_CURVATURES = {
    "squared_error": lambda a, t: array_namespace(a).ones_like(a),
    "binary_cross_entropy": lambda a, t: t / clip_unit(a) ** 2 + (1.0 - t) / (1.0 - clip_unit(a)) ** 2,
    "cross_entropy": lambda a, t: t / clip_unit(a) ** 2,
    "poisson": lambda a, t: t / clip_positive(a) ** 2,  # ∂²/∂a² (t log(t/a) − t + a)
}


# Per-sample losses J_n (one value per row): the fwd ops sum them, and weighted
# training (sample_weight, bpgpu.losses.Loss.row_values) weights them.


def squared_error_rows(a, t):
    r = a - t
    return 0.5 * array_namespace(a).sum(r * r, axis=1)


def binary_cross_entropy_rows(a, t):
    xp = array_namespace(a)
    p = clip_unit(a)
    return -xp.sum(t * xp.log(p) + (1.0 - t) * xp.log1p(-p), axis=1)


def cross_entropy_rows(a, t):
    xp = array_namespace(a)
    return -xp.sum(t * xp.log(clip_unit(a)), axis=1)


def _t_log_t(t):
    return t * array_namespace(t).log(clip_positive(t))  # 0 log 0 = 0


def poisson_rows(a, t):
    return array_namespace(a).sum(_t_log_t(t) - t * array_namespace(a).log(clip_positive(a)) - t + a, axis=1)


def sigmoid_binary_cross_entropy_rows(z, t):
    xp = array_namespace(z)
    return xp.sum(xp.logaddexp(z, xp.zeros_like(z)) - t * z, axis=1)


def softmax_cross_entropy_rows(z, t):
    xp = array_namespace(z)
    top = xp.max(z, axis=1, keepdims=True)
    lse = top + xp.log(xp.sum(xp.exp(z - top), axis=1, keepdims=True))
    return xp.sum(t, axis=1) * lse[:, 0] - xp.sum(t * z, axis=1)


def exp_poisson_rows(z, t):
    xp = array_namespace(z)
    return xp.sum(_t_log_t(t) - t * z - t + xp.exp(z), axis=1)


ROWS_FROM_LOGITS = {
    "squared_error": squared_error_rows,
    "binary_cross_entropy": sigmoid_binary_cross_entropy_rows,
    "cross_entropy": softmax_cross_entropy_rows,
    "poisson": exp_poisson_rows,
}


def squared_error_fwd(a, t, scratch, rows):
    return array_namespace(a).sum(squared_error_rows(a, t))


def squared_error_bwd(a, t, c, out, scratch):
    return _put(out, c * (a - t))


def binary_cross_entropy_fwd(a, t, scratch, rows):
    return array_namespace(a).sum(binary_cross_entropy_rows(a, t))


def binary_cross_entropy_bwd(a, t, c, out, scratch):
    p = clip_unit(a)
    return _put(out, c * (a - t) / (p * (1.0 - p)))


def cross_entropy_fwd(a, t, scratch, rows):
    return array_namespace(a).sum(cross_entropy_rows(a, t))


def cross_entropy_bwd(a, t, c, out, scratch):
    return _put(out, -c * t / clip_unit(a))


def poisson_fwd(a, t, scratch, rows):
    return array_namespace(a).sum(poisson_rows(a, t))


def poisson_bwd(a, t, c, out, scratch):
    return _put(out, c * (1.0 - t / clip_positive(a)))


def sigmoid_binary_cross_entropy_fwd(z, t, scratch, rows):
    return array_namespace(z).sum(sigmoid_binary_cross_entropy_rows(z, t))


def softmax_cross_entropy_fwd(z, t, scratch, rows):
    return array_namespace(z).sum(softmax_cross_entropy_rows(z, t))


def exp_poisson_fwd(z, t, scratch, rows):
    return array_namespace(z).sum(exp_poisson_rows(z, t))


def canonical_value_and_delta(loss, z, a, t, c, delta, scratch, rows):
    total = array_namespace(z).sum(ROWS_FROM_LOGITS[loss](z, t))
    squared_error_bwd(a, t, c, delta, scratch)
    return total


# --- optimizer updates (scratch is ignored: temporaries are fine here) --------


def sgd_update(w, g, lr, scratch):
    return _put(w, w - lr * g)


def momentum_update(w, g, v, lr, mu, scratch):
    _put(v, mu * v - lr * g)
    return _put(w, w + v)


def nesterov_update(w, g, v, lr, mu, scratch):
    _put(v, mu * v - lr * g)
    return _put(w, w + mu * v - lr * g)


def adam_update(w, g, m, v, lr_t, beta1, beta2, eps, scratch):
    xp = array_namespace(w)
    _put(m, beta1 * m + (1.0 - beta1) * g)
    _put(v, beta2 * v + (1.0 - beta2) * (g * g))
    return _put(w, w - lr_t * m / (xp.sqrt(v) + eps))


def l2_grad(g, w, mask, alpha, scratch):
    return _put(g, g + alpha * (mask * w))


def outer_sgd_update(wt, b, a, delta, lr, scratch):
    xp = array_namespace(wt)
    _put(wt, wt - lr * (xp.reshape(a, (-1, 1)) * xp.reshape(delta, (1, -1))))
    return _put(b, b - lr * delta)


def take_rows(x, idx, out):
    return _put(out, array_namespace(x).take(x, idx, axis=0))
