"""Finite differences, gradient check, Jacobian, Hessian-vector products and Hessians."""

import array_api_strict
import numpy as np
import pytest
from helpers import HIDDEN, KINKED, OUTPUT, OUTPUT_LOSS_PAIRS, kink_margin, targets_for
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bpgpu as bp
from bpgpu import engine
from bpgpu.kernels import jit

CANONICAL = [
    ("identity", "squared_error"),
    ("sigmoid", "binary_cross_entropy"),
    ("softmax", "cross_entropy"),
    ("exp", "poisson"),
]


def make(sizes, hidden="tanh", output="identity", loss="squared_error", reduction="mean", seed=0, m=5, **kw):
    if output == "softmax" and sizes[-1] == 1:
        sizes = list(sizes[:-1]) + [2]  # softmax over one unit is rejected (it is constant)
    kw = {"dtype": "float64", "backend": "numpy", **kw}
    net = bp.MLP(
        sizes,
        hidden=hidden,
        output=output,
        loss=loss,
        reduction=reduction,
        init="uniform",
        epsilon=1.0,
        seed=seed,
        **kw,
    )
    rng = np.random.default_rng(seed + 1)
    X = rng.normal(size=(m, sizes[0]))
    return net, X, targets_for(loss, output, m, sizes[-1], rng)


