"""Derivatives of an MLP beyond the gradient: finite differences, gradient
checking, the input Jacobian, Hessian-vector products and the Hessian.

The point of backpropagation (docs/guide/finite_differences.rst): it gives all W gradient components in
O(W); finite differences need O(W) passes of O(W) each, O(W²). Both are here,
the second as the check on the first. Second order:

    hvp       H v in O(W): Pearlmutter's R-operator, R{f} = d/dr f(w + r v) at r = 0,
              applied to every line of the forward pass and of backprop
    hessian   "exact" (W R-passes), "finite_difference" (central differences of
              the backprop gradient) or "outer_product" (Gauss–Newton / Levenberg–Marquardt)

Everything goes through the net's array namespace (``net.backend.xp``) and
kernel table (``net.backend.ops``), so it runs on numpy, CuPy and
array_api_strict alike, and results stay on the net's device.

Notation (docs/guide/feedforward.rst, network.py): z(l) = A(l−1) Wᵀ(l) + b(l), A(l) = g_l(z(l)),
J = c Σ_n ℓ(a_n(L), t_n) with c = 1/m ("mean") or 1 ("sum"), δ(l) = ∂J/∂z(l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bpgpu.kernels.generic import _clip_unit
from bpgpu.network import MLP

_DIFFERENCES = ("central", "forward")

# Second derivatives g″(z) written through the output a = g(z), like the g′ of
# the backward kernels (activations.py). None: g″ = 0 (almost everywhere for
# the kinked ones). softmax, the only non-elementwise g, is handled on its own.
_G2 = {
    "identity": None,
    "relu": None,
    "leaky_relu": None,
    "sigmoid": lambda xp, a: a * (1.0 - a) * (1.0 - 2.0 * a),  # σ″ = σ′ (1 − 2σ)
    "tanh": lambda xp, a: -2.0 * a * (1.0 - a * a),  # tanh″ = −2 tanh · tanh′
    "softplus": lambda xp, a: -xp.expm1(-a) * xp.exp(-a),  # σ(z)(1 − σ(z)), σ = 1 − e^{−a}
}

# ∂²ℓ/∂a² per sample and output (diagonal for all three losses), with a
# clipped away from 0 and 1 exactly as the ∂ℓ/∂a kernels clip it.
_LOSS_CURVATURE = {
    "squared_error": lambda xp, a, t: xp.ones_like(a),
    "binary_cross_entropy": lambda xp, a, t: t / _clip_unit(a) ** 2 + (1.0 - t) / (1.0 - _clip_unit(a)) ** 2,
    "cross_entropy": lambda xp, a, t: t / _clip_unit(a) ** 2,
}

# How many Hessian columns one batched R-pass carries: bounds its memory to
# about this many elements per intermediate array.
_BATCH_ELEMENTS = 1 << 22


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
    eps = float(net.backend.xp.finfo(net._xp_dtype).eps)
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


def _times_g1(net: MLP, l: int, s: Any, a: Any) -> Any:
    """s ⊙ g′_l(z(l)) (softmax: S s per row, S = diag(a) − a aᵀ) through layer l's
    backward kernel. s is (..., m, n_l), a is (m, n_l); returns a new array."""
    xp = net.backend.xp
    shape = tuple(s.shape)
    s2 = xp.reshape(s, (-1, shape[-1]))
    a2 = a if tuple(s2.shape) == tuple(a.shape) else xp.reshape(xp.broadcast_to(a, shape), tuple(s2.shape))
    out, scratch = xp.empty_like(s2), xp.empty_like(s2)
    rows = xp.empty((s2.shape[0], 2), dtype=s2.dtype)
    getattr(net.backend.ops, net.activations[l - 1].bwd)(s2, a2, out, scratch, rows)
    return xp.reshape(out, shape)


def _mT(xp: Any, x: Any) -> Any:
    return xp.permute_dims(x, (0, 2, 1))


def _forward_backward(net: MLP, X: Any, T: Any) -> Any:
    """One forward pass and backprop at the net's parameters: the workspace then
    holds A(l) and δ(l) for every layer."""
    ws = net.workspace(X.shape[0])
    net._forward(X, ws, net.params)
    net._backward(X, T, ws, net.params, ws.grad)
    return ws


def _output_residual(net: MLP, ws: Any, T: Any, m: int) -> Any:
    """c ∂ℓ/∂a(L) through the loss's backward kernel (clipping and all)."""
    xp, a = net.backend.xp, ws.A[net.n_layers]
    out, scratch = xp.empty_like(a), xp.empty_like(a)
    getattr(net.backend.ops, f"{net.loss_function.name}_bwd")(a, T, net.reduction_factor(m), out, scratch)
    return out


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
    X, T = net._inputs(X, T)
    xp, W = net.backend.xp, net.n_params
    ws = net.workspace(X.shape[0])
    w0 = net.params
    w = xp.asarray(w0, copy=True)
    up = w0 + _steps(xp, w0, h)
    down = w0 - _steps(xp, w0, h) if method == "central" else w0
    J_up, J_down = xp.empty(W, dtype=w0.dtype), xp.empty(W, dtype=w0.dtype)
    if method == "forward":
        J_down[...] = net._loss(X, T, ws, w)
    for i in range(W):
        w[i] = up[i]
        J_up[i] = net._loss(X, T, ws, w)
        if method == "central":
            w[i] = down[i]
            J_down[i] = net._loss(X, T, ws, w)
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


