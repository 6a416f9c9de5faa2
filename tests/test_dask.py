"""bpgpu.dask against the single-process net: local schedulers, then a LocalCluster."""

import os
import pickle
import re
import signal
from contextlib import contextmanager

import array_api_strict
import dask
import dask.array as da
import numpy as np
import pytest

import bpgpu as bp
import bpgpu.dask as bd
from bpgpu.backend import of_array

distributed = pytest.importorskip("distributed")
from dask.utils import key_split  # noqa: E402 - after the importorskip of distributed
from distributed.diagnostics.plugin import SchedulerPlugin  # noqa: E402

M, ROWS = 600, 97  # an uneven last chunk on purpose
LOCAL = ["sync", "threads"]


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make(output="identity", loss="squared_error", reduction="mean", dtype="float64", sizes=(4, 6, 3), seed=0):
    rng = np.random.default_rng(seed)
    net = bp.MLP(
        list(sizes),
        hidden="tanh",
        output=output,
        loss=loss,
        reduction=reduction,
        dtype=dtype,
        backend="numpy",
        epsilon=0.5,
        seed=seed,
    )
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
@pytest.mark.parametrize(
    "output,loss", [("identity", "squared_error"), ("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy")]
)
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
        history = bd.fit(
            net, Xd, Td, "sgd", max_iter=2, batch_size=64, seed=7, update=update, learning_rate=lr, **options
        )
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

    result = minimize(
        loss_and_gradient, reference.params.copy(), jac=True, method="L-BFGS-B", options={"maxiter": 15, "gtol": 1e-6}
    )
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="threads"):
        history = bd.fit(net, Xd, Td, "lbfgs", max_iter=15)
    assert history.epochs == result.nit and history.loss[-1] == pytest.approx(result.fun, rel=1e-10)
    assert history.stop_reason == result.message
    assert relative(net.params, result.x) <= 1e-8  # 15 iterations amplify 1e-16 differences a little


@pytest.mark.parametrize("optimizer", ["lbfgs", "lm"])
def test_a_fit_stopped_by_a_failed_evaluation_keeps_its_last_complete_update(monkeypatch, optimizer):
    """L-BFGS keeps its last completed iteration, Levenberg–Marquardt its last accepted step."""
    net, X, T = make(output="softmax", loss="cross_entropy")
    Xd, Td = chunked(X, T)
    computed, calls = bd._computed, []

    def fails_on_the_eighth(summed, timeout):
        calls.append(timeout)
        if len(calls) == 8:
            raise bd.EvaluationError("timeout", "injected")
        return computed(summed, timeout)

    monkeypatch.setattr(bd, "_computed", fails_on_the_eighth)
    with (
        dask.config.set(scheduler="sync"),
        pytest.raises(
            bd.EvaluationError,
            match=rf"timeout: bpgpu.dask.fit\(optimizer='{optimizer}'\) stopped: .*the result of the "
            r"(\d+) complete update\(s\) before it \(timeout: injected\)",
        ) as failure,
    ):
        bd.fit(net, Xd, Td, optimizer, max_iter=50, timeout=9.0)
    assert failure.value.reason == "timeout" and set(calls) == {9.0}
    done = int(re.search(r"the result of the (\d+) complete", str(failure.value)).group(1))
    assert 1 <= done < 8
    reference = make(output="softmax", loss="cross_entropy")[0]
    with dask.config.set(scheduler="sync"):
        bd.fit(reference, Xd, Td, optimizer, max_iter=done)  # stops at the same iterate
    assert relative(net.params, reference.params) <= 1e-12


# --- Levenberg–Marquardt: the normal equations summed over chunks, solved on the driver ---------

LM_PROBLEMS = {"regression": ("identity", "squared_error"), "classification": ("softmax", "cross_entropy")}
LM_OPTIONS = [{}, {"alpha": 0.3}, {"damping": "diagonal", "mu": 0.5}]


def one_process_lm(net, X, T, iterations, **options):
    return bp.fit(net, X, T, optimizer="lm", epochs=iterations, tol=1e-6, progress=False, **options)


