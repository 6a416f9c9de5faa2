"""bp.MLPClassifier / bp.MLPRegressor: scikit-learn's estimator checks, exact agreement with
scikit-learn's MLP where no randomness is involved, comparable accuracy where it is, and
pickling / bp.save round trips."""

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn import neural_network as sk  # noqa: E402
from sklearn.datasets import load_digits, make_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils._param_validation import Interval, Options  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import bpgpu as bp  # noqa: E402

# Small nets (with a larger step than the default, to pass the accuracy checks in 100
# epochs) for the tests below that fit many times on 2 shared cores.
SMALL = dict(hidden_layer_sizes=(16,), max_iter=100, learning_rate_init=0.01, device="cpu")


# scikit-learn's own checks on the estimators exactly as a user makes them (default arguments,
# dtype=None: scikit-learn's precision), with no expected failure. (Skipped by scikit-learn itself
# here: pandas input when pandas is absent, array-API input unless SCIPY_ARRAY_API=1,
# decision_function.)
@parametrize_with_checks([bp.MLPClassifier(), bp.MLPRegressor()])
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
@pytest.mark.parametrize("Estimator", [bp.MLPClassifier, bp.MLPRegressor])
def test_integer_sample_weights_equal_repeated_samples_in_float64(Estimator, solver):
    """scikit-learn's own check for every solver: weight k ≡ the sample k times (0 ≡ removed)."""
    from sklearn.utils.estimator_checks import check_sample_weight_equivalence_on_dense_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check_sample_weight_equivalence_on_dense_data(Estimator.__name__, Estimator(**SMALL, solver=solver))


# --- exact agreement with scikit-learn where nothing random differs ------------
# Same random_state -> the same initial parameters (sklearn's Glorot draw in its order);
# with shuffle=False the batches are the same too, so in float64 every epoch must
# reproduce scikit-learn's parameters and loss_ to rounding.


def _blobs(n_classes, n=120, seed=0):
    X, y = make_classification(
        n_samples=n, n_features=6, n_informative=4, n_classes=n_classes, n_clusters_per_class=1, random_state=seed
    )
    return X, y


def _assert_same_model(ours, theirs, rtol=1e-9):
    assert len(ours.coefs_) == len(theirs.coefs_)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=rtol)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=rtol)
    for name in ("n_iter_", "t_", "n_layers_", "n_outputs_", "out_activation_", "n_features_in_"):
        assert getattr(ours, name) == getattr(theirs, name), name


EXACT = dict(hidden_layer_sizes=(7, 5), random_state=3, shuffle=False, max_iter=6, alpha=1e-2, batch_size=32)


@pytest.mark.parametrize(
    "solver, options",
    [
        ("adam", {}),
        ("sgd", dict(learning_rate_init=0.05, momentum=0.0)),
        ("sgd", dict(learning_rate_init=0.05, momentum=0.9, nesterovs_momentum=False)),
        ("sgd", dict(learning_rate_init=0.05, momentum=0.9, learning_rate="invscaling")),
    ],
)
@pytest.mark.parametrize("n_classes, activation", [(2, "logistic"), (3, "relu"), (4, "tanh")])
def test_classifier_reproduces_sklearn_exactly(solver, options, n_classes, activation):
    X, y = _blobs(n_classes)
    params = dict(EXACT, solver=solver, activation=activation, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = bp.MLPClassifier(**params, dtype="float64", device="cpu").fit(X, y)
        theirs = sk.MLPClassifier(**params).fit(X, y)
    _assert_same_model(ours, theirs)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-9)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))


def test_multilabel_and_regressor_reproduce_sklearn_exactly():
    X, y = _blobs(3)
    Y = np.column_stack([y == 0, y != 1, X[:, 0] > 0]).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = bp.MLPClassifier(**EXACT, dtype="float64", device="cpu").fit(X, Y)
        theirs = sk.MLPClassifier(**EXACT).fit(X, Y)
        _assert_same_model(ours, theirs)
        np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
        assert ours.out_activation_ == "logistic"

        Xr, yr = make_regression(n_samples=100, n_features=5, noise=1.0, random_state=0)
        yr = yr / yr.std()
        ours = bp.MLPRegressor(**EXACT, dtype="float64", device="cpu").fit(Xr, yr)
        theirs = sk.MLPRegressor(**EXACT).fit(Xr, yr)
    _assert_same_model(ours, theirs)
    np.testing.assert_allclose(ours.predict(Xr), theirs.predict(Xr), rtol=1e-9, atol=1e-12)


