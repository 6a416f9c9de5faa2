"""Hessian eigenvalues (Lanczos) and trace (Hutchinson) against the dense exact Hessian."""

import numpy as np
import pytest
from helpers import random_problem
from hypothesis import given, settings
from hypothesis import strategies as st

import bpgpu as bp


def make(sizes, output="identity", loss="squared_error", seed=0, m=6, hidden="tanh"):
    return random_problem(sizes, hidden, output, loss, "mean", seed, m)[:3]


def dense_spectrum(net, X, T):
    H = bp.to_numpy(bp.hessian(net, X, T, method="exact"))
    return np.linalg.eigvalsh(0.5 * (H + H.T)), H


@pytest.mark.parametrize(
    "output,loss", [("identity", "squared_error"), ("sigmoid", "binary_cross_entropy"), ("softmax", "cross_entropy")]
)
@settings(max_examples=6)
@given(sizes=st.lists(st.integers(2, 4), min_size=3, max_size=4), seed=st.integers(0, 2**31 - 1), k=st.integers(1, 3))
def test_extreme_eigenvalues_match_eigvalsh(output, loss, sizes, seed, k):
    net, X, T = make(sizes, output, loss, seed)
    lam, _ = dense_spectrum(net, X, T)
    scale = np.abs(lam).max()
    largest = bp.to_numpy(bp.hessian_eigenvalues(net, X, T, k=k))
    np.testing.assert_allclose(largest, lam[::-1][:k], rtol=0, atol=1e-9 * scale)
    smallest = bp.to_numpy(bp.hessian_eigenvalues(net, X, T, k=k, which="smallest"))
    np.testing.assert_allclose(smallest, lam[:k], rtol=0, atol=1e-9 * scale)
    magnitude = bp.to_numpy(bp.hessian_eigenvalues(net, X, T, k=k, which="magnitude"))
    np.testing.assert_allclose(magnitude, lam[np.argsort(-np.abs(lam), kind="stable")][:k], rtol=0, atol=1e-9 * scale)


def test_eigenvectors_are_eigenvectors_of_the_hessian_and_k_equal_W_gives_the_whole_spectrum():
    net, X, T = make([3, 4, 2])
    lam, H = dense_spectrum(net, X, T)
    values, vectors = bp.hessian_eigenvalues(net, X, T, k=2, return_eigenvectors=True)
    assert vectors.shape == (net.n_params, 2)
    np.testing.assert_allclose(H @ vectors, vectors * values[None, :], atol=1e-9 * np.abs(lam).max())
    everything = bp.to_numpy(bp.hessian_eigenvalues(net, X, T, k=net.n_params))
    np.testing.assert_allclose(everything, lam[::-1], atol=1e-9 * np.abs(lam).max())


def test_hutchinson_is_the_mean_of_rademacher_quadratic_forms_and_converges_to_the_trace():
    net, X, T = make([3, 5, 2], seed=4)
    _, H = dense_spectrum(net, X, T)
    n = 4000
    rng = np.random.default_rng(7)  # the documented draw: default_rng(seed), one ±1 vector per probe
    V = rng.integers(0, 2, size=(n, net.n_params)) * 2.0 - 1.0
    expected = np.mean(np.einsum("ni,ij,nj->n", V, H, V))
    estimate = bp.hessian_trace(net, X, T, n_samples=n, seed=7)
    assert estimate == pytest.approx(expected, rel=1e-9)
    off_diagonal = H - np.diag(np.diag(H))
    standard_error = np.sqrt(2.0 * np.sum(off_diagonal**2) / n)
    assert abs(estimate - np.trace(H)) < 5 * standard_error
    assert bp.hessian_trace(net, X, T, n_samples=3, seed=1) == bp.hessian_trace(net, X, T, n_samples=3, seed=1)


def test_a_linear_least_squares_hessian_has_the_known_spectrum():
    # one layer, identity output, squared error, mean: H = (1/m) [1 X]ᵀ[1 X] ⊗ I per output,
    # whatever the parameters; its eigenvalues are those of the design matrix's Gram matrix
    net, X, T = make([3, 2], m=10)
    Xa = np.hstack([np.ones((10, 1)), X])
    gram = np.linalg.eigvalsh(Xa.T @ Xa / 10)
    expected = np.sort(np.repeat(gram, 2))[::-1]
    np.testing.assert_allclose(bp.to_numpy(bp.hessian_eigenvalues(net, X, T, k=3)), expected[:3], rtol=1e-10)


def test_bad_input():
    net, X, T = make([2, 3, 1])
    W = net.n_params
    with pytest.raises(ValueError, match=f"k={W + 1} is larger than the number of parameters W={W}"):
        bp.hessian_eigenvalues(net, X, T, k=W + 1)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        bp.hessian_eigenvalues(net, X, T, k=0)
    with pytest.raises(ValueError, match="which must be one of"):
        bp.hessian_eigenvalues(net, X, T, which="LA")
    with pytest.raises(ValueError, match="tol must be"):
        bp.hessian_eigenvalues(net, X, T, tol=-1.0)
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        bp.hessian_trace(net, X, T, n_samples=0)
    with pytest.raises(ValueError, match="T has 2 columns"):
        bp.hessian_trace(net, X, np.ones((6, 2)))
