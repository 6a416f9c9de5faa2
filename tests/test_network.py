"""The MLP's contract: views, dtypes, array-api-strict, saturation, copies."""

import array_api_strict
import numpy as np
import pytest
from helpers import HIDDEN, OUTPUT_LOSS_PAIRS, targets_for

import bpgpu as bp


def random_problem(sizes, m=5, seed=0, loss="squared_error", output="sigmoid"):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, sizes[0])), targets_for(loss, output, m, sizes[-1], rng)


def test_theta_is_a_view_into_params():
    net = bp.MLP([3, 4, 2], backend="numpy", seed=0)
    assert net.n_params == 4 * 4 + 2 * 5
    net.theta(2)[1, 0] = 7.0
    assert net.params[net.layout.offsets[1] + 1] == 7.0  # bias column first, column-major
    net.theta(1)[:, 1:] = 0.0
    assert np.count_nonzero(net.params[:16]) <= 4
    assert net.theta(1).shape == (4, 4) and net.theta(2).shape == (2, 5)
    assert np.shares_memory(net.theta(1), net.params)


def test_theta_of_any_flat_vector():
    net = bp.MLP([2, 3, 1], backend="numpy", seed=0)
    v = np.arange(net.n_params, dtype=np.float32)
    assert net.theta(2, v).base is not None
    np.testing.assert_array_equal(net.theta(2, v)[0], v[9:13])


@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_array_api_strict_matches_numpy(output, loss):
    sizes = [3, 5, 4, 2]
    X, T = random_problem(sizes, loss=loss, output=output)
    kw = dict(hidden=["tanh", "softplus"], output=output, loss=loss, dtype="float64", seed=4)
    ref = bp.MLP(sizes, backend="numpy", **kw)
    strict = bp.MLP(sizes, backend=array_api_strict, **kw)
    assert strict.backend.ops.__name__ == "bpgpu.kernels.generic"
    out = strict.forward(array_api_strict.asarray(X))
    assert type(out).__module__.startswith("array_api_strict")
    np.testing.assert_allclose(np.asarray(out), ref.forward(X), rtol=1e-12)
    J, g = strict.loss_and_gradient(X, T)
    J_ref, g_ref = ref.loss_and_gradient(X, T)
    assert J == pytest.approx(J_ref, rel=1e-12)
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("hidden", HIDDEN)
def test_array_api_strict_every_hidden_activation(hidden):
    sizes = [2, 3, 3, 1]
    X, T = random_problem(sizes)
    ref = bp.MLP(sizes, hidden=hidden, dtype="float64", backend="numpy", seed=1)
    strict = bp.MLP(sizes, hidden=hidden, dtype="float64", backend=array_api_strict, seed=1)
    np.testing.assert_allclose(np.asarray(strict.gradient(X, T)), ref.gradient(X, T), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_float32_agrees_with_float64(output, loss):
    sizes = [4, 8, 3]
    X, T = random_problem(sizes, m=16, loss=loss, output=output)
    kw = dict(hidden="tanh", output=output, loss=loss, backend="numpy", seed=2)
    f32, f64 = bp.MLP(sizes, dtype="float32", **kw), bp.MLP(sizes, dtype="float64", **kw)
    f64.set_params(np.asarray(f32.params, dtype=np.float64))
    J32, g32 = f32.loss_and_gradient(X, T)
    J64, g64 = f64.loss_and_gradient(X, T)
    assert g32.dtype == np.float32 and f32.forward(X).dtype == np.float32
    assert J32 == pytest.approx(J64, rel=1e-5)
    assert np.abs(g32 - g64).max() <= 1e-5 * np.abs(g64).max()


def test_dtype_stays_float64():
    net = bp.MLP([2, 2, 1], dtype="float64", backend="numpy")
    assert net.params.dtype == np.float64
    assert net.gradient(np.ones((3, 2), dtype=np.float32), np.ones((3, 1))).dtype == np.float64


@pytest.mark.parametrize(
    "output,loss,z",
    [
        ("sigmoid", "binary_cross_entropy", 800.0),
        ("sigmoid", "binary_cross_entropy", -800.0),
        ("softmax", "cross_entropy", 1e4),
        ("softmax", "binary_cross_entropy", 1e4),
        ("sigmoid", "cross_entropy", -1e3),
        ("sigmoid", "squared_error", 1e3),
        ("softplus", "squared_error", 1e3),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_saturated_outputs_stay_finite(output, loss, z, dtype):
    net = bp.MLP([2, 2], output=output, loss=loss, dtype=dtype, backend="numpy")
    net.theta(1)[:, 0] = [z, -z]  # huge logits of both signs
    T = np.array([[0.0, 1.0], [1.0, 0.0]])
    J, g = net.loss_and_gradient(np.zeros((2, 2)), T)
    assert np.isfinite(J) and np.all(np.isfinite(g))
    if (output, loss) == ("sigmoid", "binary_cross_entropy"):
        # from the logits the loss is exact: softplus(|z|) ≈ |z| for each wrong unit
        assert J == pytest.approx(abs(z), rel=1e-6)


def test_copy_is_independent():
    net = bp.MLP([2, 3, 1], backend="numpy", seed=0)
    twin = net.copy()
    twin.theta(1)[...] = 0.0
    assert np.count_nonzero(net.theta(1)) == net.theta(1).size
    np.testing.assert_array_equal(twin.forward(np.ones((1, 2))).shape, (1, 1))


def test_set_params_keeps_views():
    net = bp.MLP([2, 3, 1], backend="numpy", seed=0)
    view = net.theta(2)
    net.set_params(np.ones(net.n_params))
    assert np.all(view == 1.0)


def test_seed_reproducible_and_inits():
    a = bp.MLP([3, 4, 2], seed=7, backend="numpy").params
    b = bp.MLP([3, 4, 2], seed=7, backend="numpy").params
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 0.12
    for init in ("glorot", "he"):
        net = bp.MLP([300, 200, 2], seed=0, init=init, backend="numpy", dtype="float64")
        w1 = net.theta(1)[:, 1:]
        assert np.all(net.theta(1)[:, 0] == 0)
        expected = np.sqrt(2 / 500) if init == "glorot" else np.sqrt(2 / 300)
        assert w1.std() == pytest.approx(expected, rel=0.05)


def test_one_activation_per_layer():
    net = bp.MLP([2, 3, 3, 2], hidden=["relu", "tanh"], output="softmax", loss="cross_entropy", backend="numpy")
    assert [g.name for g in net.activations] == ["relu", "tanh", "softmax"]
    assert net.forward(np.ones((4, 2))).sum() == pytest.approx(4.0)


def test_inputs_as_lists_and_1d_targets():
    net = bp.MLP([2, 2, 1], backend="numpy", seed=0)
    assert net.loss([[0.0, 1.0], [1.0, 0.0]], [1.0, 0.0]) == pytest.approx(
        net.loss(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[1.0], [0.0]]))
    )