@pytest.mark.parametrize("problem", LM_PROBLEMS)
@pytest.mark.parametrize("rows", [M, ROWS])  # one chunk; seven, the last uneven
@pytest.mark.parametrize("options", LM_OPTIONS, ids=["defaults", "alpha", "diagonal"])
def test_lm_equals_bp_fit_lm_in_one_process(problem, rows, options):
    """Loss and μ per iteration and the parameters equal bp.fit(optimizer="lm")'s; these runs
    reject up to 4 μ in an iteration, so rounds of 1, 2 and 4 trials are exercised."""
    net, X, T = make(*LM_PROBLEMS[problem])
    reference = net.copy()
    expected = one_process_lm(reference, X, T, 6, **options)
    Xd, Td = chunked(X, T, rows=rows)
    with dask.config.set(scheduler="sync"):
        history = bd.fit(net, Xd, Td, "lm", max_iter=6, tol=1e-6, **options)
    assert history.epochs == expected.epochs == 6 and history.stop_reason == "max_iter"
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-12)
    np.testing.assert_allclose(history.mu, expected.mu, rtol=1e-12)
    assert relative(net.params, reference.params) <= 1e-12


def test_lm_on_a_float32_net_stays_float32_near_one_process():
    net, X, T = make(dtype="float32")
    X, T = X.astype(np.float32), T.astype(np.float32)
    reference = net.copy()
    expected = one_process_lm(reference, X, T, 4)
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="sync"):
        history = bd.fit(net, Xd, Td, "lm", max_iter=4, tol=1e-6)
    assert net.params.dtype == np.float32 and history.mu == expected.mu
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-5)
    assert relative(net.params, reference.params) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not bp.gpu_status().usable, reason=bp.gpu_status().reason)
def test_lm_on_cupy_chunks_equals_one_process():
    import cupy

    net, X, T = make()
    reference = net.copy()
    expected = one_process_lm(reference, X, T, 4)
    Xd, Td = (a.map_blocks(cupy.asarray) for a in chunked(X, T))
    with dask.config.set(scheduler="threads"):
        history = bd.fit(net, Xd, Td, "lm", max_iter=4, tol=1e-6)
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-10)
    assert relative(net.params, reference.params) <= 1e-10


def test_lm_on_a_sum_net_with_threads_and_its_tol_rule_equal_one_process():
    net, X, T = make(reduction="sum")
    reference = net.copy()
    expected = bp.fit(reference, X, T, optimizer="lm", epochs=40, tol=1.0, n_iter_no_change=2, progress=False)
    assert expected.stop_reason == "tol" and expected.epochs < 40
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="threads"):
        history = bd.fit(net, Xd, Td, "lm", max_iter=40, tol=1.0, n_iter_no_change=2)
    assert history.stop_reason == "tol" and history.epochs == expected.epochs
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-12)
    assert relative(net.params, reference.params) <= 1e-12


def test_lm_at_a_minimum_tries_every_mu_in_four_round_trips_and_stops_at_mu_max(monkeypatch):
    net, X, _ = make()
    net.params[...] = 0.0  # outputs exactly 0 = T: E = 0 and ∇E = 0, so no step lowers the loss
    T = np.zeros((M, 3))
    before = net.params.copy()
    Xd, Td = chunked(X, T)
    computed, graphs = bd._computed, []

    def counted(summed, timeout):
        graphs.append(summed.shape)
        return computed(summed, timeout)

    monkeypatch.setattr(bd, "_computed", counted)
    with dask.config.set(scheduler="sync"):
        history = bd.fit(net, Xd, Td, "lm", max_iter=5)
    # μ = 1e-3 ... 1e10 (14 trials) in rounds of 1, 2, 4 and 7, after the normal equations
    assert [shape[0] for shape in graphs] == [1 + 51 + 51 * 51, 1, 2, 4, 7]
    assert history.stop_reason == "mu_max" and history.epochs == 1
    assert history.mu == [pytest.approx(1e11)]
    np.testing.assert_array_equal(net.params, before)


