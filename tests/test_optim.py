"""Optimizer kernel twins and the optimizer objects of bpgpu.optim."""

import array_api_strict
import numpy as np
import pytest

from bpgpu.kernels import cpu, generic

N = 37


def _state(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    w, g, m = (rng.normal(size=N).astype(dtype) for _ in range(3))
    v = rng.uniform(0.1, 2.0, size=N).astype(dtype)
    mask = (rng.uniform(size=N) > 0.3).astype(dtype)
    return w, g, m, v, mask


# Straightforward numpy formulas, as in scikit-learn's _stochastic_optimizers.py.
def _reference(op, w, g, m, v, mask):
    lr, mu, b1, b2, eps, alpha = 0.05, 0.9, 0.9, 0.999, 1e-8, 1e-3
    if op == "sgd_update":
        return (w - lr * g,), (w, g, lr)
    if op == "momentum_update":
        vn = mu * v - lr * g
        return (w + vn, vn), (w, g, v, lr, mu)
    if op == "nesterov_update":
        vn = mu * v - lr * g
        return (w + mu * vn - lr * g, vn), (w, g, v, lr, mu)
    if op == "adam_update":
        mn = b1 * m + (1 - b1) * g
        vn = b2 * v + (1 - b2) * g**2
        return (w - lr * mn / (np.sqrt(vn) + eps), mn, vn), (w, g, m, v, lr, b1, b2, eps)
    if op == "l2_grad":
        return (g + alpha * mask * w,), (g, w, mask, alpha)
    raise AssertionError(op)


FLAT_OPS = ["sgd_update", "momentum_update", "nesterov_update", "adam_update", "l2_grad"]
UPDATED = {
    "sgd_update": (0,),
    "momentum_update": (0, 2),
    "nesterov_update": (0, 2),
    "adam_update": (0, 2, 3),
    "l2_grad": (0,),
}  # which arguments the op writes


@pytest.mark.parametrize("op", FLAT_OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_twin_matches_formula_in_place(op, dtype):
    expected, args = _reference(op, *_state(1, dtype))
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    inputs = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    scratch = np.empty(N, dtype=dtype)
    out = getattr(cpu, op)(*args, scratch)
    assert out is args[0]  # in place, returns its first argument
    rtol = 1e-5 if dtype == np.float32 else 1e-13
    for got_index, want in zip(UPDATED[op], expected):
        assert args[got_index].dtype == dtype
        np.testing.assert_allclose(args[got_index], want, rtol=rtol, atol=rtol)
    for i, (before, after) in enumerate(zip(inputs, args)):
        if i not in UPDATED[op] and isinstance(before, np.ndarray):
            np.testing.assert_array_equal(before, after)  # inputs such as g are not clobbered


def test_sgd_update_is_exactly_w_minus_lr_g_in_float64():
    w, g, *_ = _state(2)
    expected = w - 0.1 * g
    cpu.sgd_update(w, g, 0.1, np.empty(N))
    np.testing.assert_array_equal(w, expected)


def test_numpy_twins_allocate_nothing():
    import tracemalloc

    w, g, m, v, mask = _state(3)
    w, g, m, v, mask = (np.tile(a, 2000) for a in (w, g, m, v, mask))  # ~600 kB each
    scratch = np.empty_like(w)
    cpu.adam_update(w, g, m, v, 1e-3, 0.9, 0.999, 1e-8, scratch)  # warm-up
    tracemalloc.start()
    cpu.adam_update(w, g, m, v, 1e-3, 0.9, 0.999, 1e-8, scratch)
    cpu.nesterov_update(w, g, v, 0.1, 0.9, scratch)
    cpu.l2_grad(g, w, mask, 1e-4, scratch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10_000, f"an update allocated {peak} bytes (a hidden temporary of w's size is {w.nbytes})"


def _outer_state(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    n_in, n_out = 5, 3
    return (
        rng.normal(size=(n_in, n_out)).astype(dtype),
        rng.normal(size=n_out).astype(dtype),
        rng.normal(size=n_in).astype(dtype),
        rng.normal(size=n_out).astype(dtype),
    )


def test_outer_sgd_update_numpy_matches_formula():
    wt, b, a, d = _outer_state(4)
    want_wt, want_b = wt - 0.3 * np.outer(a, d), b - 0.3 * d
    cpu.outer_sgd_update(wt, b, a, d, 0.3, np.empty_like(wt))
    np.testing.assert_allclose(wt, want_wt, rtol=1e-14)
    np.testing.assert_allclose(b, want_b, rtol=1e-14)


def _strict(a):
    return array_api_strict.asarray(a) if isinstance(a, np.ndarray) else a


@pytest.mark.parametrize("op", FLAT_OPS)
def test_generic_twin_matches_numpy_twin_on_array_api_strict(op):
    _, args = _reference(op, *_state(5))
    np_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    getattr(cpu, op)(*np_args, np.empty(N))
    strict_args = [_strict(a) for a in args]
    getattr(generic, op)(*strict_args, array_api_strict.empty(N, dtype=array_api_strict.float64))
    for i in UPDATED[op]:
        np.testing.assert_allclose(np.asarray(strict_args[i]), np_args[i], rtol=1e-13, atol=1e-15)


def test_outer_sgd_update_generic_matches_numpy():
    wt, b, a, d = _outer_state(6)
    np_args = [x.copy() for x in (wt, b, a, d)]
    cpu.outer_sgd_update(*np_args, 0.3, np.empty_like(wt))
    s_args = [_strict(x) for x in (wt, b, a, d)]
    generic.outer_sgd_update(*s_args, 0.3, None)
    np.testing.assert_allclose(np.asarray(s_args[0]), np_args[0], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(s_args[1]), np_args[1], rtol=1e-14)


def test_kernel_table_lists_the_optimizer_ops():
    from bpgpu.kernels import OPS

    for op in FLAT_OPS + ["outer_sgd_update"]:
        assert op in OPS and callable(getattr(cpu, op)) and callable(getattr(generic, op))


# --- the optimizer objects against scikit-learn's own -----------------------------

import bpgpu as bp  # noqa: E402


def _net(dtype="float64"):
    return bp.MLP([3, 4, 2], hidden="tanh", output="identity", dtype=dtype, backend="numpy", init="glorot", seed=1)


@pytest.mark.parametrize(
    ("name", "schedule", "sk_kwargs"),
    [
        ("sgd", "constant", {"momentum": 0.0, "nesterov": False}),
        ("sgd", "invscaling", {"momentum": 0.0, "nesterov": False}),
        ("momentum", "constant", {"momentum": 0.8, "nesterov": False}),
        ("nesterov", "invscaling", {"momentum": 0.8, "nesterov": True}),
        ("nesterov", "adaptive", {"momentum": 0.9, "nesterov": True}),
        ("adam", "constant", {}),
    ],
)
def test_optimizers_follow_scikit_learns_trajectory(name, schedule, sk_kwargs):
    sk = pytest.importorskip("sklearn.neural_network._stochastic_optimizers")
    net = _net()
    w_sk = np.array(net.params, copy=True)
    if name == "adam":
        ours = bp.make_optimizer("adam", net, 0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-7)
        theirs = sk.AdamOptimizer([w_sk], 0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-7)
    else:
        options = {"momentum": sk_kwargs["momentum"]} if name != "sgd" else {}
        ours = bp.make_optimizer(name, net, 0.05, lr_schedule=schedule, power_t=0.4, **options)
        theirs = sk.SGDOptimizer([w_sk], 0.05, lr_schedule=schedule, power_t=0.4, **sk_kwargs)
    rng = np.random.default_rng(2)
    samples = 0
    for epoch in range(4):
        for _ in range(3):
            g = rng.normal(size=net.n_params)
            ours.update(np.array(g))
            theirs.update_params([w_sk], [g])
        samples += 10
        ours.iteration_ends(samples)
        theirs.iteration_ends(samples)
        assert ours.learning_rate == pytest.approx(theirs.learning_rate, rel=1e-15)
        if epoch == 2:
            assert ours.trigger_stopping() == theirs.trigger_stopping("", False)
            assert ours.learning_rate == pytest.approx(theirs.learning_rate, rel=1e-15)
        np.testing.assert_allclose(net.params, w_sk, rtol=1e-13, atol=1e-15)


def test_l2_penalty_is_scikit_learns_and_spares_the_biases():
    net = _net()
    opt = bp.make_optimizer("sgd", net, 0.1, alpha=0.3)
    grad = np.zeros(net.n_params)
    penalty = opt.penalize(grad, 1.0 / 8)  # a batch of 8, reduction="mean"
    w = np.asarray(net.params)
    weights = [net.theta(l)[:, 1:] for l in (1, 2)]
    expected_penalty = 0.5 * 0.3 * sum(np.sum(W**2) for W in weights) / 8  # sklearn: (alpha/2) Σ‖W‖² / m
    assert float(penalty) == pytest.approx(expected_penalty, rel=1e-14)
    for l in (1, 2):
        np.testing.assert_array_equal(net.theta(l, grad)[:, 0], 0.0)  # biases: no penalty
        np.testing.assert_allclose(net.theta(l, grad)[:, 1:], 0.3 * net.theta(l)[:, 1:] / 8, rtol=1e-15)
    assert opt.penalize(grad, 1.0) != 0.0 and bp.make_optimizer("sgd", net, 0.1).penalize(grad, 1.0) == 0.0
    assert np.all(np.isfinite(w))


def test_state_vectors_are_flat_on_the_nets_backend():
    net = bp.MLP([3, 4, 2], dtype="float32", backend=array_api_strict, seed=0)
    opt = bp.make_optimizer("adam", net, 1e-3)
    for v in (opt.m, opt.v, opt._scratch):
        assert v.shape == (net.n_params,) and v.dtype == array_api_strict.float32
        assert type(v) is type(net.params)


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("sgd", {"momentum": 0.9}, TypeError, "momentum"),
        ("momentum", {"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\)"),
        ("adam", {"beta_1": -0.1}, ValueError, "beta_1"),
        ("adam", {"epsilon": 0.0}, ValueError, "epsilon"),
        ("sgd", {"alpha": -1.0}, ValueError, "alpha"),
        ("sgd", {"lr_schedule": "cosine"}, ValueError, "lr_schedule"),
        ("lbfgs", {}, ValueError, "not a step optimizer"),
        ("rmsprop", {}, ValueError, "optimizer must be one of"),
    ],
)
def test_make_optimizer_rejects_bad_options(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        bp.make_optimizer(name, _net(), 0.1, **kwargs)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_reset_state_zeroes_velocity_and_moments(name):
    net = _net()
    opt = bp.make_optimizer(name, net, 0.1)
    opt.update(np.ones(net.n_params))
    opt.reset_state()
    for attr in ("velocity", "m", "v"):
        if hasattr(opt, attr):
            assert not np.any(getattr(opt, attr))
    assert getattr(opt, "t", 0) == 0
    w = np.array(net.params, copy=True)
    opt.update(np.ones(net.n_params))  # a first step again: for adam lr_t = lr·√(1−β2)/(1−β1)
    step = w - np.asarray(net.params)
    root = np.sqrt(1 - 0.999)  # √v after one step of g = 1
    expected = {"nesterov": 0.9 * 0.1 + 0.1, "adam": 0.1 * root / 0.1 * 0.1 / (root + 1e-8)}.get(name, 0.1)
    np.testing.assert_allclose(step, expected, rtol=1e-12)