def test_partial_fit_keeps_optimizer_state_like_sklearn():
    X, y = _blobs(3)
    params = dict(hidden_layer_sizes=(6,), random_state=0, shuffle=False, batch_size=40)
    ours = bp.MLPClassifier(**params, dtype="float64", device="cpu")
    theirs = sk.MLPClassifier(**params)
    with pytest.raises(ValueError, match="classes must be passed"):
        ours.partial_fit(X, y)
    for _ in range(3):
        ours.partial_fit(X, y, classes=[0, 1, 2])
        theirs.partial_fit(X, y, classes=[0, 1, 2])
    _assert_same_model(ours, theirs)  # n_iter_ too: sklearn counts the epochs of the last call only
    assert ours.n_iter_ == 1 and ours.t_ == 3 * len(X) and len(ours.loss_curve_) == 3


def test_warm_start_continues_like_sklearn():
    X, y = _blobs(2)
    params = dict(EXACT, solver="sgd", learning_rate="invscaling", learning_rate_init=0.1, warm_start=True)
    ours = bp.MLPClassifier(**params, dtype="float64", device="cpu")
    theirs = sk.MLPClassifier(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(2):
            ours.fit(X, y)
            theirs.fit(X, y)
    _assert_same_model(ours, theirs)  # the invscaling schedule went on counting samples (t_)
    assert len(ours.loss_curve_) == 2 * ours.n_iter_ and ours.t_ == 2 * ours.n_iter_ * len(X)
    with pytest.raises(ValueError, match="same classes"):
        ours.fit(X, y + 1)


def test_early_stopping_and_lbfgs_follow_sklearn():
    X, y = load_digits(return_X_y=True)
    X = X[:600] / 16.0
    y = y[:600]
    params = dict(
        hidden_layer_sizes=(16,),
        random_state=0,
        early_stopping=True,
        max_iter=60,
        n_iter_no_change=3,
        learning_rate_init=0.01,
    )
    ours = bp.MLPClassifier(**params, device="cpu").fit(X, y)
    theirs = sk.MLPClassifier(**params).fit(X, y)
    assert ours.best_loss_ is None and len(ours.validation_scores_) == ours.n_iter_
    assert ours.best_validation_score_ == max(ours.validation_scores_)
    assert abs(ours.best_validation_score_ - theirs.best_validation_score_) <= 0.05
    assert abs(ours.n_iter_ - theirs.n_iter_) <= 10

    params = dict(hidden_layer_sizes=(10,), random_state=0, solver="lbfgs", max_iter=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = bp.MLPClassifier(**params, dtype="float64", device="cpu").fit(X, y)
        theirs = sk.MLPClassifier(**params).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-4)
    assert not hasattr(ours, "partial_fit")
    # a gradient already below tol: no iteration, loss_ is the starting loss (L2 term included)
    params.update(tol=1e6, alpha=0.5)
    ours = bp.MLPClassifier(**params, dtype="float64", device="cpu").fit(X, y)
    theirs = sk.MLPClassifier(**params).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ == 0
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-12)


# --- comparable accuracy with the default float32 and shuffling -----------------


