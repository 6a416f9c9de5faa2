"""The compiled passes of bpgpu/kernels/compiled.py (the forward pass, seeded backprop) and the
tools built on them (input and parameter Jacobians, per-sample gradients, the Gauss–Newton factor)
against the engine's array path, float64 to 1e-12 relative, on random architectures, activations
and (output, loss) pairs, with and without sample weights; their input checks; and their
allocations once warm (tracemalloc)."""

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from helpers import HIDDEN, OUTPUT, OUTPUT_LOSS_PAIRS, random_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpgpu as bp
from bpgpu import engine, per_sample
from bpgpu.kernels import jit

compiled = pytest.importorskip("bpgpu.kernels.compiled", reason="numba is not installed: no compiled table")

architectures = st.tuples(
    st.lists(st.integers(1, 6), min_size=2, max_size=5),  # depth 1-4
    st.integers(1, 7),  # batch
    st.integers(1, 4),  # seeds
    st.integers(0, 2**31 - 1),
)


def relative(actual, expected):
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


@settings(max_examples=40, deadline=None)
@given(arch=architectures, data=st.data())
def test_forward_pass_and_seeded_backprop_match_the_engine(arch, data):
    sizes, m, K, seed = arch
    hidden = [data.draw(st.sampled_from(HIDDEN)) for _ in sizes[2:]]
    output = data.draw(st.sampled_from(OUTPUT))
    if output == "softmax":
        sizes = sizes[:-1] + [max(2, sizes[-1])]
    net = bp.MLP(sizes, hidden=hidden, output=output, dtype="float64", backend="numpy", epsilon=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, sizes[0]))
    plan = jit.plan(net, compiled)
    acts, slots = np.empty(compiled.activations_size(plan, m)), np.empty(2)
    z = acts[compiled.layer_start(plan, net.n_layers + 1, m) :].reshape(m, sizes[-1])
    a = compiled.forward_pass(X, net.params, plan, acts, z, slots)
    ws = net.workspace(m)
    expected = engine.forward(net, X, ws, net.params)
    assert relative(a, expected) <= 1e-12
    assert relative(z, ws.Z) <= 1e-12
    seeds = rng.normal(size=(K, m, sizes[-1]))
    rows, L = K * m, net.n_layers
    for sample_major in (False, True):
        deltas = np.full(compiled.layer_start(plan, L + 1, rows), np.nan)
        top = compiled.layer_start(plan, L, rows)
        deltas[top:] = (seeds.transpose(1, 0, 2) if sample_major else seeds).ravel()
        compiled.seeded_backprop(net.params, plan, acts, deltas, m, K, sample_major, slots)
        for l, D in engine.seeded_deltas(net, engine.layer_outputs(X, ws), seeds):
            start = compiled.layer_start(plan, l, rows)
            got = deltas[start : start + rows * sizes[l]]
            got = got.reshape(m, K, -1).transpose(1, 0, 2) if sample_major else got.reshape(K, m, -1)
            assert relative(got, D) <= 1e-12, (l, sample_major)


# --- the tools: one compiled call against the array path ------------------------------

TOOLS = ("jacobian", "parameter_jacobian", "per_sample_gradients", "weighted_per_sample_gradients", "gauss_newton")


def call(tool, net, X, T, s):
    if tool == "jacobian":
        return bp.jacobian(net, X)
    if tool == "parameter_jacobian":
        return bp.jacobian(net, X, wrt="params")
    if tool == "per_sample_gradients":
        return bp.per_sample_gradients(net, X, T)
    if tool == "weighted_per_sample_gradients":
        return bp.per_sample_gradients(net, X, T, sample_weight=s)
    return per_sample.gauss_newton_factor(net, X, T, sample_weight=s)


def array_path(monkeypatch, fn):
    """fn() with the compiled tools switched off: the engine's kernel-by-kernel passes."""
    with monkeypatch.context() as patch:
        patch.setattr(jit, "derivatives_for", lambda net: None)
        return fn()


