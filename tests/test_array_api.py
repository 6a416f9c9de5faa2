"""Every public function of bpgpu on any array-API namespace (the array-API promise of
docs/guide/gpu.rst): array_api_strict (the standard and nothing more) and PyTorch tensors
through array-api-compat, each held against the numpy backend as the oracle: the same seed,
data and arithmetic in float64 give the same numbers, and results stay in the caller's
namespace."""

import array_api_strict
import numpy as np
import pytest

import bpgpu as bp

torch = pytest.importorskip("torch")

NAMESPACES = [pytest.param(array_api_strict, id="array_api_strict"), pytest.param(torch, id="torch")]
SIZES = [3, 5, 2]
RNG = np.random.default_rng(0)
X = RNG.normal(size=(23, 3))
T = (RNG.uniform(size=(23, 2)) > 0.5).astype(float)
S = RNG.integers(0, 4, size=23).astype(float)


def _nets(ns, **kw):
    """A numpy net and the same net (same seed, so the same parameters) on namespace ``ns``."""
    config = dict(hidden="tanh", output="sigmoid", loss="binary_cross_entropy", dtype="float64", seed=3, **kw)
    return bp.MLP(SIZES, backend="numpy", **config), bp.MLP(SIZES, backend=ns, **config)


def _close(got, expected, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(bp.to_numpy(got), bp.to_numpy(expected), rtol=rtol, atol=atol)


def _in(ns, array):
    """The array is one of namespace ns's (not numpy's, not a silent host copy)."""
    if ns is torch:
        assert isinstance(array, torch.Tensor)
    else:
        assert type(array).__module__.startswith("array_api_strict")


def _data(net):
    dt = net.xp_dtype
    return net.backend.asarray(X, dt), net.backend.asarray(T, dt)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_net_methods_match_numpy(ns):
    ref, net = _nets(ns)
    Xn, Tn = _data(net)
    out = net.forward(Xn)
    _in(ns, out)
    _close(out, ref.forward(X))
    assert net.loss(Xn, Tn) == pytest.approx(ref.loss(X, T), rel=1e-12)
    assert net.loss(Xn, Tn, sample_weight=S) == pytest.approx(ref.loss(X, T, sample_weight=S), rel=1e-12)
    J, g = net.loss_and_gradient(Xn, Tn)
    _in(ns, g)
    _close(g, ref.gradient(X, T))
    _close(net.gradient(Xn, Tn, sample_weight=S), ref.gradient(X, T, sample_weight=S))
    _close(net.theta(2), ref.theta(2))
    twin = net.copy()
    twin.set_params(bp.to_numpy(twin.params) * 2)
    _close(net.params, ref.params)  # the copy is independent
    _close(twin.params, 2 * bp.to_numpy(ref.params))


FITS = [
    dict(),  # full batch, the default: gradient descent
    dict(batch_size=5),
    dict(batch_size=5, shuffle=False),
    dict(batch_size="auto", optimizer="adam", learning_rate=0.01),
    dict(batch_size=1, epochs=2),
    dict(batch_size=6, optimizer="nesterov", alpha=0.1, sample_weight=S),
    dict(batch_size=6, shuffle=False, optimizer="momentum", sample_weight=S),
    dict(validation_fraction=0.2, early_stopping=True, batch_size=4),
    dict(optimizer="lbfgs", epochs=5, alpha=0.01),
    dict(optimizer="lm", form="parameters", chunk_size=7, sample_weight=S),
    dict(optimizer="lm", form="residuals", chunk_size=7),
]


@pytest.mark.parametrize(
    "options",
    FITS,
    ids=lambda o: ",".join(f"{k}={v if k != 'sample_weight' else 'S'}" for k, v in o.items()) or "full-batch",
)
@pytest.mark.parametrize("ns", NAMESPACES)
def test_fit_matches_numpy(ns, options):
    ref, net = _nets(ns)
    Xn, Tn = _data(net)
    kw = {"epochs": 4, "seed": 0, "progress": False, "tol": None, **options}
    expected = bp.fit(ref, X, T, **kw)
    history = bp.fit(net, Xn, Tn, **kw)
    _in(ns, net.params)
    _close(net.params, ref.params, rtol=1e-8)
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-9)
    assert history.epochs == expected.epochs and history.validation_score == pytest.approx(expected.validation_score)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_train_step_and_optimizers_match_numpy(ns):
    ref, net = _nets(ns)
    Xn, Tn = _data(net)
    for name in ("sgd", "momentum", "nesterov", "adam"):
        loss = bp.train_step(net, Xn, Tn, bp.make_optimizer(name, net, 0.05, alpha=0.01))
        expected = bp.train_step(ref, X, T, bp.make_optimizer(name, ref, 0.05, alpha=0.01))
        assert float(loss) == pytest.approx(float(expected), rel=1e-12)
        _close(net.params, ref.params)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_derivatives_match_numpy(ns):
    ref, net = _nets(ns)
    Xn, Tn = _data(net)
    x4, t4 = Xn[:4, ...], Tn[:4, ...]
    v = RNG.normal(size=net.n_params)
    vn = net.backend.asarray(v, net.xp_dtype)
    # finite differences round differently in each library's summation order: ~1e-11 absolute
    _close(bp.numerical_gradient(net, Xn, Tn), bp.numerical_gradient(ref, X, T), rtol=1e-7, atol=1e-9)
    assert bp.check_gradient(net, Xn, Tn).passed
    for method in ("backprop", "finite_difference"):
        J = bp.jacobian(net, Xn, method=method)
        _in(ns, J)
        _close(J, bp.jacobian(ref, X, method=method), rtol=1e-7, atol=1e-9)
    _close(bp.hvp(net, Xn, Tn, vn), bp.hvp(ref, X, T, v))
    for method in ("exact", "finite_difference", "outer_product"):
        _close(
            bp.hessian(net, x4, t4, method=method), bp.hessian(ref, X[:4], T[:4], method=method), rtol=1e-7, atol=1e-9
        )
    psg = bp.per_sample_gradients(net, Xn, Tn, sample_weight=S)
    _in(ns, psg)
    _close(psg, bp.per_sample_gradients(ref, X, T, sample_weight=S))
    _close(bp.hessian_eigenvalues(net, Xn, Tn, k=2), bp.hessian_eigenvalues(ref, X, T, k=2), rtol=1e-8)
    assert bp.hessian_trace(net, Xn, Tn, seed=0) == pytest.approx(bp.hessian_trace(ref, X, T, seed=0), rel=1e-10)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_save_load_to_onnx_and_to_numpy(ns, tmp_path):
    ref, net = _nets(ns)
    bp.save(net, tmp_path / "net.npz")
    twin = bp.load(tmp_path / "net.npz", backend=ns)
    _in(ns, twin.params)
    host = bp.to_numpy(twin.params)
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, bp.to_numpy(ref.params))
    pytest.importorskip("onnx")
    assert bp.to_onnx(net).SerializeToString() == bp.to_onnx(ref).SerializeToString()
