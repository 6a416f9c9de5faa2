"""bpgpu.dask against the single-process net: local schedulers, then a LocalCluster."""

import os
import pickle
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import array_api_strict
import dask
import dask.array as da
import numpy as np
import pytest

import bpgpu as bp
import bpgpu.dask as bd
from bpgpu.backend import of_array

distributed = pytest.importorskip("distributed")

M, ROWS = 600, 97  # an uneven last chunk on purpose
LOCAL = ["sync", "threads"]


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make(output="identity", loss="squared_error", reduction="mean", dtype="float64", sizes=(4, 6, 3), seed=0):
    rng = np.random.default_rng(seed)
    net = bp.MLP(list(sizes), hidden="tanh", output=output, loss=loss, reduction=reduction,
                 dtype=dtype, backend="numpy", epsilon=0.5, seed=seed)
    X = rng.normal(size=(M, sizes[0]))
    if loss == "squared_error":
        T = rng.normal(size=(M, sizes[-1]))
    else:
        T = np.eye(sizes[-1])[rng.integers(0, sizes[-1], size=M)]
    return net, X, T


def chunked(*arrays, rows=ROWS):
    return [da.from_array(a, chunks=(rows,) + a.shape[1:]) for a in arrays]


# --- local schedulers ----------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", LOCAL)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("output,loss", [("identity", "squared_error"), ("softmax", "cross_entropy"),
                                         ("sigmoid", "binary_cross_entropy")])
def test_loss_and_gradient_equal_single_process(scheduler, reduction, output, loss):
    net, X, T = make(output, loss, reduction)
    J, g = net.loss_and_gradient(X, T)
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler=scheduler):
        Jd, gd = bd.loss_and_gradient(net, Xd, Td)
        assert abs(bd.loss(net, Xd, Td) - J) <= 1e-10 * abs(J)
        assert relative(bd.gradient(net, Xd, Td), g) <= 1e-10
    assert abs(Jd - J) <= 1e-10 * abs(J)
    assert relative(gd, g) <= 1e-10
    assert isinstance(gd, np.ndarray) and gd.dtype == np.float64 and gd.shape == (net.n_params,)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("output,loss", [("identity", "squared_error"), ("softmax", "cross_entropy")])
def test_hvp_equals_single_process(reduction, output, loss):
    from bpgpu.derivatives import hvp

    net, X, T = make(output, loss, reduction)
    v = np.random.default_rng(5).normal(size=net.n_params)
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="threads"):
        Hv = bd.hvp(net, Xd, Td, v)
    assert relative(Hv, hvp(net, X, T, v)) <= 1e-10


def test_float32_net_gives_float32_gradient_near_single_process():
    net, X, T = make(dtype="float32")
    Xd, Td = chunked(X.astype(np.float32), T.astype(np.float32))
    with dask.config.set(scheduler="sync"):
        gd = bd.gradient(net, Xd, Td)
    assert gd.dtype == np.float32
    assert relative(gd, net.gradient(X, T)) <= 1e-5


def test_one_output_accepts_1d_targets():
    net, X, T = make(sizes=(4, 5, 1))
    Xd, td = chunked(X, T[:, 0])
    with dask.config.set(scheduler="sync"):
        assert relative(bd.gradient(net, Xd, td), net.gradient(X, T)) <= 1e-10


def test_driver_params_untouched():
    net, X, T = make()
    before = net.params.copy()
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="sync"):
        bd.gradient(net, Xd, Td)
    np.testing.assert_array_equal(net.params, before)


def test_chunk_array_type_picks_the_backend():
    assert of_array(np.ones(3)).name == "numpy"
    assert of_array(array_api_strict.ones(3)).name == "array_api_strict"


@pytest.mark.gpu
@pytest.mark.skipif(not bp.gpu_status().usable, reason=bp.gpu_status().reason)
def test_cupy_chunks_computed_on_the_gpu():
    import cupy

    net, X, T = make()
    Xd, Td = (a.map_blocks(cupy.asarray) for a in chunked(X, T))
    with dask.config.set(scheduler="threads"):
        gd = bd.gradient(net, Xd, Td)
    assert relative(gd, net.gradient(X, T)) <= 1e-10


