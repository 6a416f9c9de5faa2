"""Per-sample derivatives in w (bpgpu.per_sample) against torch.func, float64 to 1e-9."""

import numpy as np
import pytest
from helpers import OUTPUT_LOSS_PAIRS, random_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_oracle import TorchMLP

import bpgpu as bp
from bpgpu import per_sample

SMOOTH = ("identity", "sigmoid", "tanh", "softplus")  # torch and bpgpu agree on kinks only almost everywhere

architectures = st.tuples(
    st.lists(st.integers(1, 5), min_size=2, max_size=4),  # depth 1-3
    st.integers(1, 6),  # batch
    st.sampled_from(["mean", "sum"]),
    st.integers(0, 2**31 - 1),
)


def make(sizes, hidden, output, loss, reduction, seed, m):
    return random_problem(sizes, hidden, output, loss, reduction, seed, m)


def assert_close(actual, expected, rel=1e-9):
    actual, expected = bp.to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-300)
    assert np.abs(actual - expected).max() <= rel * scale, np.abs(actual - expected).max() / scale


@pytest.mark.parametrize("hidden", SMOOTH)
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
@settings(max_examples=5)
@given(arch=architectures)
def test_parameter_jacobian_and_per_sample_gradients_match_torch_func(hidden, output, loss, arch):
    sizes, m, reduction, seed = arch
    if output in ("relu", "leaky_relu"):
        output = "softplus" if loss == "squared_error" else output
    net, X, T, rng = make(sizes, hidden, output, loss, reduction, seed, m)
    oracle = TorchMLP(net)
    assert_close(bp.jacobian(net, X, wrt="params"), oracle.parameter_jacobian(X))
    s = rng.uniform(0.0, 3.0, size=m)
    s[0] = 1.5  # never all zero
    expected = s[:, None] * oracle.per_sample_gradients(X, T)
    assert_close(per_sample.per_sample_gradients(net, X, T, sample_weight=s), expected)
    assert_close(per_sample.per_sample_gradients(net, X, T), oracle.per_sample_gradients(X, T))
    # c Σ_n rows = the net's gradient (c = 1/Σ s or 1)
    c = 1.0 / s.sum() if reduction == "mean" else 1.0
    assert_close(c * expected.sum(axis=0), net.gradient(X, T, sample_weight=s))


@pytest.mark.parametrize("hidden", ("tanh", "sigmoid"))
@pytest.mark.parametrize("output,loss", [p for p in OUTPUT_LOSS_PAIRS if p[0] not in ("relu", "leaky_relu")])
@settings(max_examples=4)
@given(arch=architectures)
def test_gauss_newton_factor_gives_torchs_gauss_newton_matrix_and_bp_hessian_outer_product(hidden, output, loss, arch):
    sizes, m, reduction, seed = arch
    net, X, T, rng = make(sizes, hidden, output, loss, reduction, seed, m)
    s = rng.uniform(0.1, 3.0, size=m)
    R = bp.to_numpy(per_sample.gauss_newton_factor(net, X, T, sample_weight=s))
    assert R.shape == (m * net.sizes[-1], net.n_params)
    canonical = net.loss_function.is_canonical(net.activations[-1])
    assert_close(R.T @ R, TorchMLP(net).gauss_newton(X, T, s, canonical))
    # unweighted: c RᵀR is bp.hessian's outer-product (Gauss–Newton) matrix
    R1 = bp.to_numpy(per_sample.gauss_newton_factor(net, X, T))
    assert_close(net.reduction_factor(m) * R1.T @ R1, bp.hessian(net, X, T, method="outer_product"))


def test_squared_error_factor_is_the_jacobian_of_the_residuals():
    net, X, T, _ = make([2, 3, 2], "tanh", "identity", "squared_error", "mean", 3, 4)
    R = bp.to_numpy(per_sample.gauss_newton_factor(net, X, T))
    # rows ordered (k, n): output k's block of m rows after output k − 1's
    assert_close(R, TorchMLP(net).parameter_jacobian(X).transpose(1, 0, 2).reshape(R.shape))


def test_bad_input_names_the_argument():
    net, X, T, _ = make([2, 3, 1], "tanh", "identity", "squared_error", "mean", 0, 4)
    with pytest.raises(ValueError, match="sample_weight must have shape \\(4,\\)"):
        per_sample.per_sample_gradients(net, X, T, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="X has 3 columns but layer 0"):
        per_sample.parameter_jacobian(net, np.ones((4, 3)))
    with pytest.raises(ValueError, match="wrt must be 'inputs' or 'params'"):
        bp.jacobian(net, X, wrt="weights")
    with pytest.raises(ValueError, match="wrt='params' is computed by backprop only"):
        bp.jacobian(net, X, method="finite_difference", wrt="params")
    assert bp.jacobian(net, X).shape == (4, 1, 2)  # the default stays the input Jacobian
    with pytest.raises(ValueError, match="same number of rows"):
        per_sample.gauss_newton_factor(net, X, T[:2])