def _theta_index(net: MLP, i: int) -> tuple[int, int, int]:
    """Flat index i -> (l, j, k) with w_i = Θ(l)[j, k] (Θ(l) stored column-major)."""
    for l in range(1, net.n_layers + 1):
        if i < net._offsets[l]:
            column, row = divmod(i - net._offsets[l - 1], net.sizes[l])
            return l, row, column
    raise IndexError(f"parameter index {i} out of range for n_params={net.n_params}")


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
        worst=_theta_index(net, worst),
        passed=max_rel <= rtol,
        rtol=rtol,
        atol=atol,
    )


# --- the input Jacobian ----------------------------------------------------------


def _output_seeds(net: MLP, a: Any, through_output: bool) -> Any:
    """δ(L) seeds of shape (n_L, m, n_L): row k holds ∂y_k/∂z(L) per sample
    (``through_output``: y = a(L), so g′ ⊙ e_k, softmax S e_k) or ∂z_k/∂z(L) = e_k."""
    xp = net.backend.xp
    n, m = net.sizes[-1], a.shape[0]
    e = xp.broadcast_to(xp.reshape(xp.eye(n, dtype=a.dtype), (n, 1, n)), (n, m, n))
    return _times_g1(net, net.n_layers, e, a) if through_output else e


def _seeded_deltas(net: MLP, A: list, D: Any):
    """Backprop of a stack of seeds: yields (l, δ(l)) for l = L..1, each (K, m, n_l),
    δ(l−1) = (δ(l) W(l)) ⊙ g′ (the Jacobian recursion of docs/guide/jacobian_hessian.rst), all K·m rows in one pass."""
    for l in range(net.n_layers, 0, -1):
        yield l, D
        if l > 1:
            D = _times_g1(net, l - 1, D @ net._wt(l, net.params).T, A[l - 1])


def jacobian(net: MLP, X: Any, method: str = "backprop", eps: float | None = None) -> Any:
    """∂y_k/∂x_i for every sample: shape (m, n_L, n_0), y = a(L) the net's output
    (through the output activation, softmax's coupling included).

    backprop: the Jacobian recursion (docs/guide/jacobian_hessian.rst), δ(L) = ∂y_k/∂z(L) for all n_L outputs and m
    samples at once, propagated back as one batched (n_L·m)-row pass;
    ∂y/∂x = δ(1) W(1). Cost: the backward pass n_L times over.
    finite_difference: central differences in each input x_i (all samples at
    once), 2 n_0 forward passes, step ``eps · max(1, |x_ni|)`` (default ε^{1/3}).
    """
    _check_method(method, ("backprop", "finite_difference"))
    X, _ = net._inputs(X)
    xp, ws = net.backend.xp, net.workspace(X.shape[0])
    if method == "finite_difference":
        return _jacobian_differences(net, X, ws, _eps(net, eps, "central"))
    net._forward(X, ws, net.params)
    A = [X] + ws.A[1:]
    for l, D in _seeded_deltas(net, A, _output_seeds(net, A[-1], through_output=True)):
        if l == 1:
            dX = D @ net._wt(1, net.params).T  # (n_L, m, n_0)
    return xp.permute_dims(dX, (1, 0, 2))


def _jacobian_differences(net: MLP, X: Any, ws: Any, eps: float) -> Any:
    xp = net.backend.xp
    steps = _steps(xp, X, eps)
    columns = []
    for i in range(X.shape[1]):
        up, down = xp.asarray(X, copy=True), xp.asarray(X, copy=True)
        up[:, i] = X[:, i] + steps[:, i]
        down[:, i] = X[:, i] - steps[:, i]
        y_up = xp.asarray(net._forward(up, ws, net.params), copy=True)
        y_down = net._forward(down, ws, net.params)
        columns.append((y_up - y_down) / xp.reshape(up[:, i] - down[:, i], (-1, 1)))
    return xp.stack(columns, axis=2)


