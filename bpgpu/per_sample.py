"""Derivatives per sample with respect to the parameters w: the parameter Jacobian,
per-sample gradients and the Gauss–Newton factor, all by one vectorised backprop.

Notation (docs/guide/feedforward.rst, network.py): z(l) = A(l−1) Wᵀ(l) + b(l), A(l) = g_l(z(l)), a_0 = 1,
J = c Σ_n s_n ℓ_n with ℓ_n = ℓ(a_n(L), t_n), c = 1/m or 1/Σ s ("mean") or 1 ("sum").

Backprop of a seed δ_n(L) = ∂u_n/∂z_n(L) for a scalar u_n of sample n gives, by the
delta rule δ(l−1) = (δ(l) W(l)) ⊙ g′(z(l−1)), every δ_n(l), and then

    ∂u_n/∂Θ(l) = δ_n(l) [1, a_n(l−1)]ᵀ              (the outer product δ·aᵀ, per sample)

laid out like Θ(l) in the flat vector. Stacks of seeds (K, m, n_L) go through as one
batched pass, and the outer products of all samples are one broadcast, so nothing
loops over samples (Opacus's per-sample gradients, the Jacobian recursion of docs/guide/jacobian_hessian.rst):

    parameter_jacobian    seeds ∂y_k/∂z(L) (y = a(L)):              (m, n_L, W) = ∂y_nk/∂w
    per_sample_gradients  seed s_n ∂ℓ_n/∂z(L):                      (m, W) = s_n ∂ℓ_n/∂w
    gauss_newton_factor   seeds √s_n Fᵀ_n ∂u/∂z(L):                 (m n_L, W) = R with
                          RᵀR = Σ_n s_n J_nᵀ M_n J_n = G / c, the Gauss–Newton matrix of
                          ``bp.hessian(method="outer_product")`` without its factor c.

The factor: M_n = ∂²ℓ/∂u² = F_n F_nᵀ, with u = z(L) for a canonical (output, loss) pair
and u = a(L) otherwise:

    identity + squared_error         M = I                 Fᵀ = I
    sigmoid + binary_cross_entropy   M = diag(a(1 − a))    Fᵀ = diag(√(a(1 − a)))
    softmax + cross_entropy          M = diag(a) − a aᵀ    Fᵀ = diag(√a) − √a aᵀ   (Σ_k a_k = 1)
    exp + poisson                    M = diag(a)           Fᵀ = diag(√a)
    any other pair (u = a(L))        M = diag(ℓ″)          Fᵀ = diag(√ℓ″)

(for softmax: (diag(√a) − a √aᵀ)(diag(√a) − √a aᵀ) = diag(a) − 2 a aᵀ + a (Σ_k a_k) aᵀ).

On the numpy backend each of these is one compiled call (``engine.compiled_*``, the same
equations in bpgpu/kernels/compiled.py); elsewhere the engine's array passes below.
"""

from __future__ import annotations

from typing import Any

from bpgpu import engine, validation
from bpgpu.network import MLP


def _forward(net: MLP, X: Any) -> tuple[Any, list[Any]]:
    """One forward pass at the net's parameters: (workspace, [A(0) = X, A(1), ..., A(L)])."""
    ws = net.workspace(X.shape[0])
    engine.forward(net, X, ws, net.params)
    return ws, engine.layer_outputs(X, ws)


def _scaled_unit_seeds(net: MLP, a: Any, scale: Any) -> Any:
    """e_k ⊙ scale_n for k = 1..n_L and every sample n: (n_L, m, n_L); scale (m, n_L)."""
    return engine.output_seeds(net, a, through_output=False) * net.backend.xp.permute_dims(scale, (1, 0))[:, :, None]


def _host_weights(sample_weight: Any, m: int) -> Any:
    return None if sample_weight is None else validation.sample_weight(sample_weight, m)


# --- public ----------------------------------------------------------------------


def parameter_jacobian(net: MLP, X: Any) -> Any:
    """∂y_nk/∂w for every sample n and output k, y = a(L) (through the output activation,
    softmax's coupling included): shape (m, n_L, W), each row in the params layout.

    One forward pass and one backward pass of the n_L seeds ∂y_k/∂z(L) for all samples at
    once; the cost is the backward pass n_L times over plus the m n_L W outer products.
    """
    compiled = engine.compiled_parameter_jacobian(net, X)  # numpy backend: one numba call
    if compiled is not None:
        return compiled
    X, _ = net.check_inputs(X)
    m, xp = X.shape[0], net.backend.xp
    _, A = _forward(net, X)
    rows = engine.seeded_gradients(net, A, engine.output_seeds(net, A[-1], through_output=True))  # rows (k, n)
    return xp.permute_dims(xp.reshape(rows, (net.sizes[-1], m, net.n_params)), (1, 0, 2))


