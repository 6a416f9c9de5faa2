"""Derivatives of an MLP beyond the gradient: finite differences, gradient
checking, the input Jacobian, Hessian-vector products and the Hessian.

The point of backpropagation (docs/guide/finite_differences.rst): it gives all W gradient components in
O(W); finite differences need O(W) passes of O(W) each, O(W²). Both are here,
the second as the check on the first. Second order:

    hvp       H v in O(W): Pearlmutter's R-operator, R{f} = d/dr f(w + r v) at r = 0,
              applied to every line of the forward pass and of backprop
    hessian   "exact" (W R-passes), "finite_difference" (central differences of
              the backprop gradient) or "outer_product" (Gauss–Newton / Levenberg–Marquardt)

The passes are :mod:`bpgpu.engine`'s (forward, backprop, the seeded backward
pass of the Jacobian, the R-operator), so everything here runs on numpy, CuPy
and array_api_strict alike, and results stay on the net's device.

Notation (docs/guide/feedforward.rst, engine.py): z(l) = A(l−1) Wᵀ(l) + b(l), A(l) = g_l(z(l)),
J = c Σ_n ℓ(a_n(L), t_n) with c = 1/m ("mean") or 1 ("sum"), δ(l) = ∂J/∂z(l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bpgpu import engine
from bpgpu.network import MLP
from bpgpu.per_sample import parameter_jacobian

_DIFFERENCES = ("central", "forward")

# --- small shared pieces -----------------------------------------------------


def _check_method(method: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"method must be one of {', '.join(map(repr, allowed))}, got {method!r}")
    return method


def default_eps(net: MLP, method: str = "central") -> float:
    """The relative finite-difference step for the net's dtype.

    The error of a difference quotient is truncation plus rounding: central
    h² |f‴| / 6 + ε |f| / h, forward h |f″| / 2 + ε |f| / h (ε the machine
    epsilon). They balance at h ~ ε^{1/3} (central) and h ~ ε^{1/2} (forward):
    float64 6.1e-6 / 1.5e-8, float32 4.9e-3 / 3.5e-4. The step actually taken
    for w_i is h_i = eps · max(1, |w_i|), so it stays relative for large w_i.
    """
    eps = float(net.backend.xp.finfo(net.xp_dtype).eps)
    return eps ** (1.0 / 3.0) if _check_method(method, _DIFFERENCES) == "central" else eps**0.5


def _eps(net: MLP, eps: Any, method: str) -> float:
    if eps is None:
        return default_eps(net, method)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be a float in (0, 1) (a relative step), got {eps!r}")
    return float(eps)


def _steps(xp: Any, x: Any, eps: float) -> Any:
    """h = eps · max(1, |x|) elementwise."""
    return eps * xp.maximum(xp.abs(x), xp.ones_like(x))


# --- finite differences and the gradient check ---------------------------------


def numerical_gradient(net: MLP, X: Any, T: Any, method: str = "central", eps: float | None = None) -> Any:
    """dJ/dw by finite differences of the loss, perturbing each w_i in turn (docs/guide/finite_differences.rst).

    central: (J(w + h_i e_i) − J(w − h_i e_i)) / 2h_i, exactly 2W loss evaluations;
    forward: (J(w + h_i e_i) − J(w)) / h_i, exactly W + 1. Each evaluation is one
    forward pass, so the cost is O(W²) against backprop's O(W).

    eps: relative step, ``h_i = eps · max(1, |w_i|)``; default :func:`default_eps`
    (ε^{1/3} central, ε^{1/2} forward, ε the dtype's machine epsilon). The
    quotient divides by the step as actually represented, (w_i + h_i) − w_i.

    The perturbations go into a working copy of the parameters, never into
    ``net.params``, which are therefore bit-identical afterwards, even when a
    pass raises. Returns a new flat vector in the params layout, on the net's device.
    """
    _check_method(method, _DIFFERENCES)
    h = _eps(net, eps, method)
    X, T = net.check_inputs(X, T)
    xp, W = net.backend.xp, net.n_params
    ws = net.workspace(X.shape[0])
    w0 = net.params
    w = xp.asarray(w0, copy=True)
    up = w0 + _steps(xp, w0, h)
    down = w0 - _steps(xp, w0, h) if method == "central" else w0
    J_up, J_down = xp.empty(W, dtype=w0.dtype), xp.empty(W, dtype=w0.dtype)
    if method == "forward":
        J_down[...] = engine.loss(net, X, T, ws, w)
    for i in range(W):
        w[i] = up[i]
        J_up[i] = engine.loss(net, X, T, ws, w)
        if method == "central":
            w[i] = down[i]
            J_down[i] = engine.loss(net, X, T, ws, w)
        w[i] = w0[i]
    return (J_up - J_down) / (up - down)


# (rtol, atol per unit of max(1, |J|)) for the gradient check: 14 to 30 times
# the largest max_rel_error measured at the default step on correct small
# random nets with smooth activations, every (output, loss) pair, both
# reductions (float64: 3e-8 central, 3e-6 forward; float32: 3.4e-4, 7e-3).
TOLERANCES = {
    ("float64", "central"): (1e-6, 1e-9),
    ("float64", "forward"): (1e-4, 1e-6),
    ("float32", "central"): (1e-2, 1e-3),
    ("float32", "forward"): (1e-1, 1e-2),
}


@dataclass(frozen=True)
class GradientCheck:
    """Backprop against finite differences, element by element.

    max_abs_error: ``max_i |g_i − n_i|``.

    max_rel_error: ``max_i |g_i − n_i| / max(|g_i|, |n_i|, atol / rtol)``; an element
        whose size is below atol / rtol is thus judged against atol.

    worst: the parameter with the largest relative error, as (layer, j, k) in
        Θ(layer) coordinates (row j, column k; k = 0 is the bias): ``net.theta(layer)[j, k]``.

    passed: max_rel_error ≤ rtol, i.e. ``|g_i − n_i| ≤ max(rtol · max(|g_i|, |n_i|), atol)`` for all i.
    """

    max_abs_error: float
    max_rel_error: float
    worst: tuple[int, int, int]
    passed: bool
    rtol: float
    atol: float


def check_gradient(
    net: MLP,
    X: Any,
    T: Any,
    method: str = "central",
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> GradientCheck:
    """Compare the backprop gradient with :func:`numerical_gradient`, in one line::

        assert bp.check_gradient(net, X, T).passed

    Default tolerances per dtype and method (``TOLERANCES``): float64 central
    rtol 1e-6, atol 1e-9 · ``max(1, |J|)``; float64 forward 1e-4, 1e-6 · ``max(1, |J|)``;
    float32 central 1e-2, 1e-3 · ``max(1, |J|)``; float32 forward 1e-1, 1e-2 · ``max(1, |J|)``.
    A float32 check is coarse by nature (the loss itself carries ~1e-7 relative
    rounding); check in float64 to catch small errors. Kinked activations (relu,
    leaky_relu) need every pre-activation farther than the step from 0.
    """
    _check_method(method, _DIFFERENCES)
    numeric = numerical_gradient(net, X, T, method=method, eps=eps)
    J, grad = net.loss_and_gradient(X, T)
    default_rtol, atol_per_loss = TOLERANCES[(net.dtype, method)]
    rtol = default_rtol if rtol is None else float(rtol)
    atol = atol_per_loss * max(1.0, abs(J)) if atol is None else float(atol)
    if not (rtol > 0.0 and atol >= 0.0):
        raise ValueError(f"rtol must be > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
    xp = net.backend.xp
    diff = xp.abs(grad - numeric)
    floor = xp.full_like(diff, atol / rtol)
    rel = diff / xp.maximum(xp.maximum(xp.abs(grad), xp.abs(numeric)), floor)
    worst = int(xp.argmax(rel))
    max_rel = float(xp.max(rel))
    return GradientCheck(
        max_abs_error=float(xp.max(diff)),
        max_rel_error=max_rel,
        worst=net.layout.index(worst),
        passed=max_rel <= rtol,
        rtol=rtol,
        atol=atol,
    )


# --- the input Jacobian ----------------------------------------------------------


def jacobian(net: MLP, X: Any, method: str = "backprop", eps: float | None = None, wrt: str = "inputs") -> Any:
    """∂y_k/∂x_i for every sample: shape (m, n_L, n_0), y = a(L) the net's output
    (through the output activation, softmax's coupling included).

    wrt="params": ∂y_nk/∂w instead, shape (m, n_L, W), each row in the params layout, by
    the same backward pass of the output seeds and the per-sample outer products
    δ_n(l) [1, a_n(l−1)]ᵀ (:func:`bpgpu.per_sample.parameter_jacobian`; backprop only).

    backprop: the Jacobian recursion (docs/guide/jacobian_hessian.rst), δ(L) = ∂y_k/∂z(L) for all n_L outputs and m
    samples at once, propagated back as one batched (n_L·m)-row pass;
    ∂y/∂x = δ(1) W(1). Cost: the backward pass n_L times over.
    finite_difference: central differences in each input x_i (all samples at
    once), 2 n_0 forward passes, step ``eps · max(1, |x_ni|)`` (default ε^{1/3}).
    """
    _check_method(method, ("backprop", "finite_difference"))
    if wrt not in ("inputs", "params"):
        raise ValueError(f"wrt must be 'inputs' or 'params', got {wrt!r}")
    if wrt == "params":
        if method != "backprop":
            raise ValueError(
                f"wrt='params' is computed by backprop only, got method={method!r} "
                f"(bp.numerical_gradient differences the loss in w)"
            )
        return parameter_jacobian(net, X)
    if method == "backprop":
        compiled = engine.compiled_input_jacobian(net, X)  # numpy backend: one numba call
        if compiled is not None:
            return compiled
    X, _ = net.check_inputs(X)
    ws = net.workspace(X.shape[0])
    if method == "finite_difference":
        return _jacobian_differences(net, X, ws, _eps(net, eps, "central"))
    engine.forward(net, X, ws, net.params)
    return engine.input_jacobian(net, engine.layer_outputs(X, ws))


def _jacobian_differences(net: MLP, X: Any, ws: Any, eps: float) -> Any:
    xp = net.backend.xp
    steps = _steps(xp, X, eps)
    columns = []
    for i in range(X.shape[1]):
        up, down = xp.asarray(X, copy=True), xp.asarray(X, copy=True)
        up[:, i] = X[:, i] + steps[:, i]
        down[:, i] = X[:, i] - steps[:, i]
        y_up = xp.asarray(engine.forward(net, up, ws, net.params), copy=True)
        y_down = engine.forward(net, down, ws, net.params)
        columns.append((y_up - y_down) / xp.reshape(up[:, i] - down[:, i], (-1, 1)))
    return xp.stack(columns, axis=2)


# --- Hessian-vector products: Pearlmutter's R-operator --------------------------


def hvp(net: MLP, X: Any, T: Any, v: Any) -> Any:
    """The exact Hessian-vector product H v = d/dr ∇J(w + r v) at r = 0, in O(W).

    Pearlmutter's R-operator applied to the forward pass and to backprop
    (see :func:`bpgpu.engine.r_pass`), with the activations' second derivatives g″ and the
    loss's second derivative for every accepted (output, loss) pair and both
    reductions. About twice the cost of one gradient; no Hessian is formed.
    v: a flat vector of length n_params in the params layout. Returns a new one.
    """
    X, T = net.check_inputs(X, T)
    v = net.flat_vector(v, "v")
    return engine.hessian_vector_products(net, X, T, net.backend.xp.reshape(v, (1, -1)))[0, :]


# --- the Hessian -------------------------------------------------------------------


def hessian(net: MLP, X: Any, T: Any, method: str = "exact", eps: float | None = None) -> Any:
    """The W × W Hessian ∂²J/∂w_i∂w_j in the params layout, on the net's device.

    exact: H e_i for every i by the R-operator (:func:`hvp`), batched over
        columns (:func:`bpgpu.engine.exact_hessian`): W R-passes, O(W²). Exact up to
        rounding (for relu and leaky_relu: the Hessian almost everywhere, g″ = 0 off
        the kink); on the numpy backend one compiled call that uses the symmetry of H,
        which it returns exactly symmetric, an H of 32 MiB or more in the memory of the
        last such H that nothing reads any more (:mod:`bpgpu.kernels.recycle`: a loop of
        calls then skips the kernel's zeroing of fresh pages).
    finite_difference: column i = (∇J(w + h_i e_i) − ∇J(w − h_i e_i)) / 2h_i with
        the backprop gradient, 2W gradients, ``h_i = eps · max(1, |w_i|)`` (default
        ε^{1/3}). Not exactly symmetric; error O(h²) + O(ε/h).
    outer_product: the Gauss–Newton matrix, always symmetric positive semidefinite,
        O(m n_L W²), memory O(m n_L W):

        * canonical pairs (identity + squared_error, sigmoid + binary_cross_entropy,
          softmax + cross_entropy): G = c Σ_n J_nᵀ M_n J_n with J_n = ∂z_n(L)/∂w and
          M_n = ∂²ℓ/∂z² = I, diag(a(1 − a)), diag(a) − a aᵀ. For squared error this
          is the outer-product (Levenberg–Marquardt) H ≈ Σ_n ∇y_n ∇y_nᵀ.
        * every other pair: the general Gauss–Newton form G = c Σ_n J_nᵀ diag(ℓ″) J_n
          with J_n = ∂a_n(L)/∂w (the Jacobian of the outputs) and ℓ″ = ∂²ℓ/∂a²
          (squared error: 1, so again Σ_n ∇y_n ∇y_nᵀ with y = a(L)).

        H − G = c Σ_n Σ_k r_nk ∇²u_nk (u = z(L) with r = a − t for canonical pairs;
        u = a(L) with r = ∂ℓ/∂a otherwise), so G is exact when (1) the residual r
        is zero on every sample: T = net.forward(X) with squared_error (any
        output), binary_cross_entropy, or softmax + cross_entropy (not sigmoid +
        cross_entropy, whose ∂ℓ/∂a = −t/a vanishes only at t = 0), or
        (2) u is linear in w: a
        net without hidden layer (linear, logistic or softmax regression) with
        its canonical loss, for any targets. A deeper net is not linear in w
        even with identity activations (z(L) is a product of the Θs), so there G
        is exact only at zero residual.
    """
    _check_method(method, ("exact", "finite_difference", "outer_product"))
    X, T = net.check_inputs(X, T)
    if method == "finite_difference":
        return _hessian_differences(net, X, T, _eps(net, eps, "central"))
    if method == "outer_product":
        return _gauss_newton(net, X, T)
    return engine.exact_hessian(net, X, T)


def _hessian_differences(net: MLP, X: Any, T: Any, eps: float) -> Any:
    xp, w0 = net.backend.xp, net.params
    ws = net.workspace(X.shape[0])
    w = xp.asarray(w0, copy=True)
    up, down = w0 + _steps(xp, w0, eps), w0 - _steps(xp, w0, eps)
    g_up, g_down = xp.empty_like(w0), xp.empty_like(w0)
    columns = []
    for i in range(net.n_params):
        for at, g in ((up, g_up), (down, g_down)):
            w[i] = at[i]
            engine.forward(net, X, ws, w)
            engine.backward(net, X, T, ws, w, g)
        columns.append(g_up - g_down)
        w[i] = w0[i]
    return xp.stack(columns, axis=1) / (up - down)[None, :]


def _gauss_newton(net: MLP, X: Any, T: Any) -> Any:
    xp, L, m = net.backend.xp, net.n_layers, X.shape[0]
    ws = net.workspace(m)
    engine.forward(net, X, ws, net.params)
    A = engine.layer_outputs(X, ws)
    c = net.reduction_factor(m)
    Ja = engine.seeded_gradients(net, A, engine.output_seeds(net, A[L], through_output=True))
    if net.loss_function.is_canonical(net.activations[-1]):
        # M J_z = J_a since M = ∂a/∂z for a canonical pair, so G = c J_zᵀ J_a.
        Jz = engine.seeded_gradients(net, A, engine.output_seeds(net, A[L], through_output=False))
        return c * (Jz.T @ Ja)
    curvature = engine.loss_curvature(net, A[L], T)  # (m, n_L)
    weights = xp.reshape(curvature.T, (-1, 1))  # rows ordered (k, n) like Ja
    return c * ((weights * Ja).T @ Ja)


__all__ = [
    "GradientCheck",
    "TOLERANCES",
    "check_gradient",
    "default_eps",
    "hessian",
    "hvp",
    "jacobian",
    "numerical_gradient",
]
