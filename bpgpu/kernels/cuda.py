"""CuPy twins of the fused kernels: ElementwiseKernel / ReductionKernel, one pass each.

Same names, signatures and equations as the reference :mod:`bpgpu.kernels.generic`; ``scratch``
and ``rows`` are accepted for the common calling convention, and ``rows``
(an ``(m, 2)`` buffer) holds the per-row statistics of softmax. Every CUDA body
is a string in :data:`SPECS`; :func:`kernel` builds a CuPy kernel from it on
first use and caches it in :data:`KERNELS` (building only parses the parameter
lists: importing this module or building every kernel never touches a device,
so the sources can be generated and checked on a machine without a GPU, see
:mod:`bpgpu.testing`). :data:`OP_KERNELS` says which kernels each op launches.

NaN propagates as in numpy (so divergence is seen on every backend): CUDA's
max/min return the other argument for a NaN, so clips and relu use comparisons.

Float16 safety: in CuPy's headers ``float16 op float16`` yields ``float`` and
``max``/``min`` have (float16, float16) and (float, float) overloads, so every
literal is written ``T(...)``, both arguments of max/min are cast to one type,
results are cast back with ``T(...)``, and sums accumulate in float for float16
(``bpgpu_acc``). Scalars (c, lr, the clip bounds...) are Python numbers that
CuPy casts to T.

Matrix products go to cuBLAS through ``cupy.matmul(a, b, out=out)`` (CuPy 14:
same dtypes take the fast path straight to ``_core.matmul`` → ``dot`` →
``tensordot_core`` → ``gemmEx``, with ``out`` as the GEMM's C). There, C- and
F-contiguous operands go to GEMM with a transpose flag and only an operand that
is neither is copied; ``out`` must be C-contiguous (CuPy raises otherwise, so a
strided ``out`` is never filled through a silent copy). The network only passes
contiguous matrices: Wᵀ is a reshaped slice of the flat vector (C-contiguous),
W = (Wᵀ).T and Aᵀ are F-contiguous views, and the gradient block ∂J/∂Wᵀ is again
a C-contiguous slice; so no GEMM of the forward or backward pass copies an
operand (tests/test_gpu.py counts allocations on a GPU to check it). A 1×1
result (one sample, one output unit) is a dot product that CuPy computes by a
reduction into a temporary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from bpgpu.kernels import LEAKY_SLOPE

# --- CUDA sources ------------------------------------------------------------

PREAMBLE = r"""
// Sums and maxima of float16 data are carried in float.
template <typename X> struct bpgpu_acc { typedef X type; };
template <> struct bpgpu_acc<float16> { typedef float type; };