def test_accuracy_comparable_to_sklearn_on_digits():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.3, stratify=y, random_state=0)
    params = dict(hidden_layer_sizes=(64,), max_iter=60, learning_rate_init=3e-3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = bp.MLPClassifier(**params, device="cpu").fit(X_train, y_train).score(X_test, y_test)
        theirs = sk.MLPClassifier(**params).fit(X_train, y_train).score(X_test, y_test)
    assert ours >= 0.95 and abs(ours - theirs) <= 0.02, (ours, theirs)


def test_r2_comparable_to_sklearn():
    X, y = make_regression(n_samples=400, n_features=8, n_informative=6, noise=5.0, random_state=1)
    X_train, X_test, y_train, y_test = train_test_split(StandardScaler().fit_transform(X), y / y.std(), random_state=0)
    params = dict(hidden_layer_sizes=(32,), max_iter=150, learning_rate_init=1e-2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = bp.MLPRegressor(**params, device="cpu").fit(X_train, y_train).score(X_test, y_test)
        theirs = sk.MLPRegressor(**params).fit(X_train, y_train).score(X_test, y_test)
    assert ours >= 0.9 and abs(ours - theirs) <= 0.03, (ours, theirs)


# --- attributes, pickling, bp.save / bp.load -------------------------------------


def _fitted_pair():
    X, y = _blobs(3)
    labels = np.array(["ant", "bee", "cat"])[y]
    clf = bp.MLPClassifier(hidden_layer_sizes=(5, 4), max_iter=30, random_state=0, device="cpu")
    reg = bp.MLPRegressor(hidden_layer_sizes=(5,), max_iter=30, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return X, clf.fit(X, labels), reg.fit(X, np.column_stack([X[:, 0], X[:, 1] - X[:, 2]]))


def test_fitted_attributes_have_sklearn_shapes_and_view_the_net():
    X, clf, reg = _fitted_pair()
    assert [c.shape for c in clf.coefs_] == [(6, 5), (5, 4), (4, 3)]
    assert [b.shape for b in clf.intercepts_] == [(5,), (4,), (3,)]
    assert clf.n_layers_ == 4 and clf.n_outputs_ == 3 and clf.out_activation_ == "softmax"
    assert list(clf.classes_) == ["ant", "bee", "cat"] and clf.n_features_in_ == 6
    assert len(clf.loss_curve_) == clf.n_iter_ == 30 and clf.best_loss_ == min(clf.loss_curve_)
    assert clf.validation_scores_ is None
    assert reg.out_activation_ == "identity" and reg.predict(X).shape == (len(X), 2)
    # coefs_[i] is Wᵀ of layer i + 1 of the net: writing into it changes the predictions.
    np.testing.assert_array_equal(clf.coefs_[0], clf._net.layout.wt(clf._net.params, 1))
    proba = clf.predict_proba(X)
    assert proba.dtype == np.float64 and np.allclose(proba.sum(axis=1), 1, atol=1e-12)
    clf.intercepts_[-1][0] += 100.0
    assert (clf.predict(X) == "ant").all()


def test_pickle_round_trip_predicts_the_same_and_keeps_the_optimizer_state():
    X, clf, reg = _fitted_pair()
    for est in (clf, reg):
        twin = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(twin.predict(X), est.predict(X))
        assert twin.loss_curve_ == est.loss_curve_
    y = clf.predict(X)
    twin = pickle.loads(pickle.dumps(clf))
    clf.partial_fit(X, y)
    twin.partial_fit(X, y)  # the same Adam moments and step count, so the same step
    np.testing.assert_array_equal(twin.predict_proba(X), clf.predict_proba(X))


def test_save_load_round_trip(tmp_path):
    if not hasattr(bp, "save"):
        pytest.fail("bp.save / bp.load are missing (bpgpu/io.py)")
    X, clf, reg = _fitted_pair()
    for est in (clf, reg):
        path = tmp_path / f"{type(est).__name__}.npz"
        bp.save(est, path)
        twin = bp.load(path)
        assert type(twin) is type(est)
        assert twin.get_params() == est.get_params()
        np.testing.assert_array_equal(twin.predict(X), est.predict(X))
        for name in ("n_iter_", "loss_", "loss_curve_", "best_loss_", "n_layers_", "out_activation_", "t_"):
            assert getattr(twin, name) == getattr(est, name), name
    np.testing.assert_array_equal(bp.load(tmp_path / "MLPClassifier.npz").predict_proba(X), clf.predict_proba(X))

    # multilabel targets, early stopping (best_loss_ None), float64: all survive the file
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] > 0]).astype(int)
    multi = bp.MLPClassifier(
        hidden_layer_sizes=(4,), max_iter=20, early_stopping=True, random_state=0, dtype="float64", device="cpu"
    ).fit(X, Y)
    bp.save(multi, tmp_path / "multi.npz")
    twin = bp.load(tmp_path / "multi.npz", backend="numpy")
    np.testing.assert_array_equal(twin.predict(X), multi.predict(X))
    assert twin.best_loss_ is None and twin.validation_scores_ == multi.validation_scores_
    assert twin.coefs_[0].dtype == np.float64

    # a file whose parameters do not fit the architecture is refused, naming the file
    state, arrays = clf.__bpgpu_state__()
    state["layer_units"][1] += 1
    with pytest.raises(ValueError, match="n_params"):
        type(clf).__bpgpu_from_state__(state, arrays, "numpy")


# --- errors and the optional dependency ------------------------------------------