# --- bad input ---------------------------------------------------------------------------


def test_bad_inputs_name_the_argument_and_chunks():
    net, X, T = make()
    Xd, Td = chunked(X, T)
    with pytest.raises(TypeError, match="X must be a dask.array.Array"):
        bd.gradient(net, X, Td)
    with pytest.raises(TypeError, match="T must be a dask.array.Array"):
        bd.loss(net, Xd, T)
    with pytest.raises(ValueError, match=r"X.chunks\[0\]=\(97, .*T.chunks\[0\]=\(100, "):
        bd.gradient(net, Xd, da.from_array(T, chunks=(100, 3)))
    with pytest.raises(ValueError, match=r"X must be one chunk along the columns, got X.chunks\[1\]=\(2, 2\)"):
        bd.gradient(net, da.from_array(X, chunks=(ROWS, 2)), Td)
    with pytest.raises(ValueError, match=r"T has 2 columns but layer 2 \(output\)"):
        bd.gradient(net, Xd, Td[:, :2])
    unknown = Xd[da.from_array(np.ones(M, dtype=bool), chunks=ROWS)]
    with pytest.raises(ValueError, match="X has unknown chunk sizes"):
        bd.gradient(net, unknown, Td)
    with pytest.raises(ValueError, match="v must be a flat vector of length n_params=51"):
        bd.hvp(net, Xd, Td, np.ones(5))


def test_graph_is_a_tree_reduction_carrying_the_vector_once():
    net = bp.MLP([4, 300, 3], dtype="float64", backend="numpy", seed=0)  # 2403 parameters
    Xd, Td = da.zeros((M, 4), chunks=(50, 4)), da.zeros((M, 3), chunks=(50, 3))  # 12 chunks
    with dask.config.set(scheduler="sync", split_every=3):
        summed = bd._summed(net, Xd, Td, bd._loss_and_gradient_sum, 1 + net.n_params, net.params)
        graph = dict(summed.__dask_graph__())
    vector_bytes = 8 * net.n_params
    assert len(pickle.dumps(graph)) < 2 * vector_bytes  # not once per chunk (12 × 19 kB)
    assert b"MLP" not in pickle.dumps(graph)
    partial_levels = {k[0] for k in graph if isinstance(k, tuple) and "partial" in k[0]}
    assert partial_levels  # 12 chunks, 3 at a time: intermediate sums, not one 12-way sum


# --- training: the same trajectory as one process --------------------------------------------


def one_process_sgd(net, X, T, epochs, batch_size, seed, chunk_rows, update, learning_rate, **options):
    """Mini-batch SGD in one process with bpgpu.dask.fit's batching, written out directly:
    step s of an epoch takes the s-th of S np.array_split parts of every chunk,
    S = min(ceil(m / batch_size), largest chunk's rows)."""
    from bpgpu.optim import make_optimizer

    steps = min(-(-len(X) // batch_size), max(chunk_rows))
    starts = np.cumsum((0,) + chunk_rows)
    parts = [np.array_split(np.arange(a, b), steps) for a, b in zip(starts, starts[1:])]
    rule, rng = make_optimizer(update, net, learning_rate, **options), np.random.default_rng(seed)
    for _ in range(epochs):
        for s in rng.permutation(steps):
            rows = np.concatenate([p[s] for p in parts])
            rule.update(net.gradient(X[rows], T[rows]))


@pytest.mark.parametrize("update,options", [("sgd", {}), ("momentum", {"momentum": 0.9}), ("adam", {})])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_minibatch_sgd_equals_one_process(update, options, reduction):
    net, X, T = make(reduction=reduction)
    reference = net.copy()
    lr = 0.05 if reduction == "mean" else 0.05 / 64
    one_process_sgd(reference, X, T, 2, 64, 7, (ROWS,) * 6 + (18,), update, lr, **options)
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="threads"):
        history = bd.fit(net, Xd, Td, "sgd", max_iter=2, batch_size=64, seed=7, update=update,
                         learning_rate=lr, **options)
    assert history.epochs == 2 and history.loss[1] < history.loss[0] and history.stop_reason == "max_iter"
    assert relative(net.params, reference.params) <= 1e-10


def test_sgd_with_more_steps_than_rows_in_a_chunk():
    net, X, T = make()
    reference = net.copy()
    one_process_sgd(reference, X, T, 1, 5, 2, (ROWS,) * 6 + (18,), "sgd", 0.05)  # 97 steps: empty shares
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="sync"):
        bd.fit(net, Xd, Td, "sgd", max_iter=1, batch_size=5, seed=2, learning_rate=0.05)
    assert relative(net.params, reference.params) <= 1e-10