def test_lm_bad_input_names_the_argument_and_the_sizes():
    from dataclasses import replace

    net, X, T = make()
    Xd, Td = chunked(X, T)
    for mu in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"mu must be a number > 0, got {mu}"):
            bd.fit(net, Xd, Td, "lm", mu=mu)
    with pytest.raises(ValueError, match="damping must be one of 'identity', 'diagonal', got 'fletcher'"):
        bd.fit(net, Xd, Td, "lm", damping="fletcher")
    with pytest.raises(ValueError, match="n_iter_no_change must be an int >= 1, got 0"):
        bd.fit(net, Xd, Td, "lm", n_iter_no_change=0)
    with pytest.raises(TypeError, match="optimizer='lm' does not take momentum; it takes alpha, mu, "):
        bd.fit(net, Xd, Td, "lm", momentum=0.9)
    with pytest.raises(TypeError, match=r"takes no form: it solves in the parameters form, RᵀR \(W × W\)"):
        bd.fit(net, Xd, Td, "lm", form="residuals")
    with pytest.raises(
        ValueError,
        match=r"needs .* GiB in float64 for the W × W matrix RᵀR \(W=51 parameters\) of MLP \[4, 6, 3\], "
        r"more than the .* allowed \(max_memory\). Use bpgpu.dask.fit with optimizer 'lbfgs', 'gd' or 'sgd'",
    ):
        bd.fit(net, Xd, Td, "lm", max_memory=51 * 51 * 8)  # one W × W copy fits, the factorisation's does not
    with dask.config.set(scheduler="sync"), pytest.raises(FloatingPointError, match="starting parameters is inf"):
        bd.fit(net, Xd, chunked(T * 1e200)[0], "lm")  # (a − t)² overflows
    net.loss_function = replace(net.loss_function, name="absolute_error")
    with pytest.raises(ValueError, match="cannot serve loss='absolute_error'.*serves squared_error"):
        bd.fit(net, Xd, Td, "lm")


def test_fit_rejects_bad_options():
    net, X, T = make()
    Xd, Td = chunked(X, T)
    with pytest.raises(ValueError, match="optimizer must be one of lbfgs, gd, sgd, lm, got 'adam'"):
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
    # a LocalCluster closes the nanny of a worker that has not come back within lost-worker-timeout
    # (15 s); a loaded machine restarting workers killed one after another can take longer
    # forkserver: a restarted worker forks from a process that has imported distributed already
    with dask.config.set(
        {"distributed.deploy.lost-worker-timeout": "1h", "distributed.worker.multiprocessing-method": "forkserver"}
    ):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        )
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


# --- a worker lost at any moment: faults injected by the scheduler itself -------------------------
# The LocalCluster's scheduler runs in this process, so a plugin sees every task transition and
# signals the worker involved at exactly that moment: deterministic, no sleeps, no polling.

# moment: (task name, state it enters, how many such transitions one evaluation of the
# 600 rows in 7 chunks has), the worker signalled being the one the task goes to
# ("processing") or the one holding it ("memory")
MOMENTS = {
    "parameters broadcast": ("ndarray", "memory", 1),  # the vector computed, not yet fetched by the others
    "chunk sent": ("sum", "processing", 7),  # a chunk's loss-and-gradient task goes to a worker
    "partial sum held": ("sum-partial", "memory", 2),  # the tree reduction half done
    "result held": ("finalize-hlgfinalizecompute", "memory", 1),  # done, before the client gathers it
}


class Fault(SchedulerPlugin):
    """Send ``sig`` to the worker of the (skip + 1)-th transition of a task ``name`` into ``finish``."""

    def __init__(self, scheduler, name, finish, skip, sig):
        self.scheduler, self.name, self.finish, self.skip, self.sig = scheduler, name, finish, skip, sig
        self.pid = None

    def transition(self, key, start, finish, *args, stimulus_id, **kwargs):
        if self.pid is not None or finish != self.finish or key_split(key) != self.name:
            return
        if self.skip:
            self.skip -= 1
            return
        ts = self.scheduler.tasks[key]
        self.pid = (ts.processing_on if finish == "processing" else next(iter(ts.who_has))).pid
        os.kill(self.pid, self.sig)