# --- Hessian-vector products: Pearlmutter's R-operator --------------------------


def _split(net: MLP, V: Any, l: int) -> tuple[Any, Any]:
    """Layer l of a stack of flat vectors V (k, W): bias (k, n_l) and Wᵀ (k, n_{l−1}, n_l)."""
    n_in, n_out = net.sizes[l - 1], net.sizes[l]
    block = net.backend.xp.reshape(V[:, net._offsets[l - 1] : net._offsets[l]], (V.shape[0], n_in + 1, n_out))
    return block[:, 0, :], block[:, 1:, :]


def _r_output_delta(net: MLP, ws: Any, T: Any, Rz: Any, Ra: Any, m: int) -> Any:
    """R{δ(L)} = c ∂²ℓ/∂z(L)² R{z(L)}.

    Canonical pairs: δ(L) = c (a − t), so R{δ(L)} = c R{a} (for softmax +
    cross_entropy that is the loss's Hessian when every target row sums to 1,
    which that δ(L) assumes too). Otherwise
    δ(L) = J_gᵀ r with r = c ∂ℓ/∂a, and
    R{δ(L)} = J_gᵀ (c ℓ″ ⊙ R{a}) + [second-order term of g contracted with r]:
    elementwise g: r ⊙ g″ ⊙ R{z}; softmax (δ = a ⊙ (r − aᵀr)):
    R{a} ⊙ (r − aᵀr) − a (R{a}ᵀ r).
    """
    xp, L = net.backend.xp, net.n_layers
    output, a = net.activations[-1], ws.A[L]
    c = net.reduction_factor(m)
    if net.loss_function.is_canonical(output):
        return c * Ra
    curvature = c * _LOSS_CURVATURE[net.loss_function.name](xp, a, T)
    RD = _times_g1(net, L, curvature * Ra, a)
    r = _output_residual(net, ws, T, m)
    if output.name == "softmax":
        return RD + Ra * (r - xp.sum(a * r, axis=-1, keepdims=True)) - a * xp.sum(Ra * r, axis=-1, keepdims=True)
    g2 = _G2[output.name]
    return RD if g2 is None else RD + r * g2(xp, a) * Rz


def _r_pass(net: MLP, X: Any, T: Any, ws: Any, V: Any) -> Any:
    """H vᵣ for every row vᵣ of V (k, W), after :func:`_forward_backward`; returns (k, W).

    Forward:  R{z(l)} = R{A(l−1)} Wᵀ(l) + A(l−1) Vᵀ_W(l) + v_b(l),  R{A(l)} = g′ ⊙ R{z(l)}   (R{A(0)} = 0)
    Backward: R{δ(L)} from the loss (_r_output_delta);
              s(l) = δ(l+1) W(l+1),  R{s(l)} = R{δ(l+1)} W(l+1) + δ(l+1) V_W(l+1),
              R{δ(l)} = R{s(l)} ⊙ g′ + s(l) ⊙ g″ ⊙ R{z(l)};
    Gradient: R{∂J/∂Wᵀ(l)} = R{A(l−1)}ᵀ δ(l) + A(l−1)ᵀ R{δ(l)},  R{∂J/∂b(l)} = Σ_n R{δ(l)}.
    """
    xp, L, w, m = net.backend.xp, net.n_layers, net.params, X.shape[0]
    A, D = [X] + ws.A[1:], ws.D
    Rz, RA = [None] * (L + 1), [None] * (L + 1)
    for l in range(1, L + 1):
        vb, vwt = _split(net, V, l)
        Rz[l] = A[l - 1] @ vwt + vb[:, None, :]
        if RA[l - 1] is not None:
            Rz[l] = Rz[l] + RA[l - 1] @ net._wt(l, w)
        RA[l] = _times_g1(net, l, Rz[l], A[l])
    RD = _r_output_delta(net, ws, T, Rz[L], RA[L], m)
    blocks = []
    for l in range(L, 0, -1):
        rgwt = A[l - 1].T @ RD
        if RA[l - 1] is not None:
            rgwt = rgwt + _mT(xp, RA[l - 1]) @ D[l]
        blocks.append(xp.concat([xp.sum(RD, axis=1)[:, None, :], rgwt], axis=1))
        if l > 1:
            wt, (_, vwt) = net._wt(l, w), _split(net, V, l)
            Rs = RD @ wt.T + D[l] @ _mT(xp, vwt)
            RD = _times_g1(net, l - 1, Rs, A[l - 1])
            g2 = _G2[net.activations[l - 2].name]
            if g2 is not None:
                RD = RD + (D[l] @ wt.T) * g2(xp, A[l - 1]) * Rz[l - 1]
    k = V.shape[0]
    return xp.concat([xp.reshape(b, (k, -1)) for b in reversed(blocks)], axis=1)


