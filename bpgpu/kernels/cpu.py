"""The numpy backend's kernel table: every name of :data:`bpgpu.kernels.OPS`, with no numba import.

One of the three kernel tables (compiled CPU here, CUDA C in :mod:`bpgpu.kernels.cuda`, the
array-API reference in :mod:`bpgpu.kernels.generic`), with the reference's signatures. The
ops are thin: matmul, colsum and take_rows are numpy's BLAS and take; every other op calls one
core kernel of :mod:`bpgpu.kernels.compiled` (the loops over the scalar definitions of g, g′
and ℓ, the optimizer updates), through :func:`bpgpu.kernels.provider.kernel`: the export compiled
ahead of time when the extension is fresh and fits the arguments, numba's dispatcher otherwise.

    identity_fwd … exp_fwd      z ← z + b; out = g(z)                       (_activate)
    identity_bwd … exp_bwd      out = s ⊙ g′(z), through a = g(z)            (_derive)
    <loss>_fwd / <loss>_bwd     Σ_n J_n from a; out = c ∂ℓ/∂a                (_loss_sum, _loss_grad)
    <pair>_fwd, canonical_…     Σ_n J_n from the logits z; δ(L) = c (a − t)  (_loss_sum, _residual)
    sgd / momentum / nesterov / adam_update, l2_grad, outer_sgd_update     (_sgd, _momentum, …)

Beyond the table, :data:`train_step` and :data:`all_finite` go through the same provider (the
training step and the finiteness check of a default fit), and any other name of compiled.py
(the derivative tools' passes, the R-operator, Levenberg–Marquardt's Gram matrix) is compiled.py's
own, reached through this module on first use (which imports numba then).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import numpy as np

from bpgpu.kernels import provider
from bpgpu.kernels.codes import (
    BINARY_CROSS_ENTROPY,
    CROSS_ENTROPY,
    EXP,
    IDENTITY,
    LEAKY_RELU,
    LOSS_CODE,
    POISSON,
    RELU,
    SIGMOID,
    SOFTMAX,
    SOFTPLUS,
    SQUARED_ERROR,
    TANH,
)

_activate = provider.kernel("_activate")
_derive = provider.kernel("_derive")
_loss_sum = provider.kernel("_loss_sum")
_loss_grad = provider.kernel("_loss_grad")
_residual = provider.kernel("_residual")
_sgd = provider.kernel("_sgd")
_momentum = provider.kernel("_momentum")
_adam = provider.kernel("_adam")
_l2 = provider.kernel("_l2")
_outer_sgd = provider.kernel("_outer_sgd")
train_step = provider.kernel("train_step")
all_finite = provider.kernel("all_finite", by_dtype=True)


def __getattr__(name: str) -> Any:
    """Every other name of compiled.py (numba's dispatchers, its constants), imported on first use and
    then kept here, so that later lookups are plain attribute reads (the import machinery took 2.5 µs
    a lookup, on every call of a derivative tool: benchmarks/NOTES.md, "B2")."""
    if name.startswith("__"):
        raise AttributeError(name)
    value = globals()[name] = getattr(importlib.import_module("bpgpu.kernels.compiled"), name)
    return value


def matmul(a, b, out):
    """out = a @ b straight into a preallocated buffer (or a view of the flat vector), by BLAS.

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
    """out = Σ_rows d = 1ᵀ d: the bias gradient ∂J/∂b = Σ_n δ_n, as a BLAS product
    (np.sum(axis=0, out=) allocates a reduction buffer on every call)."""
    if not out.flags.c_contiguous:  # np.dot writes only into contiguous outputs (never the case in a pass)
        out[...] = np.dot(_ones(d.shape[0], d.dtype), d)
        return out
    return np.dot(_ones(d.shape[0], d.dtype), d, out=out)


def take_rows(x, idx, out):
    """out ← x[idx]: one shuffled batch gathered into a reused buffer."""
    return np.take(x, idx, axis=0, out=out)


def _named(fn, name: str):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _fwd(code: int, name: str):
    def fwd(z, b, out, scratch, rows):
        """z ← z + b in place; out = g(z + b) (out may be z)."""
        _activate(code, z, b, out)
        return out

    return _named(fwd, f"{name}_fwd")


def _bwd(code: int, name: str):
    def bwd(s, a, out, scratch, rows):
        """out = s ⊙ g′(z), g′ through a = g(z) (out may be s)."""
        _derive(code, s, a, out)
        return out

    return _named(bwd, f"{name}_bwd")


identity_fwd, identity_bwd = _fwd(IDENTITY, "identity"), _bwd(IDENTITY, "identity")
sigmoid_fwd, sigmoid_bwd = _fwd(SIGMOID, "sigmoid"), _bwd(SIGMOID, "sigmoid")
tanh_fwd, tanh_bwd = _fwd(TANH, "tanh"), _bwd(TANH, "tanh")  # g is vectorizable: compiled.tanh
relu_fwd, relu_bwd = _fwd(RELU, "relu"), _bwd(RELU, "relu")
leaky_relu_fwd, leaky_relu_bwd = _fwd(LEAKY_RELU, "leaky_relu"), _bwd(LEAKY_RELU, "leaky_relu")
softplus_fwd, softplus_bwd = _fwd(SOFTPLUS, "softplus"), _bwd(SOFTPLUS, "softplus")
softmax_fwd, softmax_bwd = _fwd(SOFTMAX, "softmax"), _bwd(SOFTMAX, "softmax")
exp_fwd, exp_bwd = _fwd(EXP, "exp"), _bwd(EXP, "exp")


def _loss_fwd(code: int, name: str):
    def fwd(a, t, scratch, rows):
        """Σ_n J_n from the outputs a (clipped into [tiny, 1⁻] inside the logarithms)."""
        return _loss_sum(code, a, t, False, None)

    return _named(fwd, f"{name}_fwd")


def _loss_bwd(code: int, name: str):
    def bwd(a, t, c, out, scratch):
        """out = c ∂ℓ/∂a."""
        _loss_grad(code, a, t, c, out)
        return out

    return _named(bwd, f"{name}_bwd")


squared_error_fwd = _loss_fwd(SQUARED_ERROR, "squared_error")
squared_error_bwd = _loss_bwd(SQUARED_ERROR, "squared_error")
binary_cross_entropy_fwd = _loss_fwd(BINARY_CROSS_ENTROPY, "binary_cross_entropy")
binary_cross_entropy_bwd = _loss_bwd(BINARY_CROSS_ENTROPY, "binary_cross_entropy")
cross_entropy_fwd = _loss_fwd(CROSS_ENTROPY, "cross_entropy")
cross_entropy_bwd = _loss_bwd(CROSS_ENTROPY, "cross_entropy")
poisson_fwd = _loss_fwd(POISSON, "poisson")
poisson_bwd = _loss_bwd(POISSON, "poisson")


def sigmoid_binary_cross_entropy_fwd(z, t, scratch, rows):
    """Σ J_n from the logits: Σ softplus(z) − t z."""
    return _loss_sum(BINARY_CROSS_ENTROPY, z, t, True, None)


def softmax_cross_entropy_fwd(z, t, scratch, rows):
    """Σ J_n from the logits: Σ_n (Σ_k t_k) lse(z_n) − Σ_k t_k z_k."""
    return _loss_sum(CROSS_ENTROPY, z, t, True, None)


def exp_poisson_fwd(z, t, scratch, rows):
    """Σ J_n from the logits (a = e^z): Σ t log t − t z − t + e^z, no log of a at all."""
    return _loss_sum(POISSON, z, t, True, None)


def canonical_value_and_delta(loss, z, a, t, c, delta, scratch, rows):
    """A canonical (output, loss) pair: Σ_n J_n from the logits z, and δ(L) = c (a − t)."""
    total = _loss_sum(LOSS_CODE[loss], z, t, True, None)
    _residual(a, t, c, delta)
    return total


# --- optimizer updates over the flat vector, in place (scikit-learn's equations) ---------------
# ``scratch`` is unused here: the loops need no temporaries.


def sgd_update(w, g, lr, scratch):
    """w ← w − lr g."""
    _sgd(w, g, lr)
    return w


def momentum_update(w, g, v, lr, mu, scratch):
    """v ← μ v − lr g ;  w ← w + v."""
    _momentum(w, g, v, lr, mu, False)
    return w


def nesterov_update(w, g, v, lr, mu, scratch):
    """v ← μ v − lr g ;  w ← w + μ v − lr g (the look-ahead step, with the new v)."""
    _momentum(w, g, v, lr, mu, True)
    return w


def adam_update(w, g, m, v, lr_t, beta1, beta2, eps, scratch):
    """m ← β1 m + (1 − β1) g ;  v ← β2 v + (1 − β2) g² ;  w ← w − lr_t m / (√v + ε)."""
    _adam(w, g, m, v, lr_t, beta1, beta2, eps)
    return w


def l2_grad(g, w, mask, alpha, scratch):
    """g ← g + α mask ⊙ w: the gradient of (α/2)‖weights‖², biases masked out."""
    _l2(g, w, mask, alpha)
    return g


def outer_sgd_update(wt, b, a, delta, lr, scratch):
    """One sample: Wᵀ ← Wᵀ − lr a ⊗ δ ;  b ← b − lr δ (the gradient matrix is never stored)."""
    _outer_sgd(wt, b, a, delta, lr)
    return b