@contextmanager
def fault(client, moment, evaluation=1, sig=signal.SIGKILL, skip=0):
    """Signal a worker at ``moment`` of the ``evaluation``-th distributed evaluation (1 = the first)."""
    client.wait_for_workers(2, timeout=120)  # the nanny restarts a killed worker
    name, finish, per_evaluation = MOMENTS[moment]
    cluster = client.cluster
    plugin = Fault(cluster.scheduler, name, finish, (evaluation - 1) * per_evaluation + skip, sig)

    async def add():  # on the scheduler's event loop, not from this thread
        cluster.scheduler.add_plugin(plugin, name="fault")

    async def remove():
        cluster.scheduler.remove_plugin(name="fault")

    cluster.sync(add)
    try:
        yield plugin
    finally:
        cluster.sync(remove)
        if plugin.pid is not None and sig != signal.SIGKILL:
            os.kill(plugin.pid, signal.SIGKILL)  # a stalled worker ends now; its nanny restarts it
    assert plugin.pid is not None, f"no worker was signalled at {moment!r} of evaluation {evaluation}"


BOUND = 120  # seconds: no run of a faulty cluster may hang the suite


@pytest.mark.parametrize("moment", ["parameters broadcast", "chunk sent"])
def test_worker_killed_during_a_gradient_changes_nothing(client, moment):
    net, X, T = make()
    before = net.params.copy()
    J, g = net.loss_and_gradient(X, T)
    Xd, Td = chunked(X, T)
    with fault(client, moment):
        Jd, gd = bd.loss_and_gradient(net, Xd, Td, timeout=BOUND)
    assert abs(Jd - J) <= 1e-12 * J
    assert relative(gd, g) <= 1e-12
    np.testing.assert_array_equal(net.params, before)


def test_worker_killed_holding_the_result_of_an_hvp_changes_nothing(client):
    from bpgpu.derivatives import hvp

    net, X, T = make()
    v = np.random.default_rng(5).normal(size=net.n_params)
    Xd, Td = chunked(X, T)
    with fault(client, "result held"):
        Hv = bd.hvp(net, Xd, Td, v, timeout=BOUND)
    assert relative(Hv, hvp(net, X, T, v)) <= 1e-12


FIT_RUNS = {  # optimizer: its options, and the moment and evaluation at which a worker is killed
    "lbfgs": ({"max_iter": 6}, "parameters broadcast", 3),
    "gd": ({"max_iter": 4, "learning_rate": 0.5}, "chunk sent", 2),
    "sgd": ({"max_iter": 2, "batch_size": 200, "seed": 1, "learning_rate": 0.1}, "partial sum held", 4),
}


@pytest.mark.parametrize("optimizer", FIT_RUNS)
def test_worker_killed_during_a_fit_changes_nothing(client, optimizer):
    """The fit with a worker killed equals the same fit in this process (dask's sync scheduler)."""
    options, moment, evaluation = FIT_RUNS[optimizer]
    net, X, T = make()
    reference = net.copy()
    Xd, Td = chunked(X, T)
    with dask.config.set(scheduler="sync"):
        expected = bd.fit(reference, Xd, Td, optimizer, **options)
    with fault(client, moment, evaluation):
        history = bd.fit(net, Xd, Td, optimizer, timeout=BOUND, **options)
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-12)
    assert relative(net.params, reference.params) <= 1e-12


@pytest.mark.parametrize(
    "moment,evaluation",
    # evaluations 1 to 4 are iteration 1's normal equations and its rounds of 1, 2 and 4 μ trials
    # (1e-3; 1e-2, 0.1; 1, 10, 100, 1e3: 10 accepted), 5 is iteration 2's normal equations
    [("chunk sent", 5), ("parameters broadcast", 3)],
    ids=["normal equations", "trials"],
)
def test_worker_killed_during_an_lm_fit_changes_nothing(client, moment, evaluation):
    """A kill while a chunk computes its RᵀR share, or while a round's μ candidates are sent."""
    net, X, T = make()
    reference = net.copy()
    expected = one_process_lm(reference, X, T, 3)
    Xd, Td = chunked(X, T)
    with fault(client, moment, evaluation):
        history = bd.fit(net, Xd, Td, "lm", max_iter=3, tol=1e-6, timeout=BOUND)
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-12)
    assert relative(net.params, reference.params) <= 1e-12