def test_full_batch_gd_equals_one_process_and_stops_at_tol():
    from bpgpu.optim import make_optimizer

    net, X, T = make()
    reference = net.copy()
    rule = make_optimizer("sgd", reference, 0.5)
    losses = []
    for _ in range(6):
        J, g = reference.loss_and_gradient(X, T)
        losses.append(J)
        rule.update(g)
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="sync"):
        history = bd.fit(net, Xd, Td, "gd", max_iter=6, learning_rate=0.5)
        np.testing.assert_allclose(history.loss, losses, rtol=1e-10)
        assert history.learning_rate == [0.5] * 6 and history.stop_reason == "max_iter"
        assert relative(net.params, reference.params) <= 1e-10
        stopped = bd.fit(net, Xd, Td, "gd", max_iter=50, tol=10.0)  # max |g| <= tol at once
        assert stopped.loss == pytest.approx([reference.loss(X, T)], rel=1e-10)
        assert stopped.stop_reason == "tol"


def test_gd_with_l2_penalty_equals_one_process():
    from bpgpu.optim import make_optimizer

    net, X, T = make()
    reference = net.copy()
    rule = make_optimizer("momentum", reference, 0.3, momentum=0.5, alpha=0.2)
    losses = []
    for _ in range(4):
        J, g = reference.loss_and_gradient(X, T)
        losses.append(J + float(rule.penalize(g, 1.0 / M)))
        rule.update(g)
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="threads"):
        history = bd.fit(net, Xd, Td, "gd", max_iter=4, update="momentum", learning_rate=0.3, momentum=0.5, alpha=0.2)
    np.testing.assert_allclose(history.loss, losses, rtol=1e-10)
    assert relative(net.params, reference.params) <= 1e-10


def test_lbfgs_equals_scipy_on_one_process():
    from scipy.optimize import minimize

    net, X, T = make(output="softmax", loss="cross_entropy")
    reference = net.copy()

    def loss_and_gradient(w):
        reference.set_params(w)
        return reference.loss_and_gradient(X, T)

    result = minimize(loss_and_gradient, reference.params.copy(), jac=True, method="L-BFGS-B",
                      options={"maxiter": 15, "gtol": 1e-6})
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="threads"):
        history = bd.fit(net, Xd, Td, "lbfgs", max_iter=15)
    assert history.epochs == result.nit and history.loss[-1] == pytest.approx(result.fun, rel=1e-10)
    assert history.stop_reason == result.message
    assert relative(net.params, result.x) <= 1e-8  # 15 iterations amplify 1e-16 differences a little


def test_fit_rejects_bad_options():
    net, X, T = make()
    Xd, Td = chunked(X, T)
    with pytest.raises(ValueError, match="optimizer must be one of lbfgs, gd, sgd, got 'adam'"):
        bd.fit(net, Xd, Td, "adam")
    with pytest.raises(TypeError, match="optimizer='lbfgs' takes no step-rule options, got \\['momentum'\\]"):
        bd.fit(net, Xd, Td, "lbfgs", momentum=0.9)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        bd.fit(net, Xd, Td, "sgd", batch_size=0)
    with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
        bd.fit(net, Xd, Td, "gd", max_iter=0)


