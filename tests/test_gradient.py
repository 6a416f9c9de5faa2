"""Backpropagation against central differences, on random architectures."""

import numpy as np
import pytest
from helpers import HIDDEN, KINKED, OUTPUT_LOSS_PAIRS, central_difference_gradient, kink_margin, targets_for
from hypothesis import assume, given
from hypothesis import strategies as st

import bpgpu as bp


def max_relative_error(g, n, J):
    """max_i |g_i − n_i| / max(|g_i|, |n_i|, s): relative for every element above
    s = max(1e-3 ‖n‖∞, 1e-5 max(1, |J|)); below s, where a float64 difference
    quotient's rounding error (about 1e-16 |J| / h) is no longer 1e-6 of the
    element, relative to s."""
    floor = max(1e-3 * np.abs(n).max(), 1e-5 * max(1.0, abs(J)))
    return float(np.max(np.abs(g - n) / np.maximum(np.maximum(np.abs(g), np.abs(n)), floor)))


architectures = st.tuples(
    st.lists(st.integers(1, 8), min_size=2, max_size=5),  # depth 1-4
    st.integers(1, 5),  # batch
    st.sampled_from(["mean", "sum"]),
    st.integers(0, 2**31 - 1),
)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
@given(arch=architectures)
def test_backprop_matches_central_differences(hidden, output, loss, arch):
    sizes, m, reduction, seed = arch
    if output == "softmax" and sizes[-1] == 1:
        sizes = sizes[:-1] + [2]  # softmax over one unit is rejected (it is constant)
    rng = np.random.default_rng(seed)
    net = bp.MLP(
        sizes,
        hidden=hidden,
        output=output,
        loss=loss,
        reduction=reduction,
        dtype="float64",
        backend="numpy",
        init="uniform",
        epsilon=1.0,
        seed=seed,
    )
    X = rng.normal(size=(m, sizes[0]))
    T = targets_for(loss, output, m, sizes[-1], rng)
    J, g = net.loss_and_gradient(X, T)
    if loss != "squared_error" and not net.loss_function.is_canonical(net.activations[-1]):
        # A non-canonical loss is computed from a, whose rounding near 0 and 1 is
        # amplified by log a, log(1 − a): a difference quotient cannot resolve 1e-6 there.
        a = net.forward(X)
        distance = a if loss == "poisson" else np.minimum(a, 1 - a)  # poisson: log a only
        assume(float(distance.min()) > 1e-4)
    kinked = hidden in KINKED or output in KINKED
    if kinked:
        assume(kink_margin(net, X) > 1e-2)
    n = central_difference_gradient(net, X, T, h=1e-4 if kinked else 1e-3)
    assert max_relative_error(g, n, J) < 1e-6


def test_gradient_layout_matches_theta():
    net = bp.MLP([3, 4, 2], dtype="float64", backend="numpy", seed=1)
    rng = np.random.default_rng(0)
    X, T = rng.normal(size=(6, 3)), rng.uniform(size=(6, 2))
    g = net.gradient(X, T)
    n = central_difference_gradient(net, X, T)
    for l in (1, 2):
        np.testing.assert_allclose(net.theta(l, g), net.theta(l, n), rtol=1e-6, atol=1e-10)


def test_mean_is_sum_over_m():
    rng = np.random.default_rng(3)
    X, T = rng.normal(size=(7, 2)), rng.uniform(size=(7, 1))
    mean = bp.MLP([2, 3, 1], dtype="float64", backend="numpy", seed=0)
    total = bp.MLP([2, 3, 1], dtype="float64", backend="numpy", seed=0, reduction="sum")
    assert total.loss(X, T) == pytest.approx(7 * mean.loss(X, T), rel=1e-12)
    np.testing.assert_allclose(total.gradient(X, T), 7 * mean.gradient(X, T), rtol=1e-12)
