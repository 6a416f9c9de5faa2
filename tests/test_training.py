"""bp.fit and bp.train_step: convergence, exact first steps, stopping rules, divergence, allocations."""

import sys
import tracemalloc

import array_api_strict
import numpy as np
import pytest

import bpgpu as bp
from bpgpu.optim import SGD
from bpgpu.training import _sample_sgd_step

XOR_X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_T = np.array([[0.0], [1.0], [1.0], [0.0]])


def xor_net(dtype="float64", backend="numpy", seed=0):
    return bp.MLP(
        [2, 4, 1],
        hidden="tanh",
        output="sigmoid",
        loss="binary_cross_entropy",
        dtype=dtype,
        backend=backend,
        init="glorot",
        seed=seed,
    )


def regression_data(m=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(m, 1))
    return X, np.sin(X)


def regression_net(seed=0, dtype="float64", backend="numpy"):
    return bp.MLP(
        [1, 16, 1],
        hidden="tanh",
        output="identity",
        loss="squared_error",
        dtype=dtype,
        backend=backend,
        init="glorot",
        seed=seed,
    )


def test_xor_is_learned_by_full_batch_gradient_descent():
    net = xor_net()
    history = bp.fit(net, XOR_X, XOR_T, optimizer="sgd", learning_rate=2.0, epochs=400, progress=False, tol=None)
    assert history.epochs == 400 and history.stop_reason == "epochs"
    np.testing.assert_array_equal(np.round(net.forward(XOR_X)), XOR_T)
    assert history.loss[-1] < 0.05 < history.loss[0]


def test_regression_reaches_a_low_loss_with_adam_mini_batches():
    X, T = regression_data()
    net = regression_net()
    history = bp.fit(
        net, X, T, optimizer="adam", learning_rate=0.02, epochs=300, batch_size=16, seed=3, progress=False, tol=None
    )
    assert history.loss[-1] < 2e-3, history.loss[-1]
    assert net.loss(X, T) < 2e-3


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "lbfgs"])
def test_each_optimizer_decreases_the_loss(optimizer):
    X, T = regression_data(32)
    net = regression_net(seed=1)
    before = net.loss(X, T)
    lr = 0.01 if optimizer == "adam" else 0.05
    history = (
        bp.fit(
            net, X, T, optimizer=optimizer, learning_rate=lr, epochs=30, batch_size=8, seed=0, progress=False, tol=None
        )
        if optimizer != "lbfgs"
        else bp.fit(net, X, T, optimizer="lbfgs", epochs=30, progress=False)
    )
    after = net.loss(X, T)
    assert after < 0.5 * before, (before, after)
    assert history.loss[-1] == pytest.approx(after, rel=0.5)


def test_same_seed_same_result_and_the_seed_drives_the_shuffle():
    X, T = regression_data(40)
    runs = []
    for seed in (7, 7, 8):
        net = regression_net(seed=2)
        bp.fit(net, X, T, optimizer="momentum", learning_rate=0.05, epochs=5, batch_size=8, seed=seed, progress=False)
        runs.append(bp.to_numpy(net.params))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def assert_same_step(actual, expected, step_path):
    """Bit-exact on the numpy path; the compiled step sums in another order (1 ulp)."""
    if step_path == "numpy path":
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=1e-16)


def test_float64_mini_batch_sgd_steps_are_w_minus_lr_g_by_hand(step_path):
    X, T = regression_data(6, seed=4)
    net = regression_net(seed=5)
    lr, seed = 0.3, 11
    w = bp.to_numpy(net.params).copy()
    hand = net.copy()
    order = np.random.default_rng(seed).permutation(6)  # the documented batch order
    for batch in (order[:3], order[3:]):
        g = hand.gradient(X[batch], T[batch])  # mean reduction: (1/3) Σ over the batch
        w = w - lr * g
        hand.set_params(w)
    bp.fit(net, X, T, optimizer="sgd", learning_rate=lr, epochs=1, batch_size=3, seed=seed, progress=False)
    assert_same_step(bp.to_numpy(net.params), w, step_path)


def test_first_full_batch_step_is_w_minus_lr_g(step_path):
    X, T = regression_data(5, seed=6)
    net = regression_net(seed=7)
    expected = bp.to_numpy(net.params) - 0.1 * net.gradient(X, T)
    loss_before = net.loss(X, T)
    history = bp.fit(net, X, T, learning_rate=0.1, epochs=1, progress=False)
    assert_same_step(bp.to_numpy(net.params), expected, step_path)
    assert history.loss == [pytest.approx(loss_before, rel=1e-14)]  # the batch loss at w before the step