# --- a LocalCluster: 2 worker processes × 1 thread on loopback ---------------------------------


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        yield client


def test_cluster_gradient_hvp_and_sgd_equal_one_process(client):
    from bpgpu.derivatives import hvp

    assert bd._distributed_client() is client
    with dask.config.set(scheduler="sync"):  # an explicit local scheduler wins: no scatter then
        assert bd._distributed_client() is None
    net, X, T = make(output="softmax", loss="cross_entropy")
    Xd, Td = chunked(X, T)
    J, g = bd.loss_and_gradient(net, Xd, Td)
    assert abs(J - net.loss(X, T)) <= 1e-10 * J
    assert relative(g, net.gradient(X, T)) <= 1e-10
    v = np.random.default_rng(5).normal(size=net.n_params)
    assert relative(bd.hvp(net, Xd, Td, v), hvp(net, X, T, v)) <= 1e-10
    reference = net.copy()
    one_process_sgd(reference, X, T, 1, 100, 1, (ROWS,) * 6 + (18,), "sgd", 0.1)
    bd.fit(net, Xd, Td, "sgd", max_iter=1, batch_size=100, seed=1, learning_rate=0.1)
    assert relative(net.params, reference.params) <= 1e-10


def slowly(Xd, Td, seconds):
    """X, T whose chunks take ``seconds`` each to produce, so that a worker can die mid-task."""
    delay = lambda block: (time.sleep(seconds), block)[1]  # noqa: E731 (pickled by value)
    return Xd.map_blocks(delay, dtype=Xd.dtype), Td.map_blocks(delay, dtype=Td.dtype)


def kill_a_busy_worker(client):
    """SIGKILL the process of a worker while it holds a task (the slow chunks fuse into the
    gradient tasks, so every task is slow); its nanny restarts it."""
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            os.kill(pids[busy[0]], signal.SIGKILL)
            return busy[0]
        time.sleep(0.01)
    raise AssertionError("no worker started a task within 20 s")


def test_worker_killed_mid_gradient_is_retried_elsewhere(client):
    net, X, T = make()
    before = net.params.copy()
    Xs, Ts = slowly(*chunked(X, T, rows=150), seconds=0.3)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(bd.loss_and_gradient, net, Xs, Ts)
        killed = kill_a_busy_worker(client)
        J, g = running.result(timeout=60)
    assert killed not in client.scheduler_info()["workers"]
    assert abs(J - net.loss(X, T)) <= 1e-10 * J
    assert relative(g, net.gradient(X, T)) <= 1e-10
    np.testing.assert_array_equal(net.params, before)
    client.wait_for_workers(2, timeout=30)


def test_worker_killed_without_retries_fails_clearly_and_params_hold_a_complete_update(client):
    from bpgpu.optim import make_optimizer

    net, X, T = make()
    reference, iterates = net.copy(), [net.params.copy()]
    rule = make_optimizer("sgd", reference, 0.5)
    for _ in range(30):
        rule.update(reference.gradient(X, T))
        iterates.append(reference.params.copy())
    Xs, Ts = slowly(*chunked(X, T, rows=300), seconds=0.15)
    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(bd.fit, net, Xs, Ts, "gd", max_iter=30, learning_rate=0.5)
            time.sleep(0.5)  # let a few updates complete first
            kill_a_busy_worker(client)
            with pytest.raises(RuntimeError, match=r"fit\(optimizer='gd'\) stopped: a Dask computation failed "
                                                   r"\(KilledWorker: .*net.params are the result of the (\d+) "
                                                   r"complete update\(s\) before it") as failure:
                running.result(timeout=60)
    finally:
        client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", allowed))
        client.wait_for_workers(2, timeout=30)
    done = int(re.search(r"the result of the (\d+) complete", str(failure.value)).group(1))
    assert 0 <= done < 30  # 0 on a slow machine: then net.params are the initial ones
    assert relative(net.params, iterates[done]) <= 1e-10