def per_sample_gradients(net: MLP, X: Any, T: Any, sample_weight: Any = None) -> Any:
    """The gradient of each sample's own loss, ∂ℓ_n/∂w (times s_n with ``sample_weight``):
    shape (m, W), each row in the params layout, so that c Σ_n row_n = ∂J/∂w
    (``net.gradient(X, T, sample_weight)``; c = 1/m, 1/Σ s or 1).

    One forward pass, one backward pass of δ_n(L) = s_n ∂ℓ_n/∂z(L) and the per-sample
    outer products δ_n(l) [1, a_n(l−1)]ᵀ of every layer, all samples at once
    (what torch.func's ``vmap(grad(loss))`` computes, without a per-sample program).
    """
    weights = None
    if sample_weight is not None:  # the weights' length is checked against the checked X
        X, T = net.check_inputs(X, T)
        weights = net.weighting(_host_weights(sample_weight, X.shape[0]))
    # X and T as given, or checked above: the compiled call's driver checks what its kernel needs
    compiled = engine.compiled_per_sample_gradients(net, X, T, None if weights is None else weights[0])
    if compiled is not None:
        return compiled
    X, T = net.check_inputs(X, T)
    m, xp = X.shape[0], net.backend.xp
    ws, A = _forward(net, X)
    engine.output_delta(net, T, ws, weights)  # δ(L) = c s_n ∂ℓ_n/∂z(L)
    c = net.reduction_factor(m, weights)
    return engine.seeded_gradients(net, A, xp.reshape(ws.D[net.n_layers] / c, (1, m, -1)))


def gauss_newton_factor(net: MLP, X: Any, T: Any, sample_weight: Any = None) -> Any:
    """R with RᵀR = Σ_n s_n J_nᵀ M_n J_n, the Gauss–Newton matrix G of
    ``bp.hessian(net, X, T, method="outer_product")`` divided by its c (module docstring):
    shape (m n_L, W), rows ordered (k, n) (row k m + n). For squared error with an
    identity output it is the Jacobian of the residuals a − t, Levenberg–Marquardt's J.
    """
    X, T = net.check_inputs(X, T)
    weights = net.weighting(_host_weights(sample_weight, X.shape[0]))
    return gauss_newton_rows(net, X, T, None if weights is None else weights[0])


def gauss_newton_rows(net: MLP, X: Any, T: Any, s_col: Any = None) -> Any:
    """:func:`gauss_newton_factor` on a batch already on the backend (X, T as ``net.check_inputs``
    returns them; s_col an (m, 1) column of weights or None), for callers that chunk the data."""
    compiled = engine.compiled_gauss_newton_rows(net, X, T, s_col)  # numpy backend: one numba call
    if compiled is not None:
        return compiled
    return engine.seeded_gradients(net, *gauss_newton_seeds(net, X, T, s_col))


def gauss_newton_seeds(net: MLP, X: Any, T: Any, s_col: Any = None, A: Any = None) -> tuple[list[Any], Any]:
    """(A, seeds): the layer outputs [A(0) = X, ..., A(L)] and the δ(L) seeds (n_L, m, n_L)
    √s_n Fᵀ_n ∂u/∂z(L) whose backprop (``engine.seeded_deltas``) gives the Gauss–Newton
    factor's rows [1, a_n(l−1)] ⊗ δ_kn(l), for callers that use the δ(l) without forming R.
    ``A``: the layer outputs of a forward pass already made on X at ``net.params``
    (``engine.layer_outputs``), which is then not repeated; None: one is made."""
    xp, L = net.backend.xp, net.n_layers
    if A is None:
        _, A = _forward(net, X)
    a, output, loss = A[-1], net.activations[-1], net.loss_function
    if loss.is_canonical(output):
        if output.name == "identity":
            seeds = engine.output_seeds(net, a, through_output=False)
        elif output.name == "sigmoid":  # M = diag(a (1 − a))
            seeds = _scaled_unit_seeds(net, a, xp.sqrt(a * (1.0 - a)))
        elif output.name == "exp":  # exp + poisson: M = ∂²ℓ/∂z² = diag(e^z) = diag(a)
            seeds = _scaled_unit_seeds(net, a, xp.sqrt(a))
        else:  # softmax: row k of Fᵀ is √a_k (e_k − a)
            eye = xp.eye(a.shape[1], dtype=a.dtype)
            seeds = xp.permute_dims(xp.sqrt(a)[:, :, None] * (eye[None, :, :] - a[:, None, :]), (1, 0, 2))
    else:
        seeds = engine.times_g1(net, L, _scaled_unit_seeds(net, a, xp.sqrt(engine.loss_curvature(net, a, T))), a)
    if s_col is not None:
        seeds = seeds * xp.sqrt(s_col)[None, :, :]
    return A, seeds


__all__ = [
    "gauss_newton_factor",
    "gauss_newton_rows",
    "gauss_newton_seeds",
    "parameter_jacobian",
    "per_sample_gradients",
]