def gd_iterates(net, X, T, steps, learning_rate):
    """The parameters after 0, 1, ..., steps full-batch gradient descent updates in one process."""
    from bpgpu.optim import make_optimizer

    reference = net.copy()
    rule, iterates = make_optimizer("sgd", reference, learning_rate), [reference.params.copy()]
    for _ in range(steps):
        rule.update(reference.gradient(X, T))
        iterates.append(reference.params.copy())
    return iterates


def assert_params_hold_complete_updates(failure, net, iterates):
    done = int(re.search(r"the result of the (\d+) complete update\(s\)", str(failure.value)).group(1))
    assert 0 <= done < len(iterates) - 1
    assert relative(net.params, iterates[done]) <= 1e-10
    return done


def test_scattered_data_lost_with_its_worker_raises_data_lost_and_params_hold_complete_updates(client):
    net, X, T = make()
    iterates = gd_iterates(net, X, T, 30, 0.5)
    client.wait_for_workers(2, timeout=120)
    rows = [slice(start, start + 100) for start in range(0, M, 100)]
    # round-robin over both workers: either one's death loses rows that have no graph to be rebuilt from
    Xd, Td = (
        da.concatenate([da.from_delayed(f, (100, a.shape[1]), a.dtype) for f in client.scatter([a[r] for r in rows])])
        for a in (X, T)
    )
    with (
        fault(client, "parameters broadcast", evaluation=3),
        pytest.raises(
            bd.EvaluationError,
            match=r"data lost: bpgpu.dask.fit\(optimizer='gd'\) stopped: a Dask computation failed; "
            r"net.params are the result of the \d+ complete update\(s\) before it \(data lost: "
            r"a chunk of X or T held only as scattered data",
        ) as failure,
    ):
        bd.fit(net, Xd, Td, "gd", max_iter=30, learning_rate=0.5, timeout=BOUND)
    assert failure.value.reason == "data lost"
    assert assert_params_hold_complete_updates(failure, net, iterates) >= 2  # evaluations 1 and 2 completed


def test_worker_killed_without_retries_raises_retries_exhausted_and_params_hold_complete_updates(client):
    net, X, T = make()
    iterates = gd_iterates(net, X, T, 30, 0.5)
    Xd, Td = chunked(X, T)
    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    try:
        with (
            fault(client, "chunk sent", evaluation=3, skip=1),
            pytest.raises(
                bd.EvaluationError,
                match=r"retries exhausted: bpgpu.dask.fit\(optimizer='gd'\) stopped: .*Dask gave up "
                r"on a task \(KilledWorker: ",
            ) as failure,
        ):
            bd.fit(net, Xd, Td, "gd", max_iter=30, learning_rate=0.5, timeout=BOUND)
    finally:
        client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", allowed))
    assert failure.value.reason == "retries exhausted"
    assert assert_params_hold_complete_updates(failure, net, iterates) == 2
    J, g = net.loss_and_gradient(X, T)  # with retries back, the same chunks compute again
    Jd, gd = bd.loss_and_gradient(net, Xd, Td, timeout=BOUND)
    assert abs(Jd - J) <= 1e-12 * J and relative(gd, g) <= 1e-12


def test_worker_stalled_past_the_timeout_raises_timeout_and_params_hold_complete_updates(client):
    net, X, T = make()
    iterates = gd_iterates(net, X, T, 30, 0.5)
    Xd, Td = chunked(X, T)
    with fault(client, "chunk sent", evaluation=1 + 3, sig=signal.SIGSTOP):  # the fit's third
        bd.loss(net, Xd, Td, timeout=BOUND)  # both workers past their first task (imports) before the clock counts
        with pytest.raises(
            bd.EvaluationError,
            match=r"timeout: bpgpu.dask.fit\(optimizer='gd'\) stopped: .*the "
            r"evaluation did not finish within timeout=4 s",
        ) as failure:
            bd.fit(net, Xd, Td, "gd", max_iter=30, learning_rate=0.5, timeout=4)
    assert failure.value.reason == "timeout"
    assert_params_hold_complete_updates(failure, net, iterates)