def assert_close_to(actual, expected, rel):
    """max |actual − expected| ≤ rel · max |expected| (norm-wise relative)."""
    actual, expected = bp.to_numpy(actual), bp.to_numpy(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(actual - expected).max() <= rel * scale, np.abs(actual - expected).max() / scale


# --- Hessian: exact (R-operator) against finite differences ----------------------

architectures = st.tuples(
    st.lists(st.integers(1, 5), min_size=2, max_size=4),  # depth 1-3
    st.integers(1, 4),  # batch
    st.sampled_from(["mean", "sum"]),
    st.integers(0, 2**31 - 1),
)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
@settings(max_examples=8)
@given(arch=architectures)
def test_exact_hessian_matches_finite_differences_and_is_symmetric(hidden, output, loss, arch):
    sizes, m, reduction, seed = arch
    net, X, T = make(sizes, hidden, output, loss, reduction, seed, m)
    if hidden in KINKED or output in KINKED:
        assume(kink_margin(net, X) > 1e-3)  # the 6e-6 difference step must not cross a kink
    if loss != "squared_error" and not net.loss_function.is_canonical(net.activations[-1]):
        # ℓ″ ~ 1/a²: near a = 0 or 1, H is the small difference of far larger terms,
        # and both its rounding and the difference quotient lose digits.
        a = net.forward(X)
        assume((a.min() if loss == "poisson" else min(a.min(), 1.0 - a.max())) > 1e-3)  # poisson: log a only
    H = bp.to_numpy(bp.hessian(net, X, T))
    assert H.shape == (net.n_params, net.n_params)
    assume(np.abs(H).max() > 1e-12)  # e.g. every relu unit dead: nothing to compare
    assert_close_to(H.T, H, 1e-10)
    assert_close_to(bp.hessian(net, X, T, method="finite_difference"), H, 1e-5)


@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_hessian_matches_independent_second_differences_of_the_loss(output, loss):
    """Oracle that uses only net.loss: H_ij ≈ (J(++) − J(+−) − J(−+) + J(−−)) / 4h²."""
    net, X, T = make([2, 2, 2], "sigmoid", output, loss, seed=4, m=3)
    w0, h = np.array(net.params), 1e-4
    H = np.empty((net.n_params, net.n_params))

    def J(i, si, j, sj):
        w = w0.copy()
        w[i] += si * h
        w[j] += sj * h
        net.set_params(w)
        return net.loss(X, T)

    for i in range(net.n_params):
        for j in range(net.n_params):
            H[i, j] = (J(i, 1, j, 1) - J(i, 1, j, -1) - J(i, -1, j, 1) + J(i, -1, j, -1)) / (4 * h * h)
    net.set_params(w0)
    assert_close_to(bp.hessian(net, X, T), H, 1e-5)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_hvp_is_hessian_times_v(hidden, output, loss):
    net, X, T = make([3, 4, 3], hidden, output, loss, "sum", seed=7)
    v = np.random.default_rng(0).normal(size=net.n_params)
    Hv = bp.hvp(net, X, T, v)
    assert Hv.shape == (net.n_params,)
    assert_close_to(Hv, bp.to_numpy(bp.hessian(net, X, T)) @ v, 1e-12)


# --- the outer-product (Gauss–Newton) form ----------------------------------------


@pytest.mark.parametrize("output,loss", CANONICAL)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_outer_product_is_exact_without_hidden_layer_for_canonical_pairs(output, loss, reduction):
    """z(L) linear in w (linear, logistic, softmax regression): H = G for any targets."""
    net, X, T = make([3, 3], output=output, loss=loss, reduction=reduction, seed=2, m=6)
    assert_close_to(bp.hessian(net, X, T, method="outer_product"), bp.hessian(net, X, T), 1e-12)


ZERO_RESIDUAL = [(g, "squared_error") for g in OUTPUT] + [
    ("sigmoid", "binary_cross_entropy"),
    ("softmax", "binary_cross_entropy"),
    ("softmax", "cross_entropy"),
    ("exp", "poisson"),
    ("softplus", "poisson"),
]


@pytest.mark.parametrize("hidden", ["tanh", "softplus", "identity"])
@pytest.mark.parametrize("output,loss", ZERO_RESIDUAL)
def test_outer_product_is_exact_at_zero_residual(hidden, output, loss):
    net, X, _ = make([3, 4, 3], hidden, output, loss, seed=3)
    T = net.forward(X)  # t = a: the residual term Σ r ∇²u vanishes
    assert_close_to(bp.hessian(net, X, T, method="outer_product"), bp.hessian(net, X, T), 1e-12)


def test_outer_product_is_not_exact_for_a_deep_linear_net_with_residual():
    """A two-layer linear net is bilinear in w: with a residual, H − G ≠ 0 as documented."""
    net, X, T = make([3, 4, 2], "identity", seed=5)
    H, G = bp.to_numpy(bp.hessian(net, X, T)), bp.to_numpy(bp.hessian(net, X, T, method="outer_product"))
    assert np.abs(H - G).max() > 1e-2 * np.abs(H).max()


def test_outer_product_is_the_levenberg_marquardt_sum_of_output_gradients():
    """Seed 002: H ≈ Σ_n ∇y_n ∇y_nᵀ, ∇y_n by central differences of net.forward (sum reduction)."""
    net, X, T = make([2, 3, 2], "tanh", "identity", "squared_error", "sum", seed=6, m=4)
    w0, h = np.array(net.params), 1e-5
    grads = np.empty((net.n_params, 4, 2))  # ∂y_nk/∂w_i
    for i in range(net.n_params):
        up, down = w0.copy(), w0.copy()
        up[i] += h
        down[i] -= h
        net.set_params(up)
        y_up = net.forward(X)
        net.set_params(down)
        grads[i] = (y_up - net.forward(X)) / (2 * h)
    net.set_params(w0)
    LM = np.einsum("ink,jnk->ij", grads, grads)
    assert_close_to(bp.hessian(net, X, T, method="outer_product"), LM, 1e-8)


@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_outer_product_is_symmetric_positive_semidefinite(output, loss):
    net, X, T = make([3, 4, 3], "sigmoid", output, loss, seed=8)
    G = bp.to_numpy(bp.hessian(net, X, T, method="outer_product"))
    assert_close_to(G.T, G, 1e-12)
    assert np.linalg.eigvalsh((G + G.T) / 2).min() >= -1e-12 * np.abs(G).max()


# --- Jacobian ----------------------------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("output", OUTPUT)
def test_jacobian_by_backprop_matches_finite_differences(hidden, output):
    net, X, _ = make([3, 4, 3, 3], hidden, output, seed=9, m=6)
    if hidden in KINKED or output in KINKED:
        assert kink_margin(net, X) > 1e-3
    J = bp.jacobian(net, X)
    assert J.shape == (6, 3, 3)
    assert_close_to(bp.jacobian(net, X, method="finite_difference"), J, 1e-8)


def test_jacobian_matches_independent_differences_of_forward():
    net, X, _ = make([2, 3, 4], "sigmoid", "softmax", "cross_entropy", seed=10, m=3)
    h = 1e-5
    ref = np.stack([(net.forward(X + h * e) - net.forward(X - h * e)) / (2 * h) for e in np.eye(2)], axis=2)
    assert_close_to(bp.jacobian(net, X), ref, 1e-8)
    np.testing.assert_allclose(bp.to_numpy(bp.jacobian(net, X)).sum(axis=1), 0, atol=1e-14)  # Σ_k a_k = 1


def test_jacobian_in_float32():
    net32, X, _ = make([3, 5, 2], "tanh", "sigmoid", seed=11, dtype="float32")
    net64, _, _ = make([3, 5, 2], "tanh", "sigmoid", seed=11)
    J = bp.jacobian(net32, X)
    assert J.dtype == np.float32
    assert_close_to(J, bp.jacobian(net64, X), 1e-5)
    assert_close_to(bp.jacobian(net32, X, method="finite_difference"), bp.jacobian(net64, X), 1e-3)


# --- numerical gradient and the gradient check -------------------------------------


@pytest.fixture
def forward_calls(monkeypatch):
    calls = []
    original = engine.forward

    def counting(net, X, ws, w):
        calls.append(1)
        return original(net, X, ws, w)

    monkeypatch.setattr(engine, "forward", counting)
    return calls


@pytest.mark.parametrize("method,count", [("central", lambda W: 2 * W), ("forward", lambda W: W + 1)])
def test_numerical_gradient_counts_loss_evaluations(forward_calls, method, count):
    net, X, T = make([3, 4, 2], seed=12)
    before = np.array(net.params)
    n = bp.numerical_gradient(net, X, T, method=method)
    assert len(forward_calls) == count(net.n_params)
    assert np.array_equal(np.array(net.params).view(np.uint64), before.view(np.uint64))
    rtol = 1e-7 if method == "central" else 1e-4
    assert_close_to(n, net.gradient(X, T), rtol)


def test_numerical_gradient_leaves_params_bit_identical_when_a_pass_raises(monkeypatch):
    net, X, T = make([3, 4, 2], seed=13)
    before = np.array(net.params)
    original, calls = engine.forward, []

    def failing(net, X, ws, w):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom")
        return original(net, X, ws, w)

    monkeypatch.setattr(engine, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        bp.numerical_gradient(net, X, T)
    assert np.array_equal(np.array(net.params).view(np.uint64), before.view(np.uint64))


def test_default_eps_per_dtype():
    for dtype in ("float32", "float64"):
        net = bp.MLP([2, 1], dtype=dtype, backend="numpy")
        eps = np.finfo(dtype).eps
        assert bp.derivatives.default_eps(net, "central") == pytest.approx(eps ** (1 / 3))
        assert bp.derivatives.default_eps(net, "forward") == pytest.approx(eps**0.5)


@pytest.mark.parametrize("hidden", ["sigmoid", "tanh", "softplus"])
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_check_gradient_passes_a_right_gradient(hidden, output, loss, dtype):
    if output in KINKED and dtype == "float32":
        pytest.skip("the float32 step (5e-3) crosses relu kinks")
    net, X, T = make([3, 4, 3], hidden, output, loss, seed=14, dtype=dtype)
    for method in ("central", "forward"):
        result = bp.check_gradient(net, X, T, method=method)
        assert result.passed, result
        assert result.max_rel_error <= result.rtol


def test_check_gradient_flags_a_wrong_activation_derivative(monkeypatch):
    net, X, T = make([3, 4, 2], "tanh", seed=15)
    assert bp.check_gradient(net, X, T).passed
    # the engine's kernel-by-kernel passes, whose table the test breaks (not the one-call gradient)
    monkeypatch.setattr(jit, "gradient_for", lambda net: None)
    right = net.backend.ops.tanh_bwd

    def wrong(s, a, out, scratch, rows):  # g′ off by 0.1 %, written in place like the real kernel
        right(s, a, out, scratch, rows)
        out *= 1.001
        return out

    monkeypatch.setattr(net.backend.ops, "tanh_bwd", wrong)
    result = bp.check_gradient(net, X, T)
    assert not result.passed
    assert result.worst[0] == 1  # only the hidden layer's Θ(1) sees the wrong g′
    assert result.max_rel_error > 100 * result.rtol


def test_check_gradient_names_the_worst_parameter_in_theta_coordinates(monkeypatch):
    net, X, T = make([3, 4, 5], "sigmoid", seed=16)
    original = engine.backward

    def off_by_one_element(net, X, T, ws, w, grad, weights=None):
        total = original(net, X, T, ws, w, grad, weights)
        net.theta(2, grad)[1, 3] += 1e-3
        return total

    monkeypatch.setattr(engine, "backward", off_by_one_element)
    monkeypatch.setattr(jit, "gradient_for", lambda net: None)  # the passes the test breaks
    result = bp.check_gradient(net, X, T)
    assert not result.passed
    assert result.worst == (2, 1, 3)
    assert result.max_abs_error == pytest.approx(1e-3, rel=1e-4)


# --- array_api_strict and bad input -------------------------------------------------


@pytest.mark.parametrize(
    "hidden,output,loss",
    [
        ("tanh", "softmax", "cross_entropy"),
        ("softplus", "sigmoid", "binary_cross_entropy"),
        ("sigmoid", "softmax", "squared_error"),
    ],
)
def test_array_api_strict_matches_numpy(hidden, output, loss):
    ref, X, T = make([3, 4, 3], hidden, output, loss, seed=17)
    strict, _, _ = make([3, 4, 3], hidden, output, loss, seed=17, backend=array_api_strict)
    v = np.random.default_rng(1).normal(size=ref.n_params)
    Xs, Ts, vs = (array_api_strict.asarray(a) for a in (X, T, v))
    exact = [
        (bp.hvp(strict, Xs, Ts, vs), bp.hvp(ref, X, T, v)),
        (bp.jacobian(strict, Xs), bp.jacobian(ref, X)),
        (bp.hessian(strict, Xs, Ts), bp.hessian(ref, X, T)),
        (bp.hessian(strict, Xs, Ts, method="outer_product"), bp.hessian(ref, X, T, method="outer_product")),
    ]
    # A difference quotient turns the kernels' last-bit differences (1e-16 in J) into ~1e-11.
    differences = [
        (bp.jacobian(strict, Xs, method="finite_difference"), bp.jacobian(ref, X, method="finite_difference")),
        (bp.numerical_gradient(strict, Xs, Ts), bp.numerical_gradient(ref, X, T)),
    ]
    for (got, want), rtol in [(pair, 1e-10) for pair in exact] + [(pair, 1e-7) for pair in differences]:
        assert type(got).__module__.startswith("array_api_strict")
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=1e-3 * rtol)
    assert bp.check_gradient(strict, Xs, Ts).passed


def test_bad_input_is_named():
    net, X, T = make([3, 4, 2], seed=18)
    with pytest.raises(ValueError, match=r"method must be one of 'exact', 'finite_difference', 'outer_product'"):
        bp.hessian(net, X, T, method="bfgs")
    with pytest.raises(ValueError, match=r"method must be one of 'central', 'forward', got 'backward'"):
        bp.numerical_gradient(net, X, T, method="backward")
    with pytest.raises(ValueError, match=r"eps must be a float in \(0, 1\)"):
        bp.numerical_gradient(net, X, T, eps=0.0)
    with pytest.raises(
        ValueError, match=rf"v must be a flat vector of length n_params={net.n_params}.*got shape \(3,\)"
    ):
        bp.hvp(net, X, T, np.ones(3))
    with pytest.raises(ValueError, match=r"v contains NaN"):
        bp.hvp(net, X, T, np.full(net.n_params, np.nan))
    with pytest.raises(TypeError, match=r"v must hold real numbers"):
        bp.hvp(net, X, T, np.full(net.n_params, "a"))
    with pytest.raises(ValueError, match=r"X has 2 columns but layer 0"):
        bp.jacobian(net, X[:, :2])
    with pytest.raises(ValueError, match=r"rtol must be > 0"):
        bp.check_gradient(net, X, T, rtol=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not bp.gpu_status().usable, reason=f"no usable GPU: {bp.gpu_status().reason}")
def test_cupy_matches_numpy():
    ref, X, T = make([3, 4, 3], "tanh", "softmax", "cross_entropy", seed=19)
    gpu, _, _ = make([3, 4, 3], "tanh", "softmax", "cross_entropy", seed=19, backend="cupy")
    v = np.random.default_rng(2).normal(size=ref.n_params)
    for got, want in [
        (bp.hvp(gpu, X, T, v), bp.hvp(ref, X, T, v)),
        (bp.jacobian(gpu, X), bp.jacobian(ref, X)),
        (bp.hessian(gpu, X, T), bp.hessian(ref, X, T)),
        (bp.hessian(gpu, X, T, method="outer_product"), bp.hessian(ref, X, T, method="outer_product")),
    ]:
        np.testing.assert_allclose(bp.to_numpy(got), want, rtol=1e-10, atol=1e-13)
    assert bp.check_gradient(gpu, X, T).passed