def test_single_sample_fused_update_equals_the_gradient_step():
    rng = np.random.default_rng(8)
    net = bp.MLP(
        [3, 5, 4, 2],
        hidden=["tanh", "relu"],
        output="softmax",
        loss="cross_entropy",
        dtype="float64",
        backend="numpy",
        init="glorot",
        seed=9,
    )
    twin = net.copy()
    x, t = net.check_inputs(rng.normal(size=(1, 3)), np.array([[0.0, 1.0]]))
    loss_fused = _sample_sgd_step(net, x, t, SGD(net, 0.2))
    loss_plain = bp.train_step(twin, x, t, SGD(twin, 0.2))
    assert float(loss_fused) == pytest.approx(float(loss_plain), rel=1e-15)
    np.testing.assert_allclose(net.params, twin.params, rtol=1e-14, atol=1e-16)


def test_batch_size_one_fit_uses_per_sample_updates():
    X, T = regression_data(4, seed=10)
    net = regression_net(seed=11)
    hand = net.copy()
    order = np.random.default_rng(0).permutation(4)
    w = bp.to_numpy(hand.params).copy()
    for i in order:
        w = w - 0.1 * hand.gradient(X[i : i + 1], T[i : i + 1])
        hand.set_params(w)
    bp.fit(net, X, T, learning_rate=0.1, epochs=1, batch_size=1, seed=0, progress=False)
    np.testing.assert_allclose(bp.to_numpy(net.params), w, rtol=1e-13, atol=1e-15)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings while it diverges
def test_divergence_restores_the_last_finite_parameters_and_names_epoch_and_step():
    X, T = regression_data(32, seed=12)
    net = regression_net(seed=13)
    seen = [bp.to_numpy(net.params).copy()]  # the parameters at the start of each epoch
    with pytest.raises(bp.DivergenceError, match=r"epoch \d+, step \d+ of 4") as info:
        bp.fit(
            net,
            X,
            T,
            optimizer="sgd",
            learning_rate=50.0,
            epochs=100,
            batch_size=8,
            seed=0,
            progress=False,
            tol=None,
            callbacks=[lambda e, h, n: seen.append(bp.to_numpy(n.params).copy())],
        )
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.epoch == len(seen) and 1 <= err.step <= 4
    assert err.history.epochs == err.epoch - 1 and err.history.stop_reason == "diverged"
    final = bp.to_numpy(net.params)
    assert np.all(np.isfinite(final))
    np.testing.assert_array_equal(final, seen[-1])


def test_floating_point_errors_mid_epoch_are_a_divergence_at_that_step(numpy_path):
    # numpy set to raise (or RuntimeWarning as an error, as in this test suite): caught at the step itself
    X, T = regression_data(32, seed=12)
    net = regression_net(seed=13)
    start = bp.to_numpy(net.params).copy()
    # step 1 makes w ~ 1e200 (finite); step 2's matmul overflows
    with (
        np.errstate(over="raise", invalid="raise"),
        pytest.raises(bp.DivergenceError, match="epoch 1, step 2 of 4") as info,
    ):
        bp.fit(net, X, T, optimizer="sgd", learning_rate=1e200, epochs=5, batch_size=8, shuffle=False, progress=False)
    assert isinstance(info.value.__cause__, FloatingPointError)
    np.testing.assert_array_equal(net.params, start)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_after_divergence_the_same_optimizer_can_go_on_with_a_smaller_rate():
    X, T = regression_data(32, seed=12)
    net = regression_net(seed=13)
    start = bp.to_numpy(net.params).copy()
    opt = bp.make_optimizer("momentum", net, 1e30)
    with pytest.raises(bp.DivergenceError):
        bp.fit(net, X, T, optimizer=opt, epochs=100, batch_size=8, seed=0, progress=False, tol=None)
    assert not np.any(opt.velocity)
    # the epoch-start parameters are finite but may be huge after such steps: start over from the init
    net.set_params(start)
    opt.learning_rate = 0.01
    before = net.loss(X, T)
    bp.fit(net, X, T, optimizer=opt, epochs=20, batch_size=8, progress=False, tol=None)
    assert net.loss(X, T) < before