@pytest.mark.parametrize("tool", TOOLS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=architectures, data=st.data())
def test_compiled_tools_match_the_array_path(monkeypatch, tool, arch, data):
    sizes, m, _, seed = arch
    hidden = data.draw(st.sampled_from(HIDDEN))
    output, loss = data.draw(st.sampled_from(OUTPUT_LOSS_PAIRS))
    reduction = data.draw(st.sampled_from(["mean", "sum"]))
    net, X, T, rng = random_problem(sizes, hidden, output, loss, reduction, seed, m)
    s = rng.uniform(0.0, 2.0, size=m)
    got = call(tool, net, X, T, s)
    assert jit.derivatives_for(net) is not None  # the compiled path ran
    expected = array_path(monkeypatch, lambda: call(tool, net, X, T, s))
    assert type(got) is np.ndarray and got.shape == expected.shape and got.dtype == expected.dtype
    assert relative(got, expected) <= 1e-12, tool


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tool", TOOLS)
def test_compiled_tools_take_what_check_inputs_takes(monkeypatch, tool, dtype):
    """Lists, other dtypes, Fortran order and a 1-D T (one output) give the checked path's result."""
    net = bp.MLP([3, 5, 1], hidden="tanh", output="identity", dtype=dtype, backend="numpy", seed=2)
    rng = np.random.default_rng(0)
    X, T, s = rng.normal(size=(6, 3)), rng.normal(size=6), rng.uniform(size=6)
    expected = array_path(monkeypatch, lambda: call(tool, net, X, T, s))
    for x in (X.tolist(), np.asfortranarray(X), X.astype(dtype)):
        got = call(tool, net, x, T, s)
        assert got.dtype == np.dtype(dtype) and relative(got, expected) <= (1e-12 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("where", ["X", "T"])
def test_compiled_tools_reject_non_finite_inputs_by_name(tool, where):
    net = bp.MLP([3, 4, 2], hidden="tanh", output="identity", dtype="float64", backend="numpy", seed=2)
    X, T = np.ones((5, 3)), np.ones((5, 2))
    if where == "T" and tool in ("jacobian", "parameter_jacobian"):
        pytest.skip("the Jacobians take no targets")
    (X if where == "X" else T)[2, 1] = np.nan
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        call(tool, net, X, T, np.ones(5))


@pytest.mark.parametrize("tool", TOOLS)
def test_compiled_tools_allocate_only_their_result(tool):
    """After warm-up a call allocates the array it returns and at most 4 KiB besides."""
    net = bp.MLP(
        [16, 32, 32, 3], hidden="tanh", output="softmax", loss="cross_entropy", dtype="float64", backend="numpy", seed=0
    )
    rng = np.random.default_rng(0)
    X, T, s = rng.normal(size=(64, 16)), np.eye(3)[rng.integers(0, 3, size=64)], rng.uniform(size=64)
    result = call(tool, net, X, T, s)
    call(tool, net, X, T, s)
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(5):
            call(tool, net, X, T, s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start <= result.nbytes + 4096, (peak - start, result.nbytes)


@pytest.mark.parametrize("tool", TOOLS)
def test_a_call_split_into_sample_blocks_gives_the_whole_calls_result(monkeypatch, tool):
    """Large calls run as one block of samples per core on Python threads (jit.py): same result."""
    net, X, T, rng = random_problem([5, 9, 7, 3], "tanh", "softmax", "cross_entropy", "mean", 4, 11)
    s = rng.uniform(0.0, 2.0, size=11)
    whole = call(tool, net, X, T, s)
    with monkeypatch.context() as patch:
        patch.setattr(jit, "_SPLIT_WORK", 1)
        patch.setattr(jit, "_CORES", 3)
        patch.setattr(jit.blas_threads, "load", lambda: 0.0)
        split = call(tool, net, X, T, s)
    assert relative(split, whole) <= 1e-12


def test_blas_threads_see_the_cpu_other_processes_use(tmp_path):
    """jit.BlasThreads reads the cores' busy time from /proc/stat (user, nice, system, irq, softirq of
    this process's cores) and counts what this process did not use itself as other processes' use;
    half a core or more of that puts large products on one BLAS thread."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 1 9 100 7 2 3 9 0 0\ncpu0 5 1 4 50 7 2 3 9 0 0\ncpu1 5 0 5 50 0 0 0 0 0 0\nintr 1 2\n")
    every = list(range(os.cpu_count()))
    assert jit.busy_seconds(every, str(stat)) == pytest.approx((10 + 1 + 9 + 2 + 3) * jit._TICK)  # the first line
    if os.cpu_count() > 2:  # a subset of the CPUs: their own lines
        assert jit.busy_seconds([0], str(stat)) == pytest.approx((5 + 1 + 4 + 2 + 3) * jit._TICK)
        assert jit.busy_seconds([0, 1], str(stat)) == pytest.approx((15 + 10) * jit._TICK)
    else:
        assert jit.busy_seconds([1], str(stat)) == pytest.approx(10 * jit._TICK)
    assert jit.busy_seconds(every, str(tmp_path / "missing")) is None
    now = {"clock": 10.0, "busy": 100.0, "own": 1.0}
    threads = jit.BlasThreads(clock=lambda: now["clock"], own=lambda: now["own"], busy=lambda: now["busy"])
    assert threads.others() == 0.0  # one reading: nothing to compare with yet
    now.update(clock=12.0, busy=103.0, own=2.0)  # 2 s later: 3 s busy, 1 s of them ours
    assert threads.others() == pytest.approx((3.0 - 1.0) / 2.0)
    assert threads.serial(1 << 23) and not threads.serial(jit._OPENBLAS_SERIAL_MACS)
    now.update(clock=12.5, busy=104.0)
    assert threads.others() == pytest.approx(1.0)  # within a second: not read again
    now.update(clock=14.0, busy=104.5, own=4.5)  # 1.5 s busy, 2.5 s of it ours: nobody else (0, not < 0)
    assert threads.others() == 0.0


def _blas_threads_late_load(block: str) -> dict:
    """Run ``block`` in a fresh process after ``import bpgpu``, SciPy's OpenBLAS not yet loaded; it
    sets ``inside`` (and may set ``threads``) with ``blas()``: [(library path, threads)] of every BLAS.
    Returns {"before", "inside", "after", "threads"}; skips where importing bpgpu loads that BLAS
    already, or where SciPy shares numpy's BLAS (then no library is loaded late)."""
    script = f"""
import json, sys
import threadpoolctl
import bpgpu
from bpgpu.kernels import jit
early = "scipy.linalg.cython_blas" in sys.modules
def blas():
    return [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
before, threads = blas(), None
{block}
import scipy.linalg.cython_blas  # the kernels' BLAS, so that "after" lists it whatever the block did
print(json.dumps({{"early": early, "threads": threads, "before": before, "inside": inside, "after": blas()}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    seen = json.loads(out.stdout)
    if seen["early"]:
        pytest.skip("importing bpgpu loads scipy.linalg.cython_blas already: the late load cannot happen")
    if {path for path, _ in seen["after"]} == {path for path, _ in seen["before"]}:
        pytest.skip("SciPy's BLAS is numpy's: no BLAS library is loaded late")
    return seen


def _assert_scipy_blas_limited_then_restored(seen: dict) -> None:
    late = {path for path, _ in seen["after"]} - {path for path, _ in seen["before"]}  # SciPy's BLAS
    assert late <= {path for path, _ in seen["inside"]}, seen  # loaded in time to be limited
    assert all(threads == 1 for _, threads in seen["inside"]), seen
    assert any(threads > 1 for _, threads in seen["after"]), seen  # restored afterwards


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: OpenBLAS runs on one thread anyway")
def test_one_thread_covers_the_blas_the_kernels_load_later():
    """BlasThreads.one_thread limits the BLAS the compiled kernels call (SciPy's OpenBLAS) even when the
    controller is made before that library is loaded: the extension loads it at its first GEMM, and a
    controller that saw numpy's OpenBLAS alone left the kernels' GEMMs on OpenBLAS's threads."""
    seen = _blas_threads_late_load(
        """
def kernel():
    import scipy.linalg.cython_blas  # what numba's and the extension's GEMM helpers load
    return blas()
inside = jit.blas_threads.one_thread(kernel)
"""
    )
    _assert_scipy_blas_limited_then_restored(seen)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: OpenBLAS runs on one thread anyway")
def test_blas_limit_covers_the_kernels_blas_before_it_is_loaded():
    """jit.blas_limit (the benchmarks' "one BLAS thread") loads SciPy's OpenBLAS, the one the compiled
    kernels call, before it limits: a plain threadpool_limits in a process that has not yet run a GEMM
    would limit numpy's OpenBLAS alone."""
    seen = _blas_threads_late_load(
        """
with jit.blas_limit(1) as threads:
    inside = blas()
"""
    )
    assert seen["threads"] == 1
    _assert_scipy_blas_limited_then_restored(seen)


def test_a_fresh_reading_of_idle_cores_outweighs_a_lagging_load_average(monkeypatch):
    """After a burst the 1-minute load average stays high for a minute: with it above the cores + 1
    a first reading (nothing to compare with) leaves large products on one BLAS thread, but once two
    readings of /proc/stat show the cores free of other processes they get OpenBLAS's threads and
    the sample-block split again; other processes' use still sends them to one thread."""
    monkeypatch.setattr(jit.os, "getloadavg", lambda: (8.0 * jit._CORES, 0.0, 0.0))
    now = {"clock": 10.0, "busy": 100.0, "own": 1.0}
    threads = jit.BlasThreads(clock=lambda: now["clock"], own=lambda: now["own"], busy=lambda: now["busy"])
    monkeypatch.setattr(jit, "blas_threads", threads)
    monkeypatch.setattr(jit, "_CORES", 2)
    big = jit._SERIAL_MACS * 2
    assert threads.serial(big) and not threads.quiet_elsewhere() and not jit._splits(jit._SPLIT_WORK)
    now.update(clock=12.0, busy=102.1, own=3.0)  # 2 s later: 2.1 s busy, 2 s of them ours
    assert threads.quiet_elsewhere() and not threads.serial(big) and jit._splits(jit._SPLIT_WORK)
    assert jit._splits(jit._SPLIT_WORK_QUIET) and not jit._splits(jit._SPLIT_WORK_QUIET - 1)
    now.update(clock=14.0, busy=106.1, own=4.0)  # 4 s busy, 1 s ours: 1.5 cores elsewhere
    assert threads.serial(big) and not threads.quiet_elsewhere() and not jit._splits(jit._SPLIT_WORK)
    assert not jit._splits(jit._SPLIT_WORK - 1)


def test_mid_size_products_keep_openblas_threads_only_when_the_other_cores_are_free(monkeypatch):
    """A largest product between OpenBLAS's own one-thread size and _SERIAL_MACS runs on one BLAS
    thread unless two fresh readings of /proc/stat show the other cores free; a low load average
    alone (which trails the machine) does not count; at OpenBLAS's own size nothing is switched."""
    monkeypatch.setattr(jit.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    now = {"clock": 10.0, "busy": 100.0, "own": 1.0}
    threads = jit.BlasThreads(clock=lambda: now["clock"], own=lambda: now["own"], busy=lambda: now["busy"])
    mid = (jit._OPENBLAS_SERIAL_MACS + jit._SERIAL_MACS) // 2
    assert threads.serial(mid) and not threads.serial(jit._OPENBLAS_SERIAL_MACS)  # one reading: not known
    now.update(clock=12.0, busy=102.1, own=3.0)  # others used 0.05 cores
    assert not threads.serial(mid) and not threads.serial(jit._SERIAL_MACS)
    now.update(clock=14.0, busy=106.1, own=4.0)  # others used 1.5 cores
    assert threads.serial(mid) and threads.serial(jit._SERIAL_MACS)


def test_mid_size_calls_split_only_when_the_other_cores_are_free(monkeypatch):
    """From _SPLIT_WORK_QUIET to _SPLIT_WORK a call splits only on a fresh reading of idle cores, not
    on a low load average alone (which trails the machine); from _SPLIT_WORK on, a low load average
    is enough."""
    monkeypatch.setattr(jit.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    now = {"clock": 10.0, "busy": 100.0, "own": 1.0}
    threads = jit.BlasThreads(clock=lambda: now["clock"], own=lambda: now["own"], busy=lambda: now["busy"])
    monkeypatch.setattr(jit, "blas_threads", threads)
    monkeypatch.setattr(jit, "_CORES", 2)
    mid = (jit._SPLIT_WORK_QUIET + jit._SPLIT_WORK) // 2
    assert not jit._splits(mid) and jit._splits(jit._SPLIT_WORK)  # one reading: no measure yet
    now.update(clock=12.0, busy=102.1, own=3.0)  # others used 0.05 cores
    assert jit._splits(mid)
    now.update(clock=14.0, busy=106.1, own=4.0)  # others used 1.5 cores
    assert not jit._splits(mid) and jit._splits(jit._SPLIT_WORK)  # load average 0: the large call still splits


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_input_checks_finiteness_test_is_the_same_compiled_or_not(monkeypatch, dtype):
    """validation.all_finite takes the compiled table's vectorized pass for C-contiguous float numpy
    arrays once the table is loaded, numpy's sum otherwise: the same answer for finite values (the
    largest ones too, whose sum overflows), NaN and ±Inf anywhere, 1-D, 2-D and strided arrays."""
    from bpgpu import validation

    table = jit.kernels()  # bpgpu.kernels.cpu: its all_finite is compiled.all_finite's export or dispatcher
    assert table is not None
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(37, 19)).astype(dtype), rng.normal(size=1001).astype(dtype)]
    arrays.append(np.full((3, 4), np.finfo(dtype).max, dtype=dtype))
    for x in list(arrays):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y.flat[rng.integers(y.size)] = bad
            arrays.append(y)
    arrays += [y[..., ::2] for y in arrays]  # strided: numpy's sum in both runs
    calls = []
    with monkeypatch.context() as patch, np.errstate(over="ignore", invalid="ignore"):
        patch.setattr(table, "all_finite", lambda y, kernel=table.all_finite: calls.append(y) or kernel(y))
        compiled_answers = [validation.all_finite(y, np) for y in arrays]
    assert len(calls) == len(arrays) // 2  # the contiguous half
    with monkeypatch.context() as patch:
        patch.setattr(table, "all_finite", lambda y: pytest.fail("the compiled pass ran"))
        patch.setattr(validation, "_COMPILED_DTYPES", ())  # numpy's path alone
        with np.errstate(over="ignore", invalid="ignore"):  # the largest values' sum overflows (inf − inf: NaN)
            numpy_answers = [validation.all_finite(y, np) for y in arrays]
    assert compiled_answers == numpy_answers == [bool(np.all(np.isfinite(y))) for y in arrays]
    assert compiled_answers.count(False) >= 6


def test_only_float64_calls_are_split_into_sample_blocks(monkeypatch):
    """jit.sample_blocks: a large float64 call runs one block per core, a float32 one stays whole
    (one OpenBLAS call on both cores was faster for float32, benchmarks/NOTES.md "P9")."""
    monkeypatch.setattr(jit, "_SPLIT_WORK", 1)
    monkeypatch.setattr(jit, "_CORES", 3)
    monkeypatch.setattr(jit.blas_threads, "load", lambda: 0.0)

    def part(lo, hi, work):
        return (lo, hi, work)

    def buffers(rows, i):
        return f"buffer {i} of {rows} rows"

    whole = [(0, 11, "buffer 0 of 11 rows")]
    assert jit.sample_blocks(11, 1, 1 << 30, part, buffers, np.float32) == whole
    blocks = jit.sample_blocks(11, 1, 1 << 30, part, buffers, np.float64)
    assert blocks == [(0, 3, "buffer 0 of 3 rows"), (3, 7, "buffer 1 of 4 rows"), (7, 11, "buffer 2 of 4 rows")]