def hvp(net: MLP, X: Any, T: Any, v: Any) -> Any:
    """The exact Hessian-vector product H v = d/dr ∇J(w + r v) at r = 0, in O(W).

    Pearlmutter's R-operator applied to the forward pass and to backprop
    (see :func:`_r_pass`), with the activations' second derivatives g″ and the
    loss's second derivative for every accepted (output, loss) pair and both
    reductions. About twice the cost of one gradient; no Hessian is formed.
    v: a flat vector of length n_params in the params layout. Returns a new one.
    """
    X, T = net._inputs(X, T)
    v = net.flat_vector(v, "v")
    ws = _forward_backward(net, X, T)
    return _r_pass(net, X, T, ws, net.backend.xp.reshape(v, (1, -1)))[0, :]


# --- the Hessian -------------------------------------------------------------------


def hessian(net: MLP, X: Any, T: Any, method: str = "exact", eps: float | None = None) -> Any:
    """The W × W Hessian ∂²J/∂w_i∂w_j in the params layout, on the net's device.

    exact: H e_i for every i by the R-operator (:func:`hvp`), batched over
        columns: W R-passes, O(W²). Exact up to rounding (for relu and
        leaky_relu: the Hessian almost everywhere, g″ = 0 off the kink).
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
    X, T = net._inputs(X, T)
    if method == "finite_difference":
        return _hessian_differences(net, X, T, _eps(net, eps, "central"))
    if method == "outer_product":
        return _gauss_newton(net, X, T)
    xp, W = net.backend.xp, net.n_params
    ws = _forward_backward(net, X, T)
    per_column = X.shape[0] * max(net.sizes) + W
    k = max(1, min(W, _BATCH_ELEMENTS // per_column))
    rows = [
        _r_pass(net, X, T, ws, xp.eye(min(k, W - start), W, k=start, dtype=net._xp_dtype))
        for start in range(0, W, k)
    ]
    return xp.concat(rows, axis=0).T  # row r of a pass is H e_r, i.e. column r


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
            net._forward(X, ws, w)
            net._backward(X, T, ws, w, g)
        columns.append(g_up - g_down)
        w[i] = w0[i]
    return xp.stack(columns, axis=1) / (up - down)[None, :]


def _per_sample_gradients(net: MLP, A: list, seeds: Any) -> Any:
    """Gradients of the seeded outputs w.r.t. w, per output and sample: (n_L·m, W).

    For seed δ(L) = ∂u_k/∂z(L), layer l's block is the outer product
    [1, A_n(l−1)] ⊗ δ_kn(l), laid out like Θ(l) in the flat vector.
    """
    xp = net.backend.xp
    K, m = seeds.shape[0], seeds.shape[1]
    blocks = []
    for l, D in _seeded_deltas(net, A, seeds):
        ones = xp.ones((m, 1), dtype=D.dtype)
        a1 = xp.concat([ones, A[l - 1]], axis=1)  # (m, n_{l−1} + 1)
        blocks.append(xp.reshape(a1[None, :, :, None] * D[:, :, None, :], (K * m, -1)))
    return xp.concat(list(reversed(blocks)), axis=1)


def _gauss_newton(net: MLP, X: Any, T: Any) -> Any:
    xp, L, m = net.backend.xp, net.n_layers, X.shape[0]
    ws = net.workspace(m)
    net._forward(X, ws, net.params)
    A = [X] + ws.A[1:]
    c = net.reduction_factor(m)
    Ja = _per_sample_gradients(net, A, _output_seeds(net, A[L], through_output=True))
    if net.loss_function.is_canonical(net.activations[-1]):
        # M J_z = J_a since M = ∂a/∂z for a canonical pair, so G = c J_zᵀ J_a.
        Jz = _per_sample_gradients(net, A, _output_seeds(net, A[L], through_output=False))
        return c * (Jz.T @ Ja)
    curvature = _LOSS_CURVATURE[net.loss_function.name](xp, A[L], T)  # (m, n_L)
    weights = xp.reshape(curvature.T, (-1, 1))  # rows ordered (k, n) like Ja
    return c * ((weights * Ja).T @ Ja)


__all__ = ["GradientCheck", "TOLERANCES", "check_gradient", "default_eps", "hessian", "hvp", "jacobian",
           "numerical_gradient"]
