"""The compiled CPU step (bpgpu/kernels/jit.py) against the numpy path, its reference.

One compiled step must give the numpy step's loss and updated parameters within
float tolerance (float64 1e-12, float32 1e-5, relative) for every hidden
activation, every accepted (output, loss) pair, random architectures, and every
optimizer, and must allocate nothing once warm. Each comparison is one step from
the same parameters: in float32 two summation orders (BLAS versus a loop) already
differ by more than 1e-5 where a relu sits on its kink or a gradient cancels, so
the float32 problems are well conditioned (layers at least 2 wide, first steps)
and float64 checks the same cases at 1e-12.
"""

import itertools
import tracemalloc
import zlib

import numpy as np
import pytest

import bpgpu as bp
from bpgpu import activations, engine, optim
from bpgpu.kernels import jit
from bpgpu.training import train_step

pytest.importorskip("numba", reason="numba is not installed (pip install 'bpgpu[jit]'): the compiled step is optional")

TOL = {"float64": 1e-12, "float32": 1e-5}
ARRAY_ARGUMENTS = 7  # X, T, w, grad, work, plan, velocity
PAIRS = (
    [(g, "squared_error") for g in activations.OUTPUT]
    + [(g, loss) for g in ("sigmoid", "softmax") for loss in ("binary_cross_entropy", "cross_entropy")]
    + [(g, "poisson") for g in ("exp", "softplus")]
)


def reference_step(net, X, T, optimizer):
    """The numpy path, spelled out: forward, backprop, L2 term, one optimizer kernel."""
    ws = net.workspace(X.shape[0])
    engine.forward(net, X, ws, net.params)
    loss = engine.backward(net, X, T, ws, net.params, ws.grad)
    c = 1.0 / X.shape[0] if net.reduction == "mean" else 1.0
    loss = loss + optimizer.penalize(ws.grad, c)
    optimizer.update(ws.grad)
    return float(loss)


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-300))


def problem(rng, sizes, output, dtype, m, scale=1.0, loss=None):
    X = (scale * rng.standard_normal((m, sizes[0]))).astype(dtype)
    if loss == "poisson":  # counts, zeros included
        T = rng.poisson(1.5, size=(m, sizes[-1])).astype(dtype)
    elif output == "softmax":  # rows of class probabilities (soft targets exercise every term)
        T = rng.dirichlet(np.ones(sizes[-1]), size=m).astype(dtype)
    elif output == "sigmoid":
        T = rng.uniform(size=(m, sizes[-1])).astype(dtype)
    else:
        T = rng.standard_normal((m, sizes[-1])).astype(dtype)
    return X, T


def twins(sizes, dtype, make_optimizer, **net_options):
    """Two identical nets: one stepped by the numpy path, one by the compiled step."""
    ref = bp.MLP(sizes, dtype=dtype, backend="numpy", init="glorot", seed=7, **net_options)
    net = ref.copy()
    return ref, make_optimizer(ref), net, make_optimizer(net)


