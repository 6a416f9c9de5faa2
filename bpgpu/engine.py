"""The engine: the forward pass, backpropagation and the R-operator passes of an MLP.

Every consumer of forward and backward passes (``MLP``'s public methods,
training, the optimizers, L-BFGS, the derivative tools, Dask's per-chunk work,
the estimators, the benchmarks) calls these operations; nobody else writes a
pass. They run on any backend: matrix products and the fused elementwise steps
go through the net's kernel table (``net.backend.ops``), everything else
through its array namespace (``net.backend.xp``). The flat layout of w is
:class:`bpgpu.layout.Layout`'s (``net.layout``).

Notation (docs/guide/feedforward.rst). Layer l = 1..L: z(l) = Θ(l) a(l−1) with a_0 = 1, a(l) = g_l(z(l)).
A batch is row-major, so with Wᵀ(l) and b(l) views of w (layout.py):

    Z(l) = A(l−1) Wᵀ(l) + b(l),   A(l) = g_l(Z(l)),   A(0) = X (m, n_0)
    J = c Σ_n ℓ(a_n(L), t_n),      c = 1/m ("mean") or 1 ("sum"); with sample weights
                                   J = c Σ_n s_n ℓ_n, c = 1/Σ s_n ("mean") or 1
    δ(l) = ∂J/∂z(l):  δ(L) from the loss (c (a − t) for a canonical pair),
                      δ(l) = (δ(l+1) W(l+1)) ⊙ g′_l(z(l))        (the delta rule, docs/guide/backprop.rst)
    ∂J/∂Wᵀ(l) = A(l−1)ᵀ δ(l),   ∂J/∂b(l) = Σ_n δ_n(l)             (the δ·aᵀ products)

Public operations
-----------------
Passes at parameters ``w`` (any flat vector in the params layout) through the
buffers of a :class:`Workspace` (``net.workspace(m)``):

    forward(net, X, ws, w)                    A(l) into ws.A[l], Z(L) into ws.Z; returns a(L)
    output_delta(net, T, ws, weights)         δ(L) into ws.D[L]; returns Σ_n J_n (unscaled)
    backward(net, X, T, ws, w, grad, weights) δ(l) into ws.D[l], ∂J/∂w into ``grad``; returns J
    loss(net, X, T, ws, w, weights)           forward + the loss J, no backprop
    loss_and_gradient(net, X, T, grad, weights)  J and ∂J/∂w at net.params into ``grad``: one compiled
                                              call on the numpy backend (numba), forward + backward elsewhere
    forward_backward(net, X, T)               forward and backward at net.params; returns ws

Building blocks of the derivative tools (stacks of K seeds or directions are
arrays (K, m, n_l), so every product is one batched GEMM):

    layer_outputs(X, ws)                      [A(0) = X, A(1), ..., A(L)] after a forward pass
    times_g1(net, l, S, A_l)                  S ⊙ g′_l(z(l)) (softmax: S ↦ a ⊙ (S − Σ_k S_k a_k))
    output_residual(net, ws, T)               c ∂ℓ/∂a(L), clipped as the loss kernels clip
    output_seeds(net, a, through_output)      δ(L) seeds e_k ⊙ g′_L (∂y_k/∂z(L)) or e_k (∂z_k/∂z(L)), (n_L, m, n_L)
    seeded_deltas(net, A, D)                  backprop of a seed stack: yields (l, δ(l)) for l = L..1,
                                              δ(l−1) = (δ(l) W(l)) ⊙ g′ (the Jacobian recursion)
    input_jacobian(net, A)                    ∂y_k/∂x per sample, (m, n_L, n_0): δ(1) W(1) for the output seeds
    seeded_gradients(net, A, seeds)           per-seed, per-sample gradients ∂u_kn/∂w, (K·m, W):
                                              layer l's block is [1, A_n(l−1)] ⊗ δ_kn(l), laid out like Θ(l)
    r_pass(net, X, T, ws, V)                  H vᵣ for every row of V (K, W): Pearlmutter's R-operator
                                              on the forward pass and on backprop (after forward_backward)
    hessian_vector_products(net, X, T, V)     H vᵣ for every row of V (K, W) at net.params: one compiled call
                                              on the numpy backend (numba), forward_backward + r_pass elsewhere
    exact_hessian(net, X, T)                  H (W, W) from batched R-passes: one compiled call on numpy
                                              (blocks of unit directions, symmetry used), r_pass blocks elsewhere
    r_output_delta(net, ws, T, Rz, Ra)        R{δ(L)}, the loss's part of the R-pass
    loss_curvature(net, a, T)                 ∂²ℓ/∂a² per sample and output (diagonal), (m, n_L)

The seeded tools as one compiled call each on the numpy backend (numba: the forward pass,
the backprop of all K·m seed rows with one GEMM per layer, the outer products; buffers reused;
:class:`bpgpu.kernels.jit.CompiledDerivatives`), or None elsewhere (the caller runs the passes):

    compiled_input_jacobian(net, X)           ∂y_k/∂x per sample, (m, n_L, n_0)
    compiled_parameter_jacobian(net, X)       ∂y_nk/∂w, (m, n_L, W)
    compiled_per_sample_gradients(net, X, T, s_col)   s_n ∂ℓ_n/∂w, (m, W)
    compiled_gauss_newton_rows(net, X, T, s_col)      the Gauss–Newton factor R, (n_L m, W), rows (k, n)

``weights`` is ``None`` or the pair ``(s_col, c)`` of :meth:`bpgpu.network.MLP.weighting`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from bpgpu.backend import is_sparse
from bpgpu.kernels import generic, jit

if TYPE_CHECKING:
    from bpgpu.network import MLP


class Workspace:
    """Buffers for one batch size m, allocated once and reused by every pass.

    Attributes
    ----------
    m : int
    A : list, A[l] of shape (m, n_l) for l = 1..L
        a(l) (hidden layers activate in place; A[0] is None: the input is the caller's X).
    D : list, D[l] of shape (m, n_l)
        δ(l).
    Z : (m, n_L)
        z(L), kept so a canonical loss is computed from the logits.
    scratch : list, scratch[l] of shape (m, n_l)
        The kernels' scratch, views of one buffer.
    rows : (m, 2)
        The kernels' row-reduction buffer.
    grad : (W,)
        A gradient in the params layout.
    """

    def __init__(self, net: MLP, m: int):
        xp, dt = net.backend.xp, net.xp_dtype
        widths = net.sizes[1:]
        self.m = m
        self.A: list[Any] = [None] + [xp.empty((m, n), dtype=dt) for n in widths]
        self.D: list[Any] = [None] + [xp.empty((m, n), dtype=dt) for n in widths]
        self.Z = xp.empty((m, net.sizes[-1]), dtype=dt)
        flat = xp.empty(m * max(widths), dtype=dt)
        self.scratch: list[Any] = [None] + [xp.reshape(flat[: m * n], (m, n)) for n in widths]
        self.rows = xp.empty((m, 2), dtype=dt)
        self.grad = xp.empty(net.n_params, dtype=dt)


# --- the passes ------------------------------------------------------------------


def forward(net: MLP, X: Any, ws: Workspace, w: Any) -> Any:
    """The forward pass A(l) = g_l(A(l−1) Wᵀ(l) + b(l)), l = 1..L, at parameters ``w``.

    Parameters
    ----------
    X : (m, n_0) backend array in the net's dtype (``net.check_inputs``).
    ws : the workspace for m rows; receives A(l) in ws.A[l] and z(L) in ws.Z.
    w : (W,) flat parameters.

    Returns
    -------
    a(L) : (m, n_L), the workspace's buffer ws.A[L] (copy it to keep it).
    """
    ops, layout, xp, L = net.backend.ops, net.layout, net.backend.xp, net.n_layers
    a = X
    for l in range(1, L + 1):
        z = ws.Z if l == L else ws.A[l]  # hidden layers activate in place
        ops.matmul(a, layout.wt(w, l, xp), z)
        a = getattr(ops, net.activations[l - 1].fwd)(z, layout.bias(w, l), ws.A[l], ws.scratch[l], ws.rows)
    return a


def output_delta(net: MLP, T: Any, ws: Workspace, weights: Any = None) -> Any:
    """δ(L) = ∂J/∂z(L) into ws.D[L] after :func:`forward`; returns Σ_n J_n (unscaled, device scalar).

    With ``weights = (s_col, c)``: returns Σ_n s_n J_n and δ_n(L) = c s_n ∂J_n/∂z(L).
    T : (m, n_L) targets on the backend.
    """
    L, out = net.n_layers, net.activations[-1]
    c = net.reduction_factor(ws.m, weights)
    total = net.loss_function.value_and_delta(
        net.backend.ops, out, ws.Z, ws.A[L], T, c, ws.D[L], ws.scratch[L], ws.rows
    )
    if weights is None:
        return total
    s = weights[0]
    ws.D[L] *= s
    return net.backend.xp.sum(s[:, 0] * net.loss_function.row_values(out, ws.Z, ws.A[L], T))


def backward(net: MLP, X: Any, T: Any, ws: Workspace, w: Any, grad: Any, weights: Any = None) -> Any:
    """Backpropagation after :func:`forward` at the same ``w``: δ(l) into ws.D[l], ∂J/∂w into ``grad``.

    δ(L) from the loss (:func:`output_delta`), δ(l) = (δ(l+1) W(l+1)) ⊙ g′_l(z(l)),
    ∂J/∂Wᵀ(l) = A(l−1)ᵀ δ(l), ∂J/∂b(l) = Σ_n δ_n(l), written straight into the
    blocks of ``grad`` (W,).

    Returns
    -------
    J : device scalar, c Σ_n J_n (or c Σ_n s_n J_n with ``weights``).
    """
    ops, layout, xp, L = net.backend.ops, net.layout, net.backend.xp, net.n_layers
    total = output_delta(net, T, ws, weights)
    for l in range(L, 0, -1):
        delta = ws.D[l]
        ops.matmul(X.T if l == 1 else ws.A[l - 1].T, delta, layout.wt(grad, l, xp))
        ops.colsum(delta, layout.bias(grad, l))
        if l > 1:
            s = ops.matmul(delta, layout.wt(w, l, xp).T, ws.D[l - 1])
            getattr(ops, net.activations[l - 2].bwd)(s, ws.A[l - 1], s, ws.scratch[l - 1], ws.rows)
    return total * net.reduction_factor(ws.m, weights)


def loss(net: MLP, X: Any, T: Any, ws: Workspace, w: Any, weights: Any = None) -> Any:
    """J at parameters ``w`` (device scalar): one forward pass and the loss, no backprop."""
    forward(net, X, ws, w)
    return net.reduction_factor(ws.m, weights) * output_delta(net, T, ws, weights)


def loss_and_gradient(net: MLP, X: Any, T: Any, grad: Any, weights: Any = None) -> Any:
    """J and ∂J/∂w at ``net.params``, the gradient written into ``grad`` (W,): the fastest path.

    On the numpy backend with the compiled table and a dense X, one numba call (forward pass, backprop and
    the δ·aᵀ products, :class:`bpgpu.kernels.jit.CompiledGradient`); elsewhere :func:`forward`
    and :func:`backward` through the net's workspace. The workspace's A(l) and δ(l) are not
    defined afterwards (use :func:`forward_backward` for passes that read them).

    Returns
    -------
    J : Python float on the compiled path, a device scalar otherwise.
    """
    compiled = _compiled_for(jit.gradient_for, net, X)
    if compiled is not None:
        return compiled(X, T, grad, weights)
    ws = net.workspace(X.shape[0])
    forward(net, X, ws, net.params)
    return backward(net, X, T, ws, net.params, grad, weights)


def forward_backward(net: MLP, X: Any, T: Any) -> Workspace:
    """One forward pass and backprop at ``net.params``; the returned workspace then holds
    A(l), δ(l) for every layer and the gradient in ws.grad."""
    ws = net.workspace(X.shape[0])
    forward(net, X, ws, net.params)
    backward(net, X, T, ws, net.params, ws.grad)
    return ws


def layer_outputs(X: Any, ws: Workspace) -> list[Any]:
    """[A(0), A(1), ..., A(L)] with A(0) = X, after :func:`forward` on X."""
    return [X] + ws.A[1:]


# --- seeded backward passes: Jacobians and per-sample gradients ---------------------


def times_g1(net: MLP, l: int, S: Any, A_l: Any) -> Any:
    """S ⊙ g′_l(z(l)) through layer l's backward kernel (softmax: a ⊙ (S − Σ_k S_k a_k) per row).

    Parameters
    ----------
    S : (..., m, n_l), a stack of row blocks.
    A_l : (m, n_l), layer l's output a(l) (g′ is written through it).

    Returns
    -------
    A new array of S's shape.
    """
    xp = net.backend.xp
    shape = tuple(S.shape)
    s2 = xp.reshape(S, (-1, shape[-1]))
    a2 = A_l if tuple(s2.shape) == tuple(A_l.shape) else xp.reshape(xp.broadcast_to(A_l, shape), tuple(s2.shape))
    out, scratch = xp.empty_like(s2), xp.empty_like(s2)
    rows = xp.empty((s2.shape[0], 2), dtype=s2.dtype)
    getattr(net.backend.ops, net.activations[l - 1].bwd)(s2, a2, out, scratch, rows)
    return xp.reshape(out, shape)


def output_residual(net: MLP, ws: Workspace, T: Any) -> Any:
    """r = c ∂ℓ/∂a(L), (m, n_L), through the loss's backward kernel (clipping and all), after :func:`forward`."""
    xp, a = net.backend.xp, ws.A[net.n_layers]
    out, scratch = xp.empty_like(a), xp.empty_like(a)
    getattr(net.backend.ops, f"{net.loss_function.name}_bwd")(a, T, net.reduction_factor(ws.m), out, scratch)
    return out


def output_seeds(net: MLP, a: Any, through_output: bool) -> Any:
    """δ(L) seeds of shape (n_L, m, n_L): seed k holds ∂u_k/∂z(L) for every sample.

    ``through_output``: u = a(L), so the seed is e_k ⊙ g′_L (softmax: S e_k);
    otherwise u = z(L) and the seed is e_k. a : (m, n_L), the output a(L).
    """
    xp = net.backend.xp
    n, m = net.sizes[-1], a.shape[0]
    e = xp.broadcast_to(xp.reshape(xp.eye(n, dtype=a.dtype), (n, 1, n)), (n, m, n))
    return times_g1(net, net.n_layers, e, a) if through_output else e


def seeded_deltas(net: MLP, A: list[Any], D: Any) -> Iterator[tuple[int, Any]]:
    """Backprop of a stack of K seeds δ(L) = D (K, m, n_L): yields (l, δ(l)) for l = L..1.

    δ(l−1) = (δ(l) W(l)) ⊙ g′_{l−1} (docs/guide/jacobian_hessian.rst), all K·m rows in one
    batched product per layer. A: :func:`layer_outputs`.
    """
    layout, xp = net.layout, net.backend.xp
    for l in range(net.n_layers, 0, -1):
        yield l, D
        if l > 1:
            D = times_g1(net, l - 1, D @ layout.wt(net.params, l, xp).T, A[l - 1])


def input_jacobian(net: MLP, A: list[Any]) -> Any:
    """∂y_k/∂x_i per sample, (m, n_L, n_0), y = a(L), after :func:`forward` (A: :func:`layer_outputs`).

    The output seeds e_k ⊙ g′_L backpropagated by :func:`seeded_deltas`, then ∂y/∂x = δ(1) W(1).
    """
    xp = net.backend.xp
    for l, D in seeded_deltas(net, A, output_seeds(net, A[-1], through_output=True)):
        if l == 1:
            dX = D @ net.layout.wt(net.params, 1, xp).T  # (n_L, m, n_0)
    return xp.permute_dims(dX, (1, 0, 2))


def seeded_gradients(net: MLP, A: list[Any], seeds: Any) -> Any:
    """Gradients w.r.t. w of the seeded outputs, per seed k and sample n: (K·m, W), rows ordered (k, n).

    For the seed δ(L) = ∂u_k/∂z(L) (seeds (K, m, n_L), e.g. :func:`output_seeds`), layer
    l's block of row (k, n) is the outer product [1, A_n(l−1)] ⊗ δ_kn(l), laid out like Θ(l).
    """
    xp = net.backend.xp
    K, m = seeds.shape[0], seeds.shape[1]
    blocks = []
    for l, D in seeded_deltas(net, A, seeds):
        ones = xp.ones((m, 1), dtype=D.dtype)
        a1 = xp.concat([ones, A[l - 1]], axis=1)  # (m, n_{l−1} + 1)
        blocks.append(xp.reshape(a1[None, :, :, None] * D[:, :, None, :], (K * m, -1)))
    return xp.concat(list(reversed(blocks)), axis=1)


# --- the seeded tools as one compiled call each (numpy backend) ----------------------
# Each returns None when the compiled path does not apply (another backend, no numba, a
# sparse X): the caller then runs the passes above. X and T are taken as the public
# functions take them (checked here, or by a lean test of what the kernels need).


def _compiled_for(tools_for: Callable[[MLP], Any], net: MLP, X: Any) -> Any:
    """The net's compiled tools of one kind (``jit.gradient_for``, ``jit.derivatives_for`` or
    ``jit.curvature_for``) for this X, or None: another backend, numba missing, or a sparse X
    (the array passes, which multiply it sparse × dense). The one rule for taking the compiled path."""
    return None if is_sparse(X) else tools_for(net)


def compiled_input_jacobian(net: MLP, X: Any) -> Any:
    """∂y_k/∂x per sample (m, n_L, n_0) in one compiled call (:func:`input_jacobian`'s result), or None."""
    tools = _compiled_for(jit.derivatives_for, net, X)
    return None if tools is None else tools.input_jacobian(X)


def compiled_parameter_jacobian(net: MLP, X: Any) -> Any:
    """∂y_nk/∂w (m, n_L, W) in one compiled call (:func:`seeded_gradients` of the output seeds), or None."""
    tools = _compiled_for(jit.derivatives_for, net, X)
    return None if tools is None else tools.parameter_jacobian(X)


def compiled_per_sample_gradients(net: MLP, X: Any, T: Any, s_col: Any = None) -> Any:
    """s_n ∂ℓ_n/∂w (m, W) in one compiled call, or None; s_col: None or (m, 1) weights."""
    tools = _compiled_for(jit.derivatives_for, net, X)
    return None if tools is None else tools.per_sample_gradients(X, T, s_col)


def compiled_gauss_newton_rows(net: MLP, X: Any, T: Any, s_col: Any = None) -> Any:
    """The Gauss–Newton factor R (n_L m, W), rows (k, n), in one compiled call, or None."""
    tools = _compiled_for(jit.derivatives_for, net, X)
    return None if tools is None else tools.gauss_newton_rows(X, T, s_col)


# --- the R-operator: Hessian-vector products ----------------------------------------


def loss_curvature(net: MLP, a: Any, T: Any) -> Any:
    """∂²ℓ/∂a² per sample and output, (m, n_L) (diagonal for all three losses), a clipped as ∂ℓ/∂a is."""
    return generic.LOSS_CURVATURES[net.loss_function.name](a, T)


def _mT(xp: Any, x: Any) -> Any:
    return xp.permute_dims(x, (0, 2, 1))


def r_output_delta(net: MLP, ws: Workspace, T: Any, Rz: Any, Ra: Any) -> Any:
    """R{δ(L)} = c ∂²ℓ/∂z(L)² R{z(L)}, stacks (K, m, n_L), after :func:`forward`.

    Canonical pairs: δ(L) = c (a − t), so R{δ(L)} = c R{a} (for softmax +
    cross_entropy that is the loss's Hessian when every target row sums to 1,
    which that δ(L) assumes too). Otherwise δ(L) = J_gᵀ r with r = c ∂ℓ/∂a, and
    R{δ(L)} = J_gᵀ (c ℓ″ ⊙ R{a}) + [second-order term of g contracted with r]:
    elementwise g: r ⊙ g″ ⊙ R{z}; softmax (δ = a ⊙ (r − aᵀr)):
    R{a} ⊙ (r − aᵀr) − a (R{a}ᵀ r).
    """
    xp, L = net.backend.xp, net.n_layers
    output, a = net.activations[-1], ws.A[L]
    c = net.reduction_factor(ws.m)
    if net.loss_function.is_canonical(output):
        return c * Ra
    RD = times_g1(net, L, c * loss_curvature(net, a, T) * Ra, a)
    r = output_residual(net, ws, T)
    if output.name == "softmax":
        return RD + Ra * (r - xp.sum(a * r, axis=-1, keepdims=True)) - a * xp.sum(Ra * r, axis=-1, keepdims=True)
    g2 = generic.SECOND_DERIVATIVES[output.name]
    return RD if g2 is None else RD + r * g2(a) * Rz


def r_pass(net: MLP, X: Any, T: Any, ws: Workspace, V: Any) -> Any:
    """H vᵣ for every row vᵣ of V (K, W), after :func:`forward_backward`; returns (K, W).

    The R-operator on every line of the passes::

        Forward:  R{z(l)} = R{A(l−1)} Wᵀ(l) + A(l−1) Vᵀ_W(l) + v_b(l),  R{A(l)} = g′ ⊙ R{z(l)}   (R{A(0)} = 0)
        Backward: R{δ(L)} from the loss (r_output_delta);
                  s(l) = δ(l+1) W(l+1),  R{s(l)} = R{δ(l+1)} W(l+1) + δ(l+1) V_W(l+1),
                  R{δ(l)} = R{s(l)} ⊙ g′ + s(l) ⊙ g″ ⊙ R{z(l)};
        Gradient: R{∂J/∂Wᵀ(l)} = R{A(l−1)}ᵀ δ(l) + A(l−1)ᵀ R{δ(l)},  R{∂J/∂b(l)} = Σ_n R{δ(l)}.
    """
    xp, layout, L, w = net.backend.xp, net.layout, net.n_layers, net.params
    A, D = layer_outputs(X, ws), ws.D
    Rz, RA = [None] * (L + 1), [None] * (L + 1)
    for l in range(1, L + 1):
        vb, vwt = layout.split(V, l, xp)
        Rz[l] = A[l - 1] @ vwt + vb[:, None, :]
        if RA[l - 1] is not None:
            Rz[l] = Rz[l] + RA[l - 1] @ layout.wt(w, l, xp)
        RA[l] = times_g1(net, l, Rz[l], A[l])
    RD = r_output_delta(net, ws, T, Rz[L], RA[L])
    blocks = [None] * (L + 1)
    for l in range(L, 0, -1):
        rgwt = A[l - 1].T @ RD
        if RA[l - 1] is not None:
            rgwt = rgwt + _mT(xp, RA[l - 1]) @ D[l]
        blocks[l] = (xp.sum(RD, axis=1), rgwt)
        if l > 1:
            wt, (_, vwt) = layout.wt(w, l, xp), layout.split(V, l, xp)
            Rs = RD @ wt.T + D[l] @ _mT(xp, vwt)
            RD = times_g1(net, l - 1, Rs, A[l - 1])
            g2 = generic.SECOND_DERIVATIVES[net.activations[l - 2].name]
            if g2 is not None:
                RD = RD + (D[l] @ wt.T) * g2(A[l - 1]) * Rz[l - 1]
    return layout.join(blocks[1:], xp)


# How many Hessian columns one batched array-API R-pass carries: bounds its memory to
# about this many elements per intermediate array.
_BATCH_ELEMENTS = 1 << 22


def hessian_vector_products(net: MLP, X: Any, T: Any, V: Any) -> Any:
    """H vᵣ for every row vᵣ of V (K, W) at ``net.params``: a new (K, W) array.

    On the numpy backend with the compiled table, forward pass, backprop and the R-passes of all
    K directions are one numba call (:class:`bpgpu.kernels.jit.CompiledCurvature`); elsewhere
    :func:`forward_backward` and :func:`r_pass`. X, T: validated (``net.check_inputs``).
    """
    compiled = _compiled_for(jit.curvature_for, net, X)
    if compiled is not None:
        return compiled.hessian_vector_products(X, T, V)
    return r_pass(net, X, T, forward_backward(net, X, T), V)


def exact_hessian(net: MLP, X: Any, T: Any) -> Any:
    """The Hessian ∂²J/∂w∂w (W, W) at ``net.params`` from batched R-passes: a new array.

    Compiled (numpy backend): one numba call (one per core on threads for large calls, each
    forming the rows of its own units) running the R-passes of the unit vectors in blocks of
    one layer's directions, with what unit directions allow (R{z(k)} = 0 below the
    direction's layer, A(l−1)Vᵀ a column placement, the next product rank 1) and the symmetry
    of H (only the rows of layers ≥ the direction's are formed; exactly symmetric).
    Elsewhere :func:`r_pass` on blocks of rows of the identity, every column in full.
    """
    compiled = _compiled_for(jit.curvature_for, net, X)
    if compiled is not None:
        return compiled.hessian(X, T)
    xp, W = net.backend.xp, net.n_params
    ws = forward_backward(net, X, T)
    k = max(1, min(W, _BATCH_ELEMENTS // (X.shape[0] * max(net.sizes) + W)))
    rows = [
        r_pass(net, X, T, ws, xp.eye(min(k, W - start), W, k=start, dtype=net.xp_dtype)) for start in range(0, W, k)
    ]
    return xp.concat(rows, axis=0).T  # row r of a pass is H e_r, i.e. column r


__all__ = [
    "Workspace",
    "exact_hessian",
    "hessian_vector_products",
    "backward",
    "compiled_gauss_newton_rows",
    "compiled_input_jacobian",
    "compiled_parameter_jacobian",
    "compiled_per_sample_gradients",
    "forward",
    "forward_backward",
    "loss_and_gradient",
    "input_jacobian",
    "layer_outputs",
    "loss",
    "loss_curvature",
    "output_delta",
    "output_residual",
    "output_seeds",
    "r_output_delta",
    "r_pass",
    "seeded_deltas",
    "seeded_gradients",
    "times_g1",
]