def test_bad_parameters_name_themselves():
    X, y = _blobs(2)
    with pytest.raises(ValueError, match="device"):
        bp.MLPClassifier(device="tpu").fit(X, y)
    with pytest.raises(ValueError, match="dtype"):
        bp.MLPRegressor(dtype="float16").fit(X, y)
    with pytest.raises(ValueError, match="activation"):
        bp.MLPClassifier(activation="softplus").fit(X, y)
    clf = bp.MLPClassifier(hidden_layer_sizes=(3,), max_iter=2, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but MLPClassifier is expecting 6"):
        clf.predict(X[:, :5])


def _constraint(c):
    """One parameter constraint of scikit-learn's validation as plain values (its objects have no ==)."""
    if isinstance(c, Interval):
        return ("Interval", c.type, c.left, c.right, c.closed)
    if isinstance(c, Options):  # StrOptions too
        return (type(c).__name__, c.type, frozenset(c.options), frozenset(c.deprecated or ()))
    return c


@pytest.mark.parametrize("ours, theirs", [(bp.MLPClassifier, sk.MLPClassifier), (bp.MLPRegressor, sk.MLPRegressor)])
def test_parameter_constraints_are_the_installed_scikit_learns(ours, theirs):
    """bpgpu declares scikit-learn's constraints itself (importing sklearn.neural_network to read
    them would cost a fresh process 0.09 s): every one equal to the installed scikit-learn's,
    plus bpgpu's solver "lm", verbose "bar", device and dtype."""
    mine = {name: [_constraint(c) for c in cs] for name, cs in ours._parameter_constraints.items()}  # noqa: SLF001
    sklearns = {name: [_constraint(c) for c in cs] for name, cs in theirs._parameter_constraints.items()}  # noqa: SLF001
    assert set(mine) - set(sklearns) == {"device", "dtype"}
    assert set(sklearns) <= set(mine)
    solver = sklearns.pop("solver")[0]
    assert mine.pop("solver") == [(solver[0], solver[1], solver[2] | {"lm"}, solver[3])]
    assert mine.pop("verbose") == [*sklearns.pop("verbose"), ("StrOptions", str, frozenset({"bar"}), frozenset())]
    assert {name: mine[name] for name in sklearns} == sklearns


def test_a_fit_without_early_stopping_does_not_import_sklearn_metrics():
    """scikit-learn's metrics and model_selection (0.09 s in a fresh process) load only for
    early stopping's split and score, or score()."""
    code = (
        "import sys, numpy as np, bpgpu\n"
        "X = np.random.default_rng(0).normal(size=(40, 3)); y = (X[:, 0] > 0).astype(int)\n"
        "bpgpu.MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, device='cpu').fit(X, y).predict(X)\n"
        "bpgpu.MLPRegressor(hidden_layer_sizes=(4,), max_iter=3, device='cpu').fit(X, X[:, 1]).predict(X)\n"
        "heavy = ('sklearn.metrics', 'sklearn.model_selection', 'sklearn.neural_network')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "bpgpu.MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, device='cpu', early_stopping=True).fit(X, y)\n"
        "print('sklearn.metrics' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "True"]


def test_import_bpgpu_does_not_import_sklearn_and_missing_sklearn_names_the_extra():
    code = (
        "import sys, bpgpu\n"
        "assert 'sklearn' not in sys.modules, 'import bpgpu imported sklearn'\n"
        "sys.modules['sklearn'] = None  # as if it were not installed\n"
        "try:\n"
        "    bpgpu.MLPClassifier\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'bpgpu[sklearn]'" in out


@pytest.mark.gpu
@pytest.mark.skipif(not bp.gpu_status().usable, reason=f"no usable GPU: {bp.gpu_status().reason}")
def test_gpu_matches_cpu_and_returns_numpy(tmp_path):
    X, y = _blobs(3)
    params = dict(hidden_layer_sizes=(8,), max_iter=20, random_state=0, shuffle=False, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cpu = bp.MLPClassifier(**params, device="cpu").fit(X, y)
        gpu = bp.MLPClassifier(**params, device="gpu").fit(X, y)
    proba = gpu.predict_proba(X)
    assert type(proba) is np.ndarray and type(gpu.coefs_[0]) is np.ndarray
    np.testing.assert_allclose(proba, cpu.predict_proba(X), rtol=1e-8, atol=1e-10)
    twin = pickle.loads(pickle.dumps(gpu))
    np.testing.assert_array_equal(twin.predict(X), gpu.predict(X))
    bp.save(gpu, tmp_path / "gpu.npz")  # saved from the GPU, loaded on the CPU
    on_cpu = bp.load(tmp_path / "gpu.npz", backend="numpy")
    np.testing.assert_allclose(on_cpu.predict_proba(X), proba, rtol=1e-12)
