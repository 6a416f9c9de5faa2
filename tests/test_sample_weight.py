"""Sample weights: J = c Σ_n s_n J_n (c = 1/Σ s for reduction="mean"), as scikit-learn weighs its MLP.

The checks are independent of the weighted code: an integer weight k must act as
the sample repeated k times (0 as the sample removed), and the weighted gradient
must be the central-difference derivative of the weighted loss.
"""

import warnings

import numpy as np
import pytest
from helpers import HIDDEN, OUTPUT_LOSS_PAIRS, central_difference_gradient, targets_for

import bpgpu as bp
from bpgpu import optim
from bpgpu.training import train_step

WEIGHTS = np.array([1.0, 0.0, 2.0, 3.0, 1.0, 4.0, 0.0])


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-300))


def problem(hidden, output, loss, reduction="mean", seed=0, sizes=(3, 4, 3)):
    rng = np.random.default_rng(seed)
    net = bp.MLP(
        list(sizes),
        hidden=hidden,
        output=output,
        loss=loss,
        reduction=reduction,
        dtype="float64",
        backend="numpy",
        seed=seed,
    )
    m = WEIGHTS.size
    return net, rng.normal(size=(m, sizes[0])), targets_for(loss, output, m, sizes[-1], rng)


def repeated(X, T, s=WEIGHTS):
    rows = np.repeat(np.arange(len(s)), s.astype(int))
    return X[rows], T[rows]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_integer_weights_act_as_repeated_samples(hidden, output, loss, reduction):
    net, X, T = problem(hidden, output, loss, reduction)
    J, g = net.loss_and_gradient(X, T, sample_weight=WEIGHTS)
    J_rep, g_rep = net.loss_and_gradient(*repeated(X, T))
    assert J == pytest.approx(J_rep, rel=1e-12)
    assert relative(g, g_rep) <= 1e-12
    assert net.loss(X, T, sample_weight=WEIGHTS) == pytest.approx(J, rel=1e-15)


class _Weighted:
    """The net seen through its weighted loss, for the central-difference helper."""

    def __init__(self, net, s):
        self.net, self.s = net, s

    @property
    def params(self):
        return self.net.params

    def set_params(self, w):
        self.net.set_params(w)

    def loss(self, X, T):
        return self.net.loss(X, T, sample_weight=self.s)


@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_weighted_gradient_matches_central_differences(output, loss):
    net, X, T = problem("tanh", output, loss, seed=3)
    s = np.random.default_rng(3).uniform(0.0, 2.0, size=WEIGHTS.size)  # real-valued weights too
    g = net.gradient(X, T, sample_weight=s)
    assert relative(g, central_difference_gradient(_Weighted(net, s), X, T)) <= 1e-6


def test_weighted_passes_on_array_api_strict_match_numpy():
    strict = pytest.importorskip("array_api_strict")
    net, X, T = problem("sigmoid", "softmax", "cross_entropy")
    twin = bp.MLP(
        [3, 4, 3], hidden="sigmoid", output="softmax", loss="cross_entropy", dtype="float64", backend=strict, seed=0
    )
    J, g = net.loss_and_gradient(X, T, sample_weight=WEIGHTS)
    J_strict, g_strict = twin.loss_and_gradient(strict.asarray(X), strict.asarray(T), sample_weight=WEIGHTS)
    assert J_strict == pytest.approx(J, rel=1e-12)
    assert relative(np.asarray(g_strict), g) <= 1e-12


@pytest.mark.parametrize(
    "bad,error,message",
    [
        (np.ones(6), ValueError, r"sample_weight must have shape \(7,\).*X has 7 rows.*got shape \(6,\)"),
        (np.ones((7, 1)), ValueError, r"shape \(7,\).*got shape \(7, 1\)"),
        (np.r_[np.ones(6), -1.0], ValueError, r"sample_weight must be >= 0, got -1 at row 6"),
        (np.r_[np.ones(6), np.nan], ValueError, r"sample_weight contains NaN or Inf"),
        (np.zeros(7), ValueError, r"at least one non-zero weight \(all are zero\)"),
        (np.array(["a"] * 7), TypeError, r"sample_weight must hold real numbers"),
    ],
)
def test_bad_weights_are_clear_errors(bad, error, message):
    net, X, T = problem("relu", "identity", "squared_error")
    with pytest.raises(error, match=message):
        net.loss(X, T, sample_weight=bad)
    with pytest.raises(error, match=message):
        bp.fit(net, X, T, sample_weight=bad, epochs=1, progress=False)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "lbfgs"])
def test_full_batch_fit_with_integer_weights_is_fit_on_repeated_samples(optimizer):
    net, X, T = problem("tanh", "sigmoid", "binary_cross_entropy")
    twin = net.copy()
    options = dict(optimizer=optimizer, epochs=15, progress=False, alpha=0.01)
    if optimizer != "lbfgs":
        options.update(batch_size=None, learning_rate=0.1)
    weighted = bp.fit(net, X, T, sample_weight=WEIGHTS, **options)
    plain = bp.fit(twin, *repeated(X, T), **options)
    assert np.allclose(weighted.loss, plain.loss, rtol=1e-9, atol=0)
    tol = 1e-5 if optimizer == "lbfgs" else 1e-12  # L-BFGS's line search amplifies rounding
    assert relative(net.params, twin.params) <= tol