def test_tol_rule_stops_like_scikit_learn():
    X, T = regression_data(16)
    net = regression_net()
    history = bp.fit(net, X, T, learning_rate=0.01, epochs=100, tol=1e3, n_iter_no_change=3, progress=False)
    # epoch 1 sets best_loss; epochs 2.. each miss by tol; stop once the count exceeds 3
    assert history.epochs == 5 and history.stop_reason == "tol"


def test_adaptive_schedule_divides_the_rate_by_five_then_stops():
    X, T = regression_data(16)
    net = regression_net()
    history = bp.fit(
        net, X, T, learning_rate=0.01, epochs=500, tol=1e3, n_iter_no_change=1, lr_schedule="adaptive", progress=False
    )
    rates = sorted(set(history.learning_rate), reverse=True)
    np.testing.assert_allclose(rates, [0.01 / 5**k for k in range(len(rates))])
    assert rates[-1] <= 1e-6 and history.stop_reason == "tol"


def test_invscaling_schedule():
    X, T = regression_data(10)
    net = regression_net()
    history = bp.fit(net, X, T, learning_rate=0.1, epochs=3, lr_schedule="invscaling", power_t=0.5, progress=False)
    np.testing.assert_allclose(history.learning_rate, [0.1 / (10 * e + 1) ** 0.5 for e in (1, 2, 3)])


def test_early_stopping_restores_the_best_validation_parameters():
    X, T = regression_data(60, seed=14)
    net = regression_net(seed=15)
    history = bp.fit(
        net,
        X,
        T,
        optimizer="adam",
        learning_rate=0.05,
        epochs=300,
        batch_size=10,
        seed=1,
        validation_fraction=0.2,
        early_stopping=True,
        n_iter_no_change=3,
        tol=1e-2,
        progress=False,
    )
    assert history.stop_reason == "early_stopping" and history.epochs < 300
    assert len(history.validation_loss) == len(history.validation_score) == history.epochs
    assert history.best_validation_score == max(history.validation_score)
    # the restored parameters score exactly the best validation score on the same held-out rows
    order = np.random.default_rng(1).permutation(60)[:12]
    assert -net.loss(X[order], T[order]) == pytest.approx(history.best_validation_score, rel=1e-12)


def test_validation_data_and_custom_score_are_recorded():
    X, T = regression_data(30)
    Xv, Tv = regression_data(10, seed=99)
    net = regression_net()
    calls = []

    def score(n, xv, tv):
        calls.append(xv.shape)
        return 1.0 - n.loss(xv, tv)

    history = bp.fit(
        net, X, T, learning_rate=0.1, epochs=4, validation_data=(Xv, Tv), validation_score=score, progress=False
    )
    assert calls == [(10, 1)] * 4
    np.testing.assert_allclose(history["validation_score"], 1.0 - np.array(history["validation_loss"]), rtol=1e-12)


def test_callbacks_get_epoch_history_net_and_can_stop():
    X, T = regression_data(8)
    net = regression_net()
    seen = []

    def callback(epoch, history, n):
        seen.append((epoch, history.epochs, n is net))
        return epoch == 3

    later = []
    history = bp.fit(net, X, T, epochs=10, callbacks=[callback, lambda e, h, n: later.append(e)], progress=False)
    assert seen == [(1, 1, True), (2, 2, True), (3, 3, True)] and history.stop_reason == "callback"
    assert later == [1, 2, 3]  # every callback still sees the epoch that stops training


