"""Bad input: a clear error naming the argument, the layer and the shapes."""

import numpy as np
import pytest

import bpgpu as bp


@pytest.fixture
def net():
    return bp.MLP([3, 4, 2], backend="numpy", seed=0)


GOOD_X, GOOD_T = np.zeros((5, 3)), np.zeros((5, 2))


@pytest.mark.parametrize(
    "X,T,error,pattern",
    [
        (
            np.zeros((5, 4)),
            GOOD_T,
            ValueError,
            r"X has 4 columns but layer 0 \(input\) of MLP \[3, 4, 2\] has 3 units: X.shape=\(5, 4\)",
        ),
        (GOOD_X, np.zeros((5, 3)), ValueError, r"T has 3 columns but layer 2 \(output\) .* T.shape=\(5, 3\)"),
        (GOOD_X, np.zeros((4, 2)), ValueError, r"same number of rows: X.shape=\(5, 3\), T.shape=\(4, 2\)"),
        (np.full((5, 3), np.nan), GOOD_T, ValueError, r"X contains NaN or Inf \(shape \(5, 3\)\)"),
        (GOOD_X, np.full((5, 2), np.inf), ValueError, r"T contains NaN or Inf"),
        (np.zeros((0, 3)), np.zeros((0, 2)), ValueError, r"X is an empty batch: shape \(0, 3\)"),
        (
            np.array([["a", "b", "c"]]),
            GOOD_T,
            TypeError,
            r"X must hold real numbers, got dtype <U1 with shape \(1, 3\)",
        ),
        (GOOD_X, np.zeros((5, 2), dtype=complex), TypeError, r"T must hold real numbers, got dtype complex128"),
        (
            np.zeros(3),
            GOOD_T,
            ValueError,
            r"X must be 2-D \(samples, features\) for layer 0 \(input\) .* got shape \(3,\)",
        ),
        ([[1, 2], [3]], GOOD_T, TypeError, r"X is not a rectangular numeric array"),
    ],
)
def test_bad_batches(net, X, T, error, pattern):
    with pytest.raises(error, match=pattern):
        net.loss_and_gradient(X, T)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (
            dict(layer_sizes=[3, 0, 2]),
            ValueError,
            r"layer 1 must have at least 1 unit, got layer_sizes\[1\]=0 in \[3, 0, 2\]",
        ),
        (dict(layer_sizes=[3]), ValueError, r"at least an input and an output layer"),
        (dict(layer_sizes=[3, 2.5]), TypeError, r"layer_sizes\[1\] \(layer 1\) must be an int"),
        (dict(layer_sizes=[3, 4, 2], hidden="swish"), ValueError, r"unknown hidden activation 'swish' for layer 1"),
        (
            dict(layer_sizes=[3, 4, 4, 2], hidden=["relu", "softmax"]),
            ValueError,
            r"unknown hidden activation 'softmax' for layer 2",
        ),
        (dict(layer_sizes=[3, 4, 2], hidden=["relu", "tanh"]), ValueError, r"hidden has 2 entries but the net has 1"),
        (dict(layer_sizes=[3, 4, 2], output="gelu"), ValueError, r"unknown output activation 'gelu' for layer 2"),
        (dict(layer_sizes=[3, 4, 2], loss="hinge"), ValueError, r"unknown loss 'hinge'"),
        (
            dict(layer_sizes=[3, 4, 2], output="relu", loss="cross_entropy"),
            ValueError,
            r"outputs in \(0, 1\), but the output activation of layer 2 is 'relu'",
        ),
        (dict(layer_sizes=[3, 1], output="softmax"), ValueError, r"output='softmax' needs at least 2 units in layer 1"),
        (dict(layer_sizes=[3, 2], reduction="max"), ValueError, r"reduction must be one of mean, sum"),
        (dict(layer_sizes=[3, 2], dtype="float16"), ValueError, r"dtype must be one of float32, float64"),
        (dict(layer_sizes=[3, 2], init="zeros"), ValueError, r"init must be one of"),
        (dict(layer_sizes=[3, 2], backend="tpu"), ValueError, r"backend='tpu' is not a backend"),
    ],
)
def test_bad_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        bp.MLP(backend=kwargs.pop("backend", "numpy"), **kwargs)


def test_bad_params(net):
    with pytest.raises(
        ValueError, match=r"w must be a flat vector of length n_params=26 for MLP \[3, 4, 2\], got shape \(25,\)"
    ):
        net.set_params(np.zeros(25))
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        net.set_params(np.full(26, np.nan))
    with pytest.raises(ValueError, match=r"layer l must be an int in 1..2, got 3"):
        net.theta(3)
    with pytest.raises(ValueError, match=r"vec must be a flat vector of length n_params=26, got shape \(4,\)"):
        net.theta(1, np.zeros(4))


@pytest.mark.parametrize("T", [np.full((4, 2), 0.5) * [1, 2], np.array([[1.5, -0.5]] * 4)])
def test_softmax_cross_entropy_needs_distributions(T):
    net = bp.MLP([3, 2], output="softmax", loss="cross_entropy", backend="numpy")
    with pytest.raises(ValueError, match=r"T must hold probability distributions .* row 0 sums to"):
        net.gradient(np.zeros((4, 3)), T)
    net.gradient(np.zeros((4, 3)), np.full((4, 2), 0.5))  # soft labels that sum to 1 are fine


def test_bad_input_leaves_params_alone(net):
    before = net.params.copy()
    with pytest.raises(ValueError):
        net.set_params(np.r_[np.zeros(25), np.nan])
    np.testing.assert_array_equal(net.params, before)
