"""Sparse input (docs/guide/estimators.rst): scipy.sparse X in the estimators (as scikit-learn's MLP takes
it) and in bp.MLP (net.forward, net.loss_and_gradient, bp.fit), multiplied sparse × dense in
layer 1 and never densified."""

import tracemalloc
import warnings

import array_api_strict
import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sklearn")

from sklearn import neural_network as sk  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402

import bpgpu as bp  # noqa: E402

# every container scikit-learn's validate_data(accept_sparse=["csr", "csc"]) takes (COO is converted)
CONTAINERS = [sp.csr_matrix, sp.csc_matrix, sp.coo_matrix, sp.csr_array, sp.csc_array, sp.coo_array]


def _sparse_problem(n=90, n_features=40, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random_array((n, n_features), density=0.08, format="csr", random_state=seed).toarray()
    y = (X[:, :10].sum(axis=1) > np.median(X[:, :10].sum(axis=1))).astype(int) + (X[:, 10] > 0)
    return X, y, rng


@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_classifier_on_sparse_input_is_sklearns_and_its_own_dense_fit(container, solver):
    """scikit-learn's MLPClassifier accepts scipy.sparse X in fit, partial_fit, predict,
    predict_proba and score; unshuffled in float64 bpgpu's fit on sparse X gives scikit-learn's
    parameters and predictions, and those of its own fit on the dense X."""
    X, y, _ = _sparse_problem()
    Xs = container(X)
    params = dict(hidden_layer_sizes=(6,), random_state=0, shuffle=False, max_iter=6, batch_size=32, solver=solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = sk.MLPClassifier(**params).fit(Xs, y)
        mine = bp.MLPClassifier(**params, device="cpu").fit(Xs, y)
        dense = bp.MLPClassifier(**params, device="cpu").fit(X, y)
    for ours, their, own in zip(
        mine.coefs_ + mine.intercepts_, theirs.coefs_ + theirs.intercepts_, dense.coefs_ + dense.intercepts_
    ):
        np.testing.assert_allclose(ours, their, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(ours, own, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.predict_proba(Xs), theirs.predict_proba(Xs), rtol=1e-9)
    np.testing.assert_array_equal(mine.predict(Xs), theirs.predict(Xs))
    assert mine.score(Xs, y) == theirs.score(Xs, y)
    if solver == "adam":
        mine.partial_fit(Xs, y)
        theirs.partial_fit(Xs, y)
        np.testing.assert_allclose(mine.coefs_[0], theirs.coefs_[0], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("loss", ["squared_error", "poisson"])
def test_regressor_on_sparse_input_with_early_stopping_and_weights(loss):
    """The early-stopping split, the validation score and sample weights on sparse X: the same
    validation scores and parameters as scikit-learn's MLPRegressor."""
    X, _, rng = _sparse_problem(n=120)
    y = rng.poisson(np.exp(X[:, :5].sum(axis=1))).astype(float)
    w = rng.uniform(0.5, 2.0, size=len(y))
    params = dict(
        loss=loss,
        hidden_layer_sizes=(5,),
        random_state=0,
        shuffle=False,
        max_iter=5,
        batch_size=40,
        early_stopping=True,
        learning_rate_init=0.01,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = sk.MLPRegressor(**params).fit(sp.csr_array(X), y, sample_weight=w)
        mine = bp.MLPRegressor(**params, device="cpu").fit(sp.csr_array(X), y, sample_weight=w)
    assert mine.validation_scores_ == pytest.approx(theirs.validation_scores_, rel=1e-9)
    np.testing.assert_allclose(mine.coefs_[0], theirs.coefs_[0], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(mine.predict(sp.csc_matrix(X)), theirs.predict(sp.csc_matrix(X)), rtol=1e-9)


FITS = [
    dict(),
    dict(batch_size=7),
    dict(batch_size=7, shuffle=False),
    dict(batch_size=1, epochs=2),
    dict(optimizer="lbfgs"),
    dict(optimizer="adam", batch_size=8, validation_fraction=0.2, early_stopping=True),
    dict(batch_size=5, optimizer="momentum", alpha=0.1, sample_weight=np.linspace(0.0, 2.0, 60)),
]


@pytest.mark.parametrize("options", FITS, ids=lambda o: ",".join(o) or "full-batch")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bp_fit_forward_and_gradient_on_sparse_x_equal_the_dense_ones(options, dtype):
    X, _, rng = _sparse_problem(n=60, n_features=30)
    T = rng.normal(size=(60, 2))
    nets = [
        bp.MLP([30, 5, 2], hidden="tanh", output="identity", dtype=dtype, backend="numpy", seed=0) for _ in range(2)
    ]
    kw = {"epochs": 4, "seed": 0, "progress": False, "tol": None, "learning_rate": 0.05, **options}
    dense, sparse = bp.fit(nets[0], X, T, **kw), bp.fit(nets[1], sp.coo_array(X), T, **kw)
    # scipy's sparse products sum in another order than BLAS: in float32 the results differ by
    # rounding, which L-BFGS's line search amplifies to ~1e-5 of their scale
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == "float64" else {"rtol": 1e-4, "atol": 3e-5}
    np.testing.assert_allclose(nets[1].params, nets[0].params, **tol)
    np.testing.assert_allclose(sparse.loss, dense.loss, rtol=tol["rtol"])
    np.testing.assert_allclose(nets[1].forward(sp.csc_array(X)), nets[0].forward(X), **tol)
    J, g = nets[1].loss_and_gradient(sp.csr_matrix(X), T)
    J0, g0 = nets[0].loss_and_gradient(X, T)
    assert J == pytest.approx(J0, rel=tol["rtol"])
    np.testing.assert_allclose(g, g0, **tol)


def test_sparse_x_is_never_densified():
    """A 4000 × 5000 float64 X would take 160 MB dense; training and predicting on it sparse
    (0.02 % non-zero) stays far below that: nothing makes the dense matrix."""
    X = sp.random_array((4000, 5000), density=2e-4, format="csr", random_state=1)
    T = np.asarray(X.sum(axis=1)).reshape(-1, 1)
    net = bp.MLP([5000, 4, 1], hidden="relu", output="identity", dtype="float64", backend="numpy", seed=0)
    tracemalloc.start()
    try:
        bp.fit(net, X, T, optimizer="adam", learning_rate=0.01, epochs=2, batch_size=500, progress=False)
        net.loss_and_gradient(X, T)
        net.forward(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16e6, f"peak {peak / 1e6:.1f} MB: something densified X (160 MB)"


def test_sparse_x_where_it_is_not_taken_is_a_clear_error():
    X, _, rng = _sparse_problem(n=10, n_features=12)
    net = bp.MLP([12, 3, 1], dtype="float64", backend="numpy", seed=0)
    with pytest.raises(TypeError, match="needs a dense X.*pass X.toarray"):
        bp.hessian(net, sp.csr_array(X), rng.uniform(size=(10, 1)))
    strict = bp.MLP([12, 3, 1], dtype="float64", backend=array_api_strict, seed=0)
    with pytest.raises(TypeError, match="sparse input needs the numpy or cupy backend"):
        strict.forward(sp.csr_array(X))
    bad = sp.csr_array(X)
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        net.forward(bad)
    with pytest.raises(ValueError, match="X has 12 columns but layer 0"):
        bp.MLP([5, 1], backend="numpy").forward(sp.csr_array(X))


@pytest.mark.gpu
@pytest.mark.skipif(not bp.gpu_status().usable, reason=f"no usable GPU: {bp.gpu_status().reason}")
def test_gpu_sparse_input_and_the_float64_default():
    """On CuPy: the estimators' default dtype is scikit-learn's (float64 for float64 input) and a
    sparse X goes to the device as a cupyx.scipy.sparse CSR matrix, multiplied by cuSPARSE; the
    fit and the passes equal the CPU's to float64 rounding."""
    import cupyx.scipy.sparse

    X, y, rng = _sparse_problem()
    params = dict(hidden_layer_sizes=(6,), random_state=0, shuffle=False, max_iter=6, batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cpu = bp.MLPClassifier(**params, device="cpu").fit(sp.csr_array(X), y)
        gpu = bp.MLPClassifier(**params, device="gpu").fit(sp.csr_array(X), y)
        dense_gpu = bp.MLPClassifier(**params, device="gpu").fit(X, y)
    assert gpu._net.backend.name == "cupy" and gpu._net.dtype == "float64"
    assert gpu.coefs_[0].dtype == np.float64
    for a, b, c in zip(
        gpu.coefs_ + gpu.intercepts_, cpu.coefs_ + cpu.intercepts_, dense_gpu.coefs_ + dense_gpu.intercepts_
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(gpu.predict_proba(sp.csc_matrix(X)), cpu.predict_proba(X), rtol=1e-9)

    T = rng.normal(size=(len(X), 2))
    on_gpu = bp.MLP([X.shape[1], 5, 2], hidden="tanh", output="identity", dtype="float64", backend="cupy", seed=0)
    on_cpu = bp.MLP([X.shape[1], 5, 2], hidden="tanh", output="identity", dtype="float64", backend="numpy", seed=0)
    Xg = cupyx.scipy.sparse.csr_matrix(sp.csr_matrix(X))
    J, g = on_gpu.loss_and_gradient(Xg, T)
    J0, g0 = on_cpu.loss_and_gradient(sp.csr_array(X), T)
    assert J == pytest.approx(J0, rel=1e-12)
    np.testing.assert_allclose(bp.to_numpy(g), g0, rtol=1e-10, atol=1e-14)
    for net, data in ((on_gpu, Xg), (on_cpu, sp.csr_array(X))):
        bp.fit(net, data, T, optimizer="adam", learning_rate=0.01, epochs=3, batch_size=16, seed=0, progress=False)
    np.testing.assert_allclose(bp.to_numpy(on_gpu.params), on_cpu.params, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(bp.to_numpy(on_gpu.forward(sp.coo_array(X))), on_cpu.forward(X), rtol=1e-9, atol=1e-13)