// v clipped into [lo, hi] (keeps log and 1/a finite for saturated outputs). Comparisons,
// not min/max: CUDA's max(NaN, lo) is lo, and a NaN must stay NaN, as in numpy's clip.
template <typename X> __device__ X bpgpu_clip(X v, X lo, X hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// softplus log(1 + e^v) = max(v, 0) + log1p(e^{-|v|}): no overflow for any v.
template <typename X> __device__ X bpgpu_softplus(X v) {
  const X minus_abs = v > X(0) ? X(-v) : v;
  return X(max(v, X(0)) + log1p(exp(minus_abs)));
}
"""

_SLOPE = f"T({LEAKY_SLOPE!r})"
_ACC = "bpgpu_acc<T>::type"


@dataclass(frozen=True)
class Elementwise:
    """An ElementwiseKernel: outputs are references, so an output may also be read."""

    in_params: str
    out_params: str
    operation: str
    reduce_dims: bool = True

    def build(self, cupy: Any, name: str) -> Any:
        return cupy.ElementwiseKernel(
            self.in_params,
            self.out_params,
            self.operation,
            name,
            reduce_dims=self.reduce_dims,
            preamble=PREAMBLE,
        )


@dataclass(frozen=True)
class Reduction:
    """A ReductionKernel; ``a``/``b`` are the accumulators in reduce and post-map
    expressions, so no parameter is named a, b, in, out, x or i (CuPy's CUB path
    renames parameters by plain text replacement)."""

    in_params: str
    out_params: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str

    def build(self, cupy: Any, name: str) -> Any:
        return cupy.ReductionKernel(
            self.in_params,
            self.out_params,
            self.map_expr,
            self.reduce_expr,
            self.post_map_expr,
            self.identity,
            name,
            reduce_type=_ACC,
            preamble=PREAMBLE,
        )


def _sum(in_params: str, out: str, term: str, post: str | None = None) -> Reduction:
    return Reduction(in_params, f"T {out}", term, "a + b", post or f"{out} = T(a)", "0")


def _bias_act(formula: str) -> Elementwise:
    """Forward: z ← z + b in place, act ← g(z + b); ``v`` is z + b. act may alias z."""
    return Elementwise("T bias", "T z, T act", f"const T v = T(z + bias); z = v; act = T({formula});")


def _delta(formula: str) -> Elementwise:
    """Backward: delta ← upstream ⊙ g′, g′ through the stored output act. delta may alias upstream."""
    return Elementwise("T upstream, T act", "T delta", f"delta = T({formula});")


_ROW_MAX = Reduction("T z, T bias", "T top", "z + bias", "max(a, b)", "top = T(a)", "-CUDART_INF")
_ROW_SUM_EXP = _sum("T z, T bias, T top", "total_exp", "exp(z + bias - top)")
_CLIPPED = "bpgpu_clip(act, lo, hi)"
_BCE_TERM = f"-(tgt * log({_CLIPPED}) + (T(1) - tgt) * log1p(-{_CLIPPED}))"
_DELTA_CANONICAL = "delta = T((act - tgt) * c)"  # δ(L) = c (a − t), written while summing J
# poisson: a and t raised to at least lo = tiny inside the logs (comparisons: NaN stays NaN);
# t log max(t, tiny) is exactly 0 at t = 0 (0 log 0 = 0)
_T_LOG_T = "tgt * log(tgt < lo ? lo : tgt)"
_POISSON_TERM = f"{_T_LOG_T} - tgt * log(act < lo ? lo : act) - tgt + act"
_EXP_POISSON_TERM = f"{_T_LOG_T} - tgt * logit - tgt + exp(logit)"  # from the logits, a = e^z

SPECS: dict[str, Elementwise | Reduction] = {
    # bias gradient ∂J/∂b = Σ_n δ_n
    "colsum": _sum("T delta", "bias_grad", "delta"),
    # activations, forward: a = g(z + b)
    "identity_fwd": _bias_act("v"),
    # exp(−softplus(−z)), as the other tables: no overflow for any z, and unlike
    # (1 + tanh(z/2)) / 2 full relative precision where σ is tiny.
    "sigmoid_fwd": _bias_act("exp(-bpgpu_softplus(T(-v)))"),
    "tanh_fwd": _bias_act("tanh(v)"),
    "relu_fwd": _bias_act("v < T(0) ? T(0) : v"),  # not max(v, 0): NaN stays NaN, as in numpy
    "leaky_relu_fwd": _bias_act(f"v > T(0) ? v : T({_SLOPE} * v)"),
    "softplus_fwd": _bias_act("bpgpu_softplus(v)"),
    "exp_fwd": _bias_act("exp(v)"),
    # softmax: row max and row sum of e^{z − max} by reductions, then one normalising pass
    "softmax_fwd_rowmax": _ROW_MAX,
    "softmax_fwd_rowsum": _ROW_SUM_EXP,
    "softmax_fwd": Elementwise(
        "T bias, T top, T total_exp",
        "T z, T act",
        "const T v = T(z + bias); z = v; act = T(exp(v - top) / total_exp);",
    ),
    # activations, backward: δ = s ⊙ g′(a)
    "identity_bwd": _delta("upstream"),
    "sigmoid_bwd": _delta("upstream * act * (T(1) - act)"),
    "tanh_bwd": _delta("upstream * (T(1) - act * act)"),
    "relu_bwd": _delta("act > T(0) ? upstream : T(0)"),
    "leaky_relu_bwd": _delta(f"act > T(0) ? upstream : T({_SLOPE} * upstream)"),
    "softplus_bwd": _delta("upstream * -expm1(-act)"),  # σ(z) = 1 − e^{−a}
    "exp_bwd": _delta("upstream * act"),  # exp′ = exp = a
    "softmax_bwd_rowdot": _sum("T upstream, T act", "dot", "upstream * act"),
    "softmax_bwd": Elementwise("T upstream, T act, T dot", "T delta", "delta = T(act * (upstream - dot));"),
    # losses: Σ J_n (0-d) and c ∂J/∂a
    "squared_error_fwd": _sum("T act, T tgt", "total", "(act - tgt) * (act - tgt)", "total = T(a / 2)"),
    "squared_error_bwd": Elementwise("T act, T tgt, T c", "T delta", "delta = T((act - tgt) * c);"),
    "binary_cross_entropy_fwd": _sum("T act, T tgt, T lo, T hi", "total", _BCE_TERM),
    "binary_cross_entropy_bwd": Elementwise(
        "T act, T tgt, T c, T lo, T hi",
        "T delta",
        f"const T p = {_CLIPPED}; delta = T((act - tgt) / (p * (T(1) - p)) * c);",
    ),
    "cross_entropy_fwd": _sum("T act, T tgt, T lo, T hi", "total", f"-(tgt * log({_CLIPPED}))"),
    "cross_entropy_bwd": Elementwise("T act, T tgt, T c, T lo, T hi", "T delta", f"delta = T(tgt / {_CLIPPED} * -c);"),
    "poisson_fwd": _sum("T act, T tgt, T lo", "total", _POISSON_TERM),
    "poisson_bwd": Elementwise(
        "T act, T tgt, T c, T lo", "T delta", "delta = T((T(1) - tgt / (act < lo ? lo : act)) * c);"
    ),
    "exp_poisson_fwd": _sum("T logit, T tgt, T lo", "total", _EXP_POISSON_TERM),
    # losses from the logits: softplus(z) − t z, and Σ_k t_k (lse − z_k) with lse = top + log Σ e^{z − top}
    "sigmoid_binary_cross_entropy_fwd": _sum("T logit, T tgt", "total", "bpgpu_softplus(logit) - tgt * logit"),
    "softmax_cross_entropy_fwd": _sum(
        "T logit, T tgt, T top, T total_exp", "total", "tgt * (log(total_exp) + top - logit)"
    ),
    # canonical pairs: the loss and δ(L) in one pass. ``_non_const`` (CuPy's parameter keyword)
    # makes delta a writable reference inside the reduction, and its map writes it.
    # A reduction maps every element at least once; when a block has more lanes than outputs
    # (out size 1 here) CuPy's loop maps a few elements twice, discarding the extra sums: the
    # repeated write of delta stores the same value, so it is harmless.
    "squared_error_value_and_delta": _sum(
        "T logit, T act, T tgt, T c, _non_const T delta",
        "total",
        f"({_DELTA_CANONICAL}, (logit - tgt) * (logit - tgt))",
        "total = T(a / 2)",
    ),
    "sigmoid_binary_cross_entropy_value_and_delta": _sum(
        "T logit, T act, T tgt, T c, _non_const T delta",
        "total",
        f"({_DELTA_CANONICAL}, bpgpu_softplus(logit) - tgt * logit)",
    ),
    "softmax_cross_entropy_value_and_delta": _sum(
        "T logit, T act, T tgt, T c, T top, T total_exp, _non_const T delta",
        "total",
        f"({_DELTA_CANONICAL}, tgt * (log(total_exp) + top - logit))",
    ),
    "exp_poisson_value_and_delta": _sum(
        "T logit, T act, T tgt, T c, T lo, _non_const T delta",
        "total",
        f"({_DELTA_CANONICAL}, {_EXP_POISSON_TERM})",
    ),
    # optimizer updates over the flat vector, in place, state included (scikit-learn's forms)
    "sgd_update": Elementwise("T g, T lr", "T w", "w = T(w - lr * g);"),
    "momentum_update": Elementwise("T g, T lr, T mu", "T w, T v", "v = T(mu * v - lr * g); w = T(w + v);"),
    "nesterov_update": Elementwise(
        "T g, T lr, T mu", "T w, T v", "v = T(mu * v - lr * g); w = T(w + mu * v - lr * g);"
    ),
    "adam_update": Elementwise(
        "T g, T lr_t, T beta1, T beta2, T eps",
        "T w, T m, T v",
        "m = T(beta1 * m + (T(1) - beta1) * g);"
        " v = T(beta2 * v + (T(1) - beta2) * (g * g));"
        " w = T(w - lr_t * m / (sqrt(v) + eps));",
    ),
    "l2_grad": Elementwise("T w, T mask, T alpha", "T g", "g = T(g + alpha * (mask * w));"),
    # one sample: Wᵀ ← Wᵀ − lr a ⊗ δ over the (n_in, n_out) grid, and b ← b − lr δ by the
    # threads of row 0 (i < n_out); reduce_dims=False keeps i the C-order index of that grid.
    "outer_sgd_update": Elementwise(
        "T a_col, T d_row, raw T d_raw, T lr",
        "T wt, raw T bias",
        "wt = T(wt - lr * (a_col * d_row)); if (i < bias.size()) bias[i] = T(bias[i] - lr * d_raw[i]);",
        reduce_dims=False,
    ),
}

# Python op -> the kernels it launches, in order (matmul goes to cuBLAS).
OP_KERNELS: dict[str, tuple[str, ...]] = {
    "matmul": (),  # cuBLAS
    "take_rows": (),  # CuPy's own gather
    "colsum": ("colsum",),
    "softmax_fwd": ("softmax_fwd_rowmax", "softmax_fwd_rowsum", "softmax_fwd"),
    "softmax_bwd": ("softmax_bwd_rowdot", "softmax_bwd"),
    "softmax_cross_entropy_fwd": ("softmax_fwd_rowmax", "softmax_fwd_rowsum", "softmax_cross_entropy_fwd"),
    "canonical_value_and_delta": (
        "squared_error_value_and_delta",
        "sigmoid_binary_cross_entropy_value_and_delta",
        "softmax_fwd_rowmax",
        "softmax_fwd_rowsum",
        "softmax_cross_entropy_value_and_delta",
        "exp_poisson_value_and_delta",
    ),
}
OP_KERNELS.update(
    {
        name: (name,)
        for name in SPECS
        if name not in OP_KERNELS and not name.endswith(("_rowmax", "_rowsum", "_rowdot", "_value_and_delta"))
    }
)

KERNELS: dict[str, Any] = {}


def kernel(name: str) -> Any:
    """The CuPy kernel called ``name``, built from :data:`SPECS` on first use."""
    k = KERNELS.get(name)
    if k is None:
        import cupy

        k = KERNELS[name] = SPECS[name].build(cupy, name)
    return k


def all_kernels() -> dict[str, Any]:
    """Every kernel of this module, built (no device needed)."""
    return {name: kernel(name) for name in SPECS}


@functools.cache
def _unit_bounds(dtype: Any) -> tuple[float, float]:
    """[tiny, 1⁻] of ``dtype`` as Python floats: the clip range of the other tables."""
    info = np.finfo(dtype)
    one = np.dtype(dtype).type(1)
    return float(info.tiny), float(np.nextafter(one, np.dtype(dtype).type(0)))


# --- linear algebra (cuBLAS) and the bias gradient --------------------------


def matmul(a, b, out):
    """out = a @ b by cuBLAS GEMM straight into ``out`` (C-contiguous; see the module note).

    ``a`` may be a cupyx.scipy.sparse matrix (the input X of layer 1, or its transpose): then
    the product is cuSPARSE's sparse × dense (SpMM), copied into out; a is never densified."""
    import cupy

    if hasattr(a, "tocsr"):  # cupyx.scipy.sparse
        out[...] = a @ b
        return out
    return cupy.matmul(a, b, out=out)


def colsum(d, out):
    """out = Σ_rows d: the bias gradient ∂J/∂b = Σ_n δ_n."""
    return kernel("colsum")(d, out, axis=0)


# --- activations -------------------------------------------------------------


def _forward(name, z, b, out):
    kernel(name)(b, z, out)
    return out


def _backward(name, s, a, out):
    kernel(name)(s, a, out)
    return out


def identity_fwd(z, b, out, scratch, rows):
    return _forward("identity_fwd", z, b, out)


def identity_bwd(s, a, out, scratch, rows):
    return out if out is s else _backward("identity_bwd", s, a, out)


def sigmoid_fwd(z, b, out, scratch, rows):
    return _forward("sigmoid_fwd", z, b, out)


def sigmoid_bwd(s, a, out, scratch, rows):
    return _backward("sigmoid_bwd", s, a, out)


def tanh_fwd(z, b, out, scratch, rows):
    return _forward("tanh_fwd", z, b, out)


def tanh_bwd(s, a, out, scratch, rows):
    return _backward("tanh_bwd", s, a, out)


def relu_fwd(z, b, out, scratch, rows):
    return _forward("relu_fwd", z, b, out)


def relu_bwd(s, a, out, scratch, rows):
    return _backward("relu_bwd", s, a, out)


def leaky_relu_fwd(z, b, out, scratch, rows):
    return _forward("leaky_relu_fwd", z, b, out)


def leaky_relu_bwd(s, a, out, scratch, rows):
    return _backward("leaky_relu_bwd", s, a, out)


def softplus_fwd(z, b, out, scratch, rows):
    return _forward("softplus_fwd", z, b, out)


def softplus_bwd(s, a, out, scratch, rows):
    return _backward("softplus_bwd", s, a, out)


def exp_fwd(z, b, out, scratch, rows):
    return _forward("exp_fwd", z, b, out)


def exp_bwd(s, a, out, scratch, rows):
    return _backward("exp_bwd", s, a, out)


def _row_stats(z, b, rows):
    """rows[:, 0] = max_k (z + b), rows[:, 1] = Σ_k e^{z + b − max}; returns (m, 1) views of both."""
    top, total_exp = rows[:, :1], rows[:, 1:]
    kernel("softmax_fwd_rowmax")(z, b, rows[:, 0], axis=1)
    kernel("softmax_fwd_rowsum")(z, b, top, rows[:, 1], axis=1)
    return top, total_exp


def softmax_fwd(z, b, out, scratch, rows):
    # a_k = e^{z_k − max z} / Σ_j e^{z_j − max z}: the shift keeps exp from overflowing.
    top, total_exp = _row_stats(z, b, rows)
    kernel("softmax_fwd")(b, top, total_exp, z, out)
    return out


def softmax_bwd(s, a, out, scratch, rows):
    # δ = a ⊙ (s − Σ_k s_k a_k)
    kernel("softmax_bwd_rowdot")(s, a, rows[:, 0], axis=1)
    kernel("softmax_bwd")(s, a, rows[:, :1], out)
    return out


# --- losses --------------------------------------------------------------------


def squared_error_fwd(a, t, scratch, rows):
    return kernel("squared_error_fwd")(a, t)


def squared_error_bwd(a, t, c, out, scratch):
    kernel("squared_error_bwd")(a, t, c, out)
    return out


def binary_cross_entropy_fwd(a, t, scratch, rows):
    return kernel("binary_cross_entropy_fwd")(a, t, *_unit_bounds(a.dtype))


def binary_cross_entropy_bwd(a, t, c, out, scratch):
    kernel("binary_cross_entropy_bwd")(a, t, c, *_unit_bounds(a.dtype), out)
    return out


def cross_entropy_fwd(a, t, scratch, rows):
    return kernel("cross_entropy_fwd")(a, t, *_unit_bounds(a.dtype))


def cross_entropy_bwd(a, t, c, out, scratch):
    kernel("cross_entropy_bwd")(a, t, c, *_unit_bounds(a.dtype), out)
    return out


def poisson_fwd(a, t, scratch, rows):
    return kernel("poisson_fwd")(a, t, _unit_bounds(a.dtype)[0])


def poisson_bwd(a, t, c, out, scratch):
    kernel("poisson_bwd")(a, t, c, _unit_bounds(a.dtype)[0], out)
    return out


def sigmoid_binary_cross_entropy_fwd(z, t, scratch, rows):
    return kernel("sigmoid_binary_cross_entropy_fwd")(z, t)


def exp_poisson_fwd(z, t, scratch, rows):
    return kernel("exp_poisson_fwd")(z, t, _unit_bounds(z.dtype)[0])


def softmax_cross_entropy_fwd(z, t, scratch, rows):
    top, total_exp = _row_stats(z, 0.0, rows)
    return kernel("softmax_cross_entropy_fwd")(z, t, top, total_exp)


def canonical_value_and_delta(loss, z, a, t, c, delta, scratch, rows):
    """Σ_n J_n from the logits z for a canonical (output, loss) pair, and δ(L) = c (a − t) into delta."""
    if loss == "squared_error":
        return kernel("squared_error_value_and_delta")(z, a, t, c, delta)
    if loss == "binary_cross_entropy":
        return kernel("sigmoid_binary_cross_entropy_value_and_delta")(z, a, t, c, delta)
    if loss == "poisson":
        return kernel("exp_poisson_value_and_delta")(z, a, t, c, _unit_bounds(z.dtype)[0], delta)
    top, total_exp = _row_stats(z, 0.0, rows)
    return kernel("softmax_cross_entropy_value_and_delta")(z, a, t, c, top, total_exp, delta)


# --- optimizer updates (one pass over the flat vector, in place) --------------


def sgd_update(w, g, lr, scratch):
    kernel("sgd_update")(g, lr, w)
    return w


def momentum_update(w, g, v, lr, mu, scratch):
    kernel("momentum_update")(g, lr, mu, w, v)
    return w


def nesterov_update(w, g, v, lr, mu, scratch):
    kernel("nesterov_update")(g, lr, mu, w, v)
    return w


def adam_update(w, g, m, v, lr_t, beta1, beta2, eps, scratch):
    kernel("adam_update")(g, lr_t, beta1, beta2, eps, w, m, v)
    return w


def l2_grad(g, w, mask, alpha, scratch):
    kernel("l2_grad")(w, mask, alpha, g)
    return g


def outer_sgd_update(wt, b, a, delta, lr, scratch):
    kernel("outer_sgd_update")(a.reshape(-1, 1), delta, delta, lr, wt, b)
    return b


def take_rows(x, idx, out):
    """out ← x[idx]: CuPy's gather kernel straight into the reused batch buffer."""
    import cupy

    return cupy.take(x, idx, axis=0, out=out)