def test_train_step_with_weights_is_the_weighted_loss_plus_the_l2_term():
    net, X, T = problem("relu", "identity", "squared_error")
    opt = optim.SGD(net, learning_rate=0.1, alpha=0.5)
    before = net.copy()
    weights = net.weighting(WEIGHTS)
    loss = float(train_step(net, *net.check_inputs(X, T), opt, weights))
    squares = sum(float(np.sum(before.theta(l)[:, 1:] ** 2)) for l in (1, 2))
    assert loss == pytest.approx(before.loss(X, T, WEIGHTS) + 0.5 * 0.5 * squares / WEIGHTS.sum(), rel=1e-12)
    # the update used the weighted gradient with the L2 term alpha W / Σ s
    g = before.gradient(X, T, WEIGHTS)
    for l in (1, 2):
        before.theta(l, g)[:, 1:] += 0.5 * before.theta(l)[:, 1:] / WEIGHTS.sum()
    assert relative(net.params, before.params - 0.1 * g) <= 1e-12


def test_equal_weights_under_mean_change_nothing_and_keep_the_compiled_step():
    net, X, T = problem("relu", "identity", "squared_error")
    twin = net.copy()
    options = dict(optimizer="adam", batch_size=3, epochs=4, seed=0, progress=False)
    bp.fit(net, X, T, sample_weight=np.full(WEIGHTS.size, 2.5), **options)
    bp.fit(twin, X, T, **options)
    np.testing.assert_array_equal(net.params, twin.params)


def test_weights_scale_a_sum_reduction():
    net, X, T = problem("relu", "identity", "squared_error", reduction="sum")
    assert net.loss(X, T, np.full(WEIGHTS.size, 2.0)) == pytest.approx(2.0 * net.loss(X, T), rel=1e-15)


def test_minibatches_shuffled_and_a_validation_split_carry_their_weights():
    net, X, T = problem("tanh", "softmax", "cross_entropy", sizes=(3, 5, 3))
    rng = np.random.default_rng(1)
    X, T = np.vstack([X] * 6), np.vstack([T] * 6)
    s = rng.uniform(0.5, 2.0, size=X.shape[0])
    history = bp.fit(
        net,
        X,
        T,
        sample_weight=s,
        optimizer="adam",
        learning_rate=0.01,
        batch_size=8,
        epochs=3,
        seed=0,
        validation_fraction=0.25,
        progress=False,
    )
    assert len(history.loss) == 3 and np.all(np.isfinite(history.loss))
    # the validation loss is the weighted loss of the held-out rows (the fit's own split, redrawn here)
    perm = np.random.default_rng(0).permutation(X.shape[0])
    val = perm[: int(np.ceil(0.25 * X.shape[0]))]
    assert history.validation_loss[-1] == pytest.approx(net.loss(X[val], T[val], s[val]), rel=1e-10)


def test_a_split_with_only_zero_weights_is_refused():
    net, X, T = problem("relu", "identity", "squared_error")
    s = np.zeros(WEIGHTS.size)
    s[np.random.default_rng(0).permutation(WEIGHTS.size)[:2]] = 1.0  # only the rows the split holds out
    with pytest.raises(ValueError, match="sample_weight is zero on every row of the training split"):
        bp.fit(net, X, T, sample_weight=s, validation_fraction=0.25, seed=0, epochs=1, progress=False)


def test_estimators_take_sample_weight_in_fit_and_partial_fit():
    pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.exceptions import ConvergenceWarning

    X, y = make_classification(n_samples=80, n_features=5, random_state=0)
    s = np.where(y == 1, 3.0, 1.0)
    clf = bp.MLPClassifier(
        hidden_layer_sizes=(8,),
        max_iter=30,
        dtype="float64",
        random_state=0,
        device="cpu",
        early_stopping=True,
        n_iter_no_change=50,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y, sample_weight=s)
    assert np.isfinite(clf.best_validation_score_) and len(clf.validation_scores_) == clf.n_iter_
    reg = bp.MLPRegressor(hidden_layer_sizes=(8,), dtype="float64", random_state=0, device="cpu")
    reg.partial_fit(X, y.astype(float), sample_weight=s)
    twin = bp.MLPRegressor(
        hidden_layer_sizes=(8,), dtype="float64", random_state=0, device="cpu", shuffle=False, batch_size=80
    )
    twin.partial_fit(X, y.astype(float), sample_weight=np.ones(80))  # equal weights: the unweighted epoch
    plain = bp.MLPRegressor(
        hidden_layer_sizes=(8,), dtype="float64", random_state=0, device="cpu", shuffle=False, batch_size=80
    ).partial_fit(X, y.astype(float))
    np.testing.assert_array_equal(twin.coefs_[0], plain.coefs_[0])