def test_progress_bar_shows_epoch_and_loss(capsys):
    X, T = regression_data(8)
    bp.fit(regression_net(), X, T, epochs=3, validation_fraction=0.25, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "val_score=" in err


def test_progress_without_tqdm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    X, T = regression_data(8)
    with pytest.raises(ImportError, match=r"bpgpu\[sklearn\].*progress=False"):
        bp.fit(regression_net(), X, T, epochs=1, progress=True)
    bp.fit(regression_net(), X, T, epochs=1, progress=False)


def test_train_step_allocates_nothing_after_warm_up():
    rng = np.random.default_rng(16)
    net = bp.MLP(
        [20, 256, 64, 5],
        hidden="relu",
        output="softmax",
        loss="cross_entropy",
        dtype="float32",
        backend="numpy",
        init="he",
        seed=0,
    )
    X, T = net.check_inputs(rng.normal(size=(50, 20)), np.eye(5)[rng.integers(0, 5, 50)])
    opt = bp.make_optimizer("adam", net, 1e-3, alpha=1e-4)
    for _ in range(3):
        bp.train_step(net, X, T, opt)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(50):  # Python's free lists settle (a few kB once, under tracemalloc)
        bp.train_step(net, X, T, opt)
    settled = tracemalloc.get_traced_memory()[0]
    for _ in range(1000):
        bp.train_step(net, X, T, opt)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # a leak of even one 0-d array per step would be ≥ 100 kB here; a few kB is interpreter noise
    assert current - settled < 8_000, f"memory grew by {current - settled} bytes over 1000 steps"
    # numpy's ufunc iterator buffers a broadcast bias add in at most 8192 elements (32 kB here, whatever
    # the batch); anything the size of the gradient (88 kB) or a layer (51 kB) would be a hidden temporary.
    assert net.n_params * 4 > 80_000
    assert peak - base < 40_000, f"a step allocated {peak - base} bytes (the gradient is {net.n_params * 4})"


def test_fit_epochs_do_not_grow_memory():
    X, T = regression_data(64)
    net = regression_net()
    opt = bp.make_optimizer("nesterov", net, 0.01)
    bp.fit(net, X, T, optimizer=opt, epochs=2, batch_size=8, seed=0, progress=False)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    bp.fit(net, X, T, optimizer=opt, epochs=20, batch_size=8, seed=0, progress=False, tol=None)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 20_000, grown


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "momentum", "batch_size": 6, "alpha": 1e-3, "validation_fraction": 0.2},
        {"optimizer": "sgd", "batch_size": 1},  # the fused one-sample update
        {"optimizer": "lbfgs", "epochs": 10},
    ],
)
def test_generic_path_on_array_api_strict_matches_numpy(options):
    X, T = regression_data(20)
    nets = [regression_net(seed=3, backend=b) for b in ("numpy", array_api_strict)]
    options = {"learning_rate": 0.05, "epochs": 3, "seed": 2, **options}
    if options["optimizer"] == "lbfgs":
        del options["learning_rate"]
    for net in nets:
        bp.fit(net, X, T, progress=False, **options)
    np.testing.assert_allclose(np.asarray(nets[1].params), nets[0].params, rtol=1e-12, atol=1e-14)


def test_partial_fit_style_continuation_with_the_same_optimizer():
    X, T = regression_data(16)
    a, b = regression_net(), regression_net()
    bp.fit(a, X, T, optimizer="adam", learning_rate=0.01, epochs=4, batch_size=4, shuffle=False, progress=False)
    opt = bp.make_optimizer("adam", b, 0.01)
    for _ in range(4):
        bp.fit(b, X, T, optimizer=opt, epochs=1, batch_size=4, shuffle=False, progress=False)
    np.testing.assert_array_equal(a.params, b.params)
    assert opt.t == 16 and opt.samples_seen == 64


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"optimizer": "rmsprop"}, ValueError, "optimizer must be one of"),
        ({"optimizer": "sgd", "momentum": 0.9}, TypeError, "momentum"),
        ({"optimizer": "adam", "lr_schedule": "invscaling"}, ValueError, "lr_schedule"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"early_stopping": True}, ValueError, "validation"),
        ({"validation_fraction": 1.5}, ValueError, "validation_fraction"),
        ({"callbacks": [3]}, TypeError, "callbacks"),
        ({"optimizer": "lbfgs", "momentum": 0.5}, TypeError, "lbfgs"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    X, T = regression_data(8)
    with pytest.raises(error, match=match):
        bp.fit(regression_net(), X, T, progress=False, **kwargs)


def test_optimizer_bound_to_another_net_is_refused():
    X, T = regression_data(8)
    opt = bp.make_optimizer("sgd", regression_net(), 0.1)
    with pytest.raises(ValueError, match="another net"):
        bp.fit(regression_net(), X, T, optimizer=opt, progress=False)


def test_lbfgs_records_iterations_and_obeys_callbacks():
    X, T = regression_data(20)
    net = regression_net()
    history = bp.fit(net, X, T, optimizer="lbfgs", epochs=50, callbacks=[lambda e, h, n: e == 4], progress=False)
    assert history.epochs == 4 and history.stop_reason == "callback"
    assert history.loss == sorted(history.loss, reverse=True)
    assert net.loss(X, T) == pytest.approx(history.loss[-1], rel=1e-6)