def assert_same_steps(ref, ref_opt, net, step, X, T, dtype, steps=1):
    """Each step starts both nets from the same parameters (optimizer states carry over)."""
    tol, eps = TOL[dtype], np.finfo(dtype).eps
    for _ in range(steps):
        net.params[...] = ref.params
        before = np.array(ref.params, np.float64)
        expected = reference_step(ref, X, T, ref_opt)
        got = step(X, T)
        assert abs(got - expected) <= tol * abs(expected), (got, expected)
        if ref_opt.name in ("sgd", "momentum"):  # fused into the products: no gradient array exists
            assert step.gradient is None
        else:
            assert relative(step.gradient, ref.workspace(X.shape[0]).grad) <= tol
        assert relative(net.params, ref.params) <= tol
        # the update itself, up to the rounding of w to the dtype
        update, expected_update = net.params - before, ref.params - before
        bound = tol * np.linalg.norm(expected_update) + 4 * eps * np.linalg.norm(before)
        assert np.linalg.norm(update - expected_update) <= bound


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("hidden", activations.HIDDEN)
@pytest.mark.parametrize("output,loss", PAIRS)
def test_sgd_step_matches_numpy_path(hidden, output, loss, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{hidden} {output} {loss} {dtype}".encode()))
    depth = int(rng.integers(1, 4))
    sizes = [int(n) for n in rng.integers(2, 9, size=depth + 1)] + [int(rng.integers(2, 6))]
    m = int(rng.integers(1, 8))
    ref, ref_opt, net, opt = twins(
        sizes, dtype, lambda n: optim.SGD(n, learning_rate=0.3), hidden=hidden, output=output, loss=loss
    )
    X, T = problem(rng, sizes, output, dtype, m, loss=loss)
    step = jit.compiled_train_step(net, opt)
    assert step is not None
    assert_same_steps(ref, ref_opt, net, step, X, T, dtype, steps=1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "name,options",
    [
        ("sgd", {"alpha": 0.3}),
        ("momentum", {"momentum": 0.9}),
        ("momentum", {"momentum": 0.5, "alpha": 0.1}),
        ("nesterov", {"momentum": 0.9, "alpha": 0.2}),
        ("adam", {}),
        ("adam", {"alpha": 0.1}),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_optimizers_and_l2_match_numpy_path(name, options, reduction, dtype):
    rng = np.random.default_rng(3)
    sizes = [6, 9, 5, 3]
    lr = 0.05 if reduction == "mean" else 0.01
    ref, ref_opt, net, opt = twins(
        sizes,
        dtype,
        lambda n: optim.make_optimizer(name, n, lr, **options),
        hidden="tanh",
        output="softmax",
        loss="cross_entropy",
        reduction=reduction,
    )
    X, T = problem(rng, sizes, "softmax", dtype, 11)
    step = jit.compiled_train_step(net, opt)
    assert_same_steps(ref, ref_opt, net, step, X, T, dtype, steps=4)  # velocity and moments carried over


def test_matches_at_the_benchmark_sizes_with_blas_products():
    """Layers big enough for the np.dot branch, with the benchmarks' net (relu, identity, squared error)."""
    rng = np.random.default_rng(0)
    sizes, dtype = [64, 32, 10], "float32"
    ref, ref_opt, net, opt = twins(
        sizes, dtype, lambda n: optim.SGD(n, learning_rate=0.01), hidden="relu", output="identity", loss="squared_error"
    )
    X, T = problem(rng, sizes, "identity", dtype, 32)
    assert_same_steps(ref, ref_opt, net, jit.compiled_train_step(net, opt), X, T, dtype, steps=3)


def test_saturated_logits_give_the_same_finite_losses():
    """Logits of ±1000: the losses from the logits stay exact and finite, as on the numpy path."""
    rng = np.random.default_rng(1)
    for output, loss in [("sigmoid", "binary_cross_entropy"), ("softmax", "cross_entropy")]:
        ref, ref_opt, net, opt = twins(
            [3, 4, 3],
            "float64",
            lambda n: optim.SGD(n, learning_rate=1e-3),
            hidden="identity",
            output=output,
            loss=loss,
        )
        ref.params[...] *= 300.0
        net.params[...] = ref.params
        X, T = problem(rng, [3, 4, 3], output, "float64", 5, scale=30.0)
        step = jit.compiled_train_step(net, opt)
        assert_same_steps(ref, ref_opt, net, step, X, T, "float64")
        assert np.isfinite(net.params).all()


def test_learning_rate_is_read_on_every_call_and_strided_inputs_work():
    rng = np.random.default_rng(2)
    ref, ref_opt, net, opt = twins([4, 5, 2], "float64", lambda n: optim.SGD(n, learning_rate=0.1))
    X, T = problem(rng, [4, 5, 2], "sigmoid", "float64", 12)
    step = jit.compiled_train_step(net, opt)
    ref_opt.learning_rate = opt.learning_rate = 0.7  # as a schedule does between epochs
    assert_same_steps(ref, ref_opt, net, step, np.ascontiguousarray(X[::2]), T[::2].copy(), "float64")
    assert_same_steps(ref, ref_opt, net, step, X[::2], T[::2], "float64")


def test_a_plain_learning_rate_is_sgd():
    rng = np.random.default_rng(4)
    ref, ref_opt, net, _ = twins([3, 4, 1], "float64", lambda n: optim.SGD(n, learning_rate=0.25))
    X, T = problem(rng, [3, 4, 1], "sigmoid", "float64", 6)
    assert_same_steps(ref, ref_opt, net, jit.compiled_train_step(net, 0.25), X, T, "float64", steps=2)


@pytest.mark.parametrize("kernel", ["jit", "aot"])
def test_no_allocation_per_step_after_warm_up(kernel):
    """numba's runtime counts the JIT kernel's allocations; the extension compiled ahead of time
    (bpgpu.kernels.aot: the same compiled code, bit for bit, tests/test_aot.py) has its own copy
    of that runtime, whose counters numba's does not see, so for it tracemalloc checks the Python
    side (the dispatch to the export) alone."""
    from numba.core.runtime import _nrt_python, rtsys

    from bpgpu.kernels import cpu, provider

    if kernel == "aot" and provider.load() is None:
        pytest.skip(f"the ahead-of-time extension is not used: {provider.reason}")
    rng = np.random.default_rng(5)
    for sizes, m in [([2, 2, 2, 1], 1), ([64, 32, 10], 32)]:
        net = bp.MLP(
            sizes,
            hidden="sigmoid",
            output="softmax" if sizes[-1] > 1 else "sigmoid",
            loss="cross_entropy",
            dtype="float32",
            backend="numpy",
            seed=0,
        )
        step = jit.compiled_train_step(net, optim.Momentum(net, 0.1, alpha=0.01))
        if kernel == "jit":
            step._kernel = cpu.train_step.jit  # numba's dispatcher itself, whatever the extension
        X, T = problem(rng, sizes, net.activations[-1].name, "float32", m)
        step(X, T)
        _nrt_python.memsys_enable_stats()
        tracemalloc.start()
        try:
            before = rtsys.get_allocation_stats()
            start, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(20):
                step(X, T)
            end, peak = tracemalloc.get_traced_memory()
            after = rtsys.get_allocation_stats()
        finally:
            tracemalloc.stop()
            _nrt_python.memsys_disable_stats()
        # numba wraps each of the 7 array arguments in a small MemInfo header for the call and
        # frees it on return; anything else (a buffer, a copy) would show up here.
        if kernel == "jit":
            assert after.alloc - before.alloc == 20 * ARRAY_ARGUMENTS, (before, after)
            assert after.alloc - before.alloc == after.free - before.free
        assert end - start == 0 and peak - start < 1024, (start, end, peak)  # no array: at most a float box


def test_not_applicable_returns_none():
    strict = pytest.importorskip("array_api_strict")
    net = bp.MLP([2, 3, 1], backend=strict)
    assert jit.compiled_train_step(net, 0.1) is None  # not the numpy backend
    numpy_net = bp.MLP([2, 3, 1], backend="numpy")

    class Custom:
        name = "rmsprop"

    assert jit.compiled_train_step(numpy_net, Custom()) is None


def test_without_numba_every_hook_returns_none(monkeypatch):
    import sys

    import bpgpu.kernels

    jit.forget()
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now raises ImportError
    monkeypatch.delitem(sys.modules, "bpgpu.kernels.compiled", raising=False)
    monkeypatch.delattr(bpgpu.kernels, "compiled", raising=False)
    try:
        net = bp.MLP([2, 3, 1], backend="numpy", dtype="float64", seed=0)
        assert not jit.available()
        assert jit.compiled_train_step(net, 0.1) is None
        assert jit.train_step_for(net, optim.SGD(net)) is None
        # the numpy backend falls back to the array-API reference table, and says why in one line
        from bpgpu.kernels import generic

        assert net.backend.ops is generic
        assert "array-API kernels: numba or scipy not importable" in net.backend.reason
        X = np.random.default_rng(0).normal(size=(5, 2))
        assert bp.check_gradient(net, X, X[:, :1] ** 2).passed
    finally:
        jit.forget()


def test_a_numba_without_its_blas_helper_keeps_the_numpy_path(monkeypatch):
    """(numba's JIT: the extension compiled ahead of time, if any, is turned off here, since its
    kernels were compiled, BLAS helper included, when it was built.)"""
    from numba import _helperlib

    from bpgpu.kernels import provider

    monkeypatch.setenv("BPGPU_AOT", "0")
    provider.reset()
    jit.forget()
    monkeypatch.setattr(_helperlib, "c_helpers", {k: v for k, v in _helperlib.c_helpers.items() if k != "xxgemm"})
    try:
        assert jit.compiled_train_step(bp.MLP([2, 3, 1], backend="numpy"), 0.1) is None
    finally:
        monkeypatch.undo()
        provider.reset()
        jit.forget()


def test_bpgpu_jit_0_turns_the_compiled_step_off(monkeypatch):
    jit.forget()
    monkeypatch.setenv("BPGPU_JIT", "0")
    try:
        assert jit.compiled_train_step(bp.MLP([2, 3, 1], backend="numpy"), 0.1) is None
    finally:
        jit.forget()


def test_train_step_for_builds_once_per_optimizer():
    net = bp.MLP([2, 3, 1], backend="numpy", seed=0)
    opt = optim.SGD(net, 0.1)
    first = jit.train_step_for(net, opt)
    assert first is not None and jit.train_step_for(net, opt) is first
    twin = net.copy()
    assert jit.train_step_for(twin, opt).net is twin  # a different net gets its own step


def test_a_compiled_step_pickles_as_not_built_and_is_rebuilt():
    """Estimators pickle their optimizer: the step inside must not break that, nor survive it."""
    import pickle

    net = bp.MLP([3, 4, 2], backend="numpy", dtype="float64", seed=0)
    opt = optim.Momentum(net, 0.1)
    X, T = problem(np.random.default_rng(6), [3, 4, 2], "sigmoid", "float64", 5)
    built = jit.train_step_for(net, opt)
    built(X, T)
    assert pickle.loads(pickle.dumps(built)) is False
    opt.compiled_step = pickle.loads(pickle.dumps(opt.compiled_step))  # as an unpickled optimizer holds it
    rebuilt = jit.train_step_for(net, opt)
    assert rebuilt is not built and rebuilt.optimizer is opt
    twin = net.copy()
    expected = optim.Momentum(twin, 0.1)
    expected.velocity[...] = opt.velocity
    assert rebuilt(X, T) == pytest.approx(reference_step(twin, X, T, expected), rel=1e-12)


def test_every_activation_and_loss_has_a_code():
    from bpgpu.kernels import ACTIVATIONS, LOSSES, compiled

    names = [n.upper() for n in itertools.chain(ACTIVATIONS, LOSSES)]
    codes = [getattr(compiled, n) for n in names]
    assert codes == list(range(len(ACTIVATIONS))) + list(range(len(LOSSES)))


def test_compare_step_script_times_the_compiled_step(capsys):
    """benchmarks/compare_step.py end to end on the tiny net, peers left out (a smoke run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "compare_step.py"
    spec = importlib.util.spec_from_file_location("compare_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--sizes", "tiny", "--rounds", "2", "--round-seconds", "0.001", "--settle", "0", "--only", "bpgpu_jit"]
    assert script.main(args) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert {r[3].strip() for r in rows} == {"numpy_reference", "bpgpu_jit", "gemm"}
    ratio = {r[3].strip(): float(r[6]) for r in rows}
    assert ratio["numpy_reference"] == 1.0 and ratio["bpgpu_jit"] > 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 5), (1, 4, 1), (4, 6, 5), (16, 8, 9), (33, 20, 17)])
def test_gemm_with_alpha_and_beta_matches_numpy(shape, dtype):
    """The step's product, loop (below SMALL_GEMM multiply-adds) and BLAS alike, on the operand
    layouts the step passes: row-major matrices and transposed views of them."""
    from bpgpu.kernels import compiled

    rng = np.random.default_rng(sum(shape))
    m, k, n = shape
    A, B, C = (rng.standard_normal(s).astype(dtype) for s in ((m, k), (k, n), (m, n)))
    slots = np.empty(2, dtype)
    tol = 1e-6 if dtype == "float32" else 1e-14
    for a in (A, np.ascontiguousarray(A.T).T):
        for b in (B, np.ascontiguousarray(B.T).T):
            for alpha, beta in [(1.0, 0.0), (-0.3, 1.0), (0.5, 0.9)]:
                out = C.copy() if beta else np.full_like(C, np.nan)  # β = 0 must not read out
                compiled._gemm(a, b, out, alpha, beta, slots)
                expected = alpha * (A.astype(np.float64) @ B) + (beta * C if beta else 0.0)
                assert relative(out, expected) <= tol, (a.strides, b.strides, alpha, beta)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,options", [("sgd", {"alpha": 0.1}), ("momentum", {"momentum": 0.9, "alpha": 0.1})])
def test_fused_updates_with_blas_products_match_numpy_path(name, options, dtype):
    """SGD and momentum inside the BLAS products (layers above SMALL_GEMM), with the L2 term, over steps."""
    rng = np.random.default_rng(8)
    sizes = [40, 24, 16, 3]
    ref, ref_opt, net, opt = twins(
        sizes,
        dtype,
        lambda n: optim.make_optimizer(name, n, 0.05, **options),
        hidden="tanh",
        output="softmax",
        loss="cross_entropy",
    )
    X, T = problem(rng, sizes, "softmax", dtype, 20)
    step = jit.compiled_train_step(net, opt)
    assert step.gradient is None and step._grad.size == 0  # no gradient buffer for a fused update
    assert_same_steps(ref, ref_opt, net, step, X, T, dtype, steps=3)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("output,loss", PAIRS)
def test_weighted_step_matches_numpy_path(output, loss, name, dtype, numpy_path):
    """Sample weights inside the compiled step: Σ s_n J_n, δ(L) rows times s_n, c = 1/Σ s.
    (numpy_path: train_step, the reference, runs the numpy kernels.)"""
    rng = np.random.default_rng(zlib.crc32(f"weighted {output} {loss} {name} {dtype}".encode()))
    sizes = [5, 24, 30, 3]  # the middle product is above SMALL_GEMM: BLAS and loops both weighted
    ref, ref_opt, net, opt = twins(
        sizes, dtype, lambda n: optim.make_optimizer(name, n, 0.05, alpha=0.1), hidden="tanh", output=output, loss=loss
    )
    X, T = problem(rng, sizes, output, dtype, 9, loss=loss)
    s = rng.uniform(0.0, 3.0, size=9)
    s[2] = 0.0
    step = jit.compiled_train_step(net, opt)
    tol, eps = TOL[dtype], np.finfo(dtype).eps
    for _ in range(2):
        net.params[...] = ref.params
        before = np.array(ref.params, np.float64)
        weights = ref.weighting(s)
        expected = float(train_step(ref, X, T, ref_opt, weights))
        got = step(X, T, net.weighting(s))
        assert abs(got - expected) <= tol * abs(expected), (got, expected)
        update, expected_update = net.params - before, ref.params - before
        assert np.linalg.norm(update - expected_update) <= tol * np.linalg.norm(
            expected_update
        ) + 4 * eps * np.linalg.norm(before)
