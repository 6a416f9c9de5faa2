"""Drop-in fidelity (docs/guide/estimators.rst): each public behaviour of scikit-learn's MLP that bpgpu's
estimators match, stated in the test and checked against scikit-learn's own estimator in
the same test, so the test fails if either side changes."""

import re
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn import neural_network as sk  # noqa: E402
from sklearn.datasets import load_digits, make_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.utils._param_validation import InvalidParameterError  # noqa: E402

import bpgpu as bp  # noqa: E402

SMALL = dict(hidden_layer_sizes=(7,), random_state=0, max_iter=5)


def _pair(Estimator, params, X, y, **ours):
    """Fit scikit-learn's estimator of the same name and ours on the same data, warnings off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = getattr(sk, Estimator.__name__)(**params).fit(X, y)
        mine = Estimator(**params, device="cpu", **ours).fit(X, y)
    return mine, theirs


# --- 1. dtype --------------------------------------------------------------------


@pytest.mark.parametrize("Estimator", [bp.MLPClassifier, bp.MLPRegressor])
@pytest.mark.parametrize(
    "input_dtype, expected", [(np.float32, np.float32), (np.float64, np.float64), (np.int64, np.float64)]
)
def test_default_dtype_is_sklearns_rule(Estimator, input_dtype, expected):
    """scikit-learn keeps float32 input in float32 and computes everything else in float64:
    coefs_, intercepts_ and the predictions are in that dtype. dtype=None (the default) does the same."""
    X, y = make_classification(n_samples=60, n_features=4, random_state=0)
    X = (X * 10).astype(input_dtype)
    mine, theirs = _pair(Estimator, SMALL, X, y)
    assert mine.dtype is None
    for ours, their in zip(mine.coefs_ + mine.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert ours.dtype == their.dtype == expected
    assert mine.predict(X[:5]).dtype == theirs.predict(X[:5]).dtype
    if input_dtype is np.float64:  # the same arithmetic in the same precision: the same model
        np.testing.assert_allclose(mine.coefs_[0], theirs.coefs_[0], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the float32 cast
def test_float64_inputs_beyond_float32_range_are_not_cast_to_inf():
    """scikit-learn predicts on finite float64 inputs beyond float32's range (3.4e38); so does the
    float64 default, while the explicit dtype="float32" refuses them, naming X, rather than
    computing on Inf."""
    X, y = make_classification(n_samples=60, n_features=4, random_state=0)
    mine, theirs = _pair(bp.MLPRegressor, SMALL, X, y.astype(float))
    big = X[:3].copy()
    big[0, 0] = 1e39
    np.testing.assert_allclose(mine.predict(big), theirs.predict(big), rtol=1e-6)
    assert np.isfinite(mine.predict(big)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        single = bp.MLPRegressor(**SMALL, dtype="float32", device="cpu").fit(X, y.astype(float))
    with pytest.raises(ValueError, match="X contains NaN or Inf.*float32 holds at most 3.4e38.*dtype='float64'"):
        single.predict(big)


# --- 3. verbose -------------------------------------------------------------------

VERBOSE_CASES = [
    # per epoch "Iteration N, loss = L"; the training-loss rule's message when it stops
    dict(solver="adam", tol=10.0, n_iter_no_change=2, max_iter=8),
    # with early stopping "Validation score: S" after each epoch's line, and its own message
    dict(solver="adam", early_stopping=True, n_iter_no_change=2, tol=10.0, max_iter=8),
    # adaptive SGD: "Setting learning rate to ..." until "Learning rate too small. Stopping."
    dict(solver="sgd", learning_rate="adaptive", tol=10.0, n_iter_no_change=1, max_iter=40, learning_rate_init=1e-3),
]


@pytest.mark.parametrize("params", VERBOSE_CASES)
def test_verbose_prints_sklearns_lines(params, capsys):
    """scikit-learn's MLP with verbose=True prints one line per epoch on stdout, plus the
    validation score under early stopping and the stopping rule's message; with the same
    (unshuffled, float64) training bpgpu prints exactly the same text."""
    X, y = make_classification(n_samples=80, n_features=5, random_state=0)
    common = dict(hidden_layer_sizes=(6,), random_state=0, shuffle=False, verbose=True, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.MLPClassifier(**common).fit(X, y)
        theirs = capsys.readouterr().out
        bp.MLPClassifier(**common, device="cpu").fit(X, y)
        ours = capsys.readouterr()
    assert theirs.startswith("Iteration 1, loss = ") and "Stopping." in theirs
    assert ours.out == theirs
    assert "bpgpu fit" not in ours.err  # no bar


def test_verbose_bar_is_the_progress_bar_and_lbfgs_prints_like_sklearn(capsys):
    """verbose="bar" (bpgpu's option) shows the tqdm bar on stderr instead of scikit-learn's
    lines; L-BFGS with verbose=True prints what scikit-learn prints with this scipy (≥ 1.15:
    nothing, scipy's iprint is gone)."""
    X, y = make_classification(n_samples=80, n_features=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        bp.MLPClassifier(**SMALL, verbose="bar", device="cpu").fit(X, y)
        shown = capsys.readouterr()
        assert shown.out == "" and "bpgpu fit" in shown.err
        sk.MLPClassifier(**SMALL, solver="lbfgs", verbose=True).fit(X, y)
        theirs = capsys.readouterr().out
        bp.MLPClassifier(**SMALL, solver="lbfgs", verbose=True, device="cpu").fit(X, y)
        assert capsys.readouterr().out == theirs
    with pytest.raises(InvalidParameterError, match="verbose"):
        bp.MLPClassifier(verbose="lines").fit(X, y)


# --- 4. ConvergenceWarning when max_fun stops L-BFGS --------------------------------


@pytest.mark.parametrize("limits", [dict(max_fun=10), dict(max_iter=5)])
def test_lbfgs_warns_like_sklearn_when_max_fun_or_max_iter_stops_it(limits):
    """scikit-learn warns (ConvergenceWarning, "lbfgs failed to converge after N iteration(s)
    (status=1): ...") whenever L-BFGS stops before converging, by max_iter or by max_fun."""
    X, y = load_digits(return_X_y=True)
    params = dict(solver="lbfgs", random_state=0, hidden_layer_sizes=(20,), **limits)
    messages = []
    for make in (sk.MLPClassifier, bp.MLPClassifier):
        with pytest.warns(ConvergenceWarning) as record:
            est = make(**params).fit(X / 16.0, y)
        messages.append(([str(w.message) for w in record], est.n_iter_))
    assert messages[0] == messages[1]
    assert messages[1][0][0].startswith(f"lbfgs failed to converge after {messages[1][1]} iteration(s) (status=1)")


# --- 5. divergence -------------------------------------------------------------------

DIVERGING = dict(
    hidden_layer_sizes=(8,),
    solver="sgd",
    learning_rate_init=0.05,
    momentum=0.9,
    shuffle=False,
    random_state=0,
    max_iter=30,
    n_iter_no_change=50,
)


def _diverging_data():
    X, y = make_regression(n_samples=100, n_features=5, random_state=0)
    return X, 10 * y


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings, on both sides
def test_divergence_with_early_stopping_keeps_the_best_parameters_like_sklearn():
    """scikit-learn with early_stopping=True: a run whose loss turns NaN does not raise, records
    nan (a Python float) in validation_scores_ and ends with the parameters of the best
    validation score. bpgpu stops at the divergence instead of running on NaN, so its scores are
    scikit-learn's up to there and its final parameters are the same."""
    X, y = _diverging_data()
    mine, theirs = _pair(bp.MLPRegressor, dict(DIVERGING, early_stopping=True), X, y)
    n = len(mine.validation_scores_)
    assert n < theirs.n_iter_ and mine.n_iter_ == n
    last = mine.validation_scores_[-1]
    assert type(last) is float and np.isnan(last) and np.isnan(theirs.validation_scores_[n - 1])
    np.testing.assert_allclose(mine.validation_scores_[:-1], theirs.validation_scores_[: n - 1], rtol=1e-9)
    assert mine.best_validation_score_ == pytest.approx(theirs.best_validation_score_, rel=1e-12)
    for ours, their in zip(mine.coefs_ + mine.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, their, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_without_early_stopping_raises_sklearns_value_error():
    """Without early stopping scikit-learn raises ValueError("Solver produced non-finite
    parameter weights. ..."); so do bpgpu's estimators (from bp.fit's DivergenceError, now a
    ValueError itself), and the estimator keeps its last finite parameters."""
    X, y = _diverging_data()
    message = (
        "Solver produced non-finite parameter weights. The input data may contain large values and "
        "need to be preprocessed."
    )
    params = DIVERGING
    for make in (sk.MLPRegressor, bp.MLPRegressor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            with pytest.raises(ValueError, match=re.escape(message)) as info:
                est = make(**params)
                est.fit(X, y)
    assert isinstance(info.value.__cause__, bp.DivergenceError)
    assert all(np.isfinite(c).all() for c in est.coefs_ + est.intercepts_)
    assert issubclass(bp.DivergenceError, ValueError)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bp_fit_keeps_divergence_error_and_early_stopping_keeps_its_best():
    """bp.fit raises DivergenceError (a ValueError); with early stopping the net then holds the
    parameters of the best validation score, as the estimators keep them."""
    X, y = _diverging_data()
    net = bp.MLP([5, 8, 1], hidden="relu", output="identity", dtype="float64", backend="numpy", seed=0)
    best = []

    def keep(epoch, history, net):
        if history.validation_score[-1] == history.best_validation_score:
            best.append(bp.to_numpy(net.params).copy())

    with pytest.raises(ValueError) as info:
        bp.fit(
            net,
            X,
            y.reshape(-1, 1),
            optimizer="momentum",
            learning_rate=0.05,
            epochs=30,
            shuffle=False,
            validation_fraction=0.2,
            early_stopping=True,
            n_iter_no_change=50,
            progress=False,
            callbacks=[keep],
        )
    assert isinstance(info.value, bp.DivergenceError)
    np.testing.assert_array_equal(bp.to_numpy(net.params), best[-1])


# --- 7. stratified early-stopping split --------------------------------------------


def test_early_stopping_split_is_sklearns_stratified_split():
    """scikit-learn stratifies the early-stopping split of a binary target on the binarized labels
    (booleans): the same data gets the same split (so, unshuffled in float64, the same validation
    scores and parameters), and a class too small to split is named as scikit-learn names it."""
    X = np.random.RandomState(0).randn(60, 3)
    y = np.where(X[:, 0] > 0.3, "yes", "no")
    params = dict(
        hidden_layer_sizes=(5,),
        early_stopping=True,
        shuffle=False,
        random_state=1,
        max_iter=15,
        validation_fraction=0.3,
        learning_rate_init=0.01,
    )
    mine, theirs = _pair(bp.MLPClassifier, params, X, y)
    assert mine.validation_scores_ == pytest.approx(theirs.validation_scores_, rel=1e-12)
    np.testing.assert_allclose(mine.coefs_[0], theirs.coefs_[0], rtol=1e-9)

    X, y = np.arange(8.0).reshape(4, 2), np.array([0, 0, 0, 1])
    errors = []
    for make in (sk.MLPClassifier, bp.MLPClassifier):
        with pytest.raises(ValueError) as info:
            make(early_stopping=True, validation_fraction=0.5).fit(X, y)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and errors[1].endswith("Classes with too few members are: ['True']")


# --- 9. unknown names ----------------------------------------------------------------


def test_unknown_activation_or_loss_name_is_an_error_even_where_no_layer_uses_it():
    """scikit-learn refuses an unknown activation name whatever the architecture (its parameter
    validation); bp.MLP refuses an unknown hidden activation even for a net without hidden layers,
    and an unknown loss or output name always."""
    X, y = make_classification(n_samples=20, n_features=4, random_state=0)
    with pytest.raises(InvalidParameterError, match="activation"):
        sk.MLPClassifier(hidden_layer_sizes=(), activation="swishy").fit(X, y)
    with pytest.raises(ValueError, match="unknown hidden activation 'swishy'"):
        bp.MLP([3, 2], hidden="swishy")
    with pytest.raises(ValueError, match="unknown hidden activation 'swishy' for layer 1"):
        bp.MLP([3, 4, 2], hidden="swishy")
    with pytest.raises(ValueError, match="unknown output activation 'swishy'"):
        bp.MLP([3, 2], output="swishy")
    with pytest.raises(ValueError, match="unknown loss 'swishy'"):
        bp.MLP([3, 2], output="identity", loss="swishy")


# --- 6. Poisson loss -----------------------------------------------------------------


def _counts(n_outputs=1, n=120):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 4))
    rate = np.exp(0.5 * X[:, :1] - 0.3 * X[:, 1:2] + 0.1 * np.arange(n_outputs))
    y = rng.poisson(rate).astype(float)
    return X, (y[:, 0] if n_outputs == 1 else y)


@pytest.mark.parametrize("n_outputs", [1, 2])
@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
def test_poisson_regressor_reproduces_sklearn(solver, n_outputs):
    """scikit-learn ≥ 1.7: MLPRegressor(loss="poisson") has an exp output (log link) and minimises
    half the Poisson deviance, averaged over samples and summed over outputs. Unshuffled in float64
    bpgpu's fit gives the same parameters, loss_ and predictions."""
    X, y = _counts(n_outputs)
    params = dict(
        loss="poisson",
        hidden_layer_sizes=(6,),
        random_state=0,
        shuffle=False,
        max_iter=8,
        batch_size=32,
        alpha=1e-2,
        solver=solver,
    )
    mine, theirs = _pair(bp.MLPRegressor, params, X, y)
    assert mine.out_activation_ == theirs.out_activation_ == "exp"
    assert mine.loss_ == pytest.approx(theirs.loss_, rel=1e-12)
    for ours, their in zip(mine.coefs_ + mine.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(ours, their, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(mine.predict(X), theirs.predict(X), rtol=1e-9)
    assert mine.get_params()["loss"] == "poisson"
    assert set(bp.MLPRegressor().get_params()) == set(sk.MLPRegressor().get_params()) | {"device", "dtype"}
    assert bp.MLPRegressor("poisson").loss == sk.MLPRegressor("poisson").loss == "poisson"  # loss comes first
    with pytest.raises(InvalidParameterError, match="loss"):
        bp.MLPRegressor(loss="gamma").fit(X, y)


@pytest.mark.parametrize("output", ["exp", "softplus"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_poisson_loss_of_the_net_is_half_sklearns_mean_poisson_deviance(output, reduction):
    """bp.MLP(loss="poisson"): J = c Σ_n [t log(t/a) − t + a], c = 1/m or 1 — half of scikit-learn's
    mean_poisson_deviance (times m for "sum"), zero targets included (0 log 0 = 0); exp is its
    canonical output (δ(L) = e^z − t, the loss from the logits), softplus any other positive one."""
    from sklearn.metrics import mean_poisson_deviance

    X, y = _counts(n=40)
    y[:5] = 0.0
    net = bp.MLP(
        [4, 5, 1],
        hidden="tanh",
        output=output,
        loss="poisson",
        reduction=reduction,
        dtype="float64",
        backend="numpy",
        seed=1,
    )
    a = bp.to_numpy(net.forward(X))[:, 0]
    expected = 0.5 * mean_poisson_deviance(y, a) * (1 if reduction == "mean" else len(y))
    assert net.loss(X, y) == pytest.approx(expected, rel=1e-12)
    assert net.loss_function.is_canonical(net.activations[-1]) == (output == "exp")


def test_poisson_output_delta_is_exp_z_minus_t_like_torch():
    """The canonical pair's gradient against PyTorch's PoissonNLLLoss(log_input=True) (e^z − t z per
    element, the same gradient; the deviance's t log t − t does not depend on w) by autograd."""
    torch = pytest.importorskip("torch")
    X, y = _counts(n=30)
    net = bp.MLP([4, 1], output="exp", loss="poisson", dtype="float64", backend="numpy", seed=2)
    theta = torch.tensor(np.asarray(net.theta(1)), requires_grad=True)
    z = torch.tensor(X) @ theta[:, 1:].T + theta[:, 0]
    loss = torch.nn.PoissonNLLLoss(log_input=True, full=False, reduction="sum")(z[:, 0], torch.tensor(y)) / len(y)
    loss.backward()
    np.testing.assert_allclose(net.theta(1, net.gradient(X, y)), theta.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_poisson_refuses_negative_targets_and_outputs_that_can_be_negative():
    X, y = _counts(n=10)
    net = bp.MLP([4, 1], output="exp", loss="poisson", dtype="float64", backend="numpy")
    with pytest.raises(ValueError, match="T must be >= 0 for loss='poisson'"):
        net.loss(X, -y - 1)
    with pytest.raises(ValueError, match="needs outputs > 0.*'identity'"):
        bp.MLP([4, 1], output="identity", loss="poisson")
