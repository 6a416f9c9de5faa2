"""The CuPy path against the numpy path, on a real CUDA device (marker ``gpu``).

The ``gpu`` tests skip, with the reason from ``bp.gpu_status()``, where no device
is usable (the kernel sources are still compiled and executed on the CPU by the
bpgpu.testing checks); run them on a GPU box with scripts/gpu-check.sh. The
first tests check the CUDA kernel table itself and need no device.
"""

import numpy as np
import pytest
from helpers import HIDDEN, OUTPUT_LOSS_PAIRS, targets_for

import bpgpu as bp
from bpgpu.kernels import ACTIVATIONS, LOSSES
from bpgpu.testing import cases

STATUS = bp.gpu_status()


def gpu(test):
    """Mark a test ``gpu`` and skip it, with the reason, where CuPy cannot run."""
    return pytest.mark.gpu(pytest.mark.skipif(not STATUS.usable, reason=f"no usable GPU: {STATUS.reason}")(test))


# Tolerances of one op against its numpy twin: the GPU contracts a*b + c into an
# FMA and flushes float32 denormals, and float16 sums are carried in float there.
OP_TOL = {np.float16: 3e-3, np.float32: 2e-5, np.float64: 1e-12}


def to_device(x):
    """A CuPy array with the values *and the memory layout* of numpy array x
    (strides, stride-0 broadcasts); Python scalars pass through."""
    import cupy

    if not isinstance(x, np.ndarray):
        return x
    assert all(s >= 0 for s in x.strides), x.strides
    span = sum((n - 1) * s for n, s in zip(x.shape, x.strides)) + x.itemsize
    flat = np.lib.stride_tricks.as_strided(x, (span // x.itemsize,), (x.itemsize,))
    buf = cupy.asarray(flat)
    return cupy.ndarray(x.shape, x.dtype, memptr=buf.data, strides=x.strides)


def test_cuda_table_has_every_op_with_the_reference_signature():
    import inspect

    from bpgpu.kernels import OPS, cuda, generic

    for op in OPS:
        assert inspect.signature(getattr(cuda, op)) == inspect.signature(getattr(generic, op)), op
    assert set(cuda.OP_KERNELS) == set(OPS)
    launched = {k for names in cuda.OP_KERNELS.values() for k in names}
    assert launched == set(cuda.SPECS)  # no kernel that no op launches


def test_kernels_build_without_a_device_named_as_in_the_table():
    pytest.importorskip("cupy")
    from bpgpu.kernels import cuda

    built = cuda.all_kernels()
    assert set(built) == set(cuda.SPECS)
    assert all(k.name == name for name, k in built.items())
    assert cuda.kernel("relu_fwd") is built["relu_fwd"]  # created once, cached


def test_network_and_fit_driven_by_the_cuda_table_match_numpy_on_the_cpu(monkeypatch):
    """The whole library on bpgpu.kernels.cuda, with no change to callers: every
    hidden activation, every (output, loss) pair and the optimizer updates (the fused
    per-sample one included) run the exact CuPy-generated kernel sources, executed on
    the CPU by bpgpu.testing (numpy arrays stand in for device arrays, numpy's matmul
    and take for cuBLAS and CuPy's gather)."""
    pytest.importorskip("cupy")
    import array_api_compat

    from bpgpu.backend import Backend
    from bpgpu.kernels import cpu, cuda
    from bpgpu.testing import host, runner

    if host.gxx() is None:
        pytest.skip("no C++ compiler to run the kernel sources on the CPU")
    build = cuda.kernel
    monkeypatch.setattr(cuda, "kernel", lambda name: runner.HostKernel(build(name)))
    monkeypatch.setattr(cuda, "matmul", cpu.matmul)
    monkeypatch.setattr(cuda, "take_rows", cpu.take_rows)
    simulated = Backend("numpy", array_api_compat.array_namespace(np.empty(0)), cuda, "cuda table on the CPU")

    def compare():
        sizes = [4, 6, 5, 3]
        for hidden, (output, loss) in zip(HIDDEN * 2, OUTPUT_LOSS_PAIRS):
            X, T = _problem(sizes, loss, output)
            kw = dict(hidden=hidden, output=output, loss=loss, dtype="float64", init="uniform", epsilon=0.8, seed=3)
            ref, sim = bp.MLP(sizes, backend="numpy", **kw), bp.MLP(sizes, backend=simulated, **kw)
            np.testing.assert_allclose(sim.forward(X), ref.forward(X), rtol=1e-13, atol=1e-15)
            J, g = sim.loss_and_gradient(X, T)
            J_ref, g_ref = ref.loss_and_gradient(X, T)
            assert J == pytest.approx(J_ref, rel=1e-13), (hidden, output, loss)
            np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-14, err_msg=f"{hidden} {output} {loss}")
        rng = np.random.default_rng(4)
        X = rng.uniform(-2, 2, size=(8, 2))
        T = np.sin(X[:, :1]) * np.cos(X[:, 1:])
        for optimizer, batch_size, alpha in [("sgd", 1, 0.0), ("adam", 4, 1e-3), ("nesterov", 4, 0.0)]:
            nets = [
                bp.MLP([2, 5, 1], hidden="tanh", output="identity", dtype="float64", backend=b, init="glorot", seed=2)
                for b in ("numpy", simulated)
            ]
            for net in nets:
                bp.fit(
                    net,
                    X,
                    T,
                    optimizer=optimizer,
                    learning_rate=0.05,
                    epochs=2,
                    batch_size=batch_size,
                    seed=1,
                    alpha=alpha,
                    progress=False,
                    tol=None,
                )
            np.testing.assert_allclose(nets[1].params, nets[0].params, rtol=1e-12, atol=1e-14, err_msg=optimizer)

    session = runner.HostSession()
    try:  # a dry pass plans every kernel call, so all sources build in one compiler run
        session.record(compare)
    except Exception:  # nothing was computed in this pass: its values and asserts mean nothing
        pass
    session.compile()
    session.replay(compare)


@gpu
def test_auto_backend_is_cupy_here():
    from bpgpu.kernels import cuda

    backend = bp.resolve_backend("auto")
    assert backend.name == "cupy" and backend.ops is cuda
    assert backend.device.startswith("cuda:")


@gpu
@pytest.mark.parametrize("case", cases.all_cases(), ids=lambda c: c.id)
def test_op_matches_its_numpy_twin_on_device_arrays(case):
    from bpgpu.kernels import cuda

    host = case.build(seed=1)
    reference = [a.copy() if isinstance(a, np.ndarray) else a for a in host]
    device = [to_device(a) for a in host]
    for a, d in zip(host, device):
        if isinstance(a, np.ndarray):
            assert d.strides == a.strides and np.array_equal(d.get(), a)  # the layout really is on the device
    got = case.call(cuda, device)
    want = case.reference(reference)
    tol = OP_TOL[case.dtype]

    def close(g, w, what):
        w = np.asarray(w, dtype=np.float64)
        g = np.asarray(g.get() if hasattr(g, "get") else g, dtype=np.float64)
        scale = max(1.0, float(np.max(np.abs(w))) if w.size else 1.0)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=f"{case.id}: {what}")

    if got is not None and np.ndim(want) == 0:
        close(got, want, "returned total")
    for i in case.compared():
        close(device[i], reference[i], f"argument {case.signature()[i].name}")


NAN_OPS = (
    [f"{g}_fwd" for g in ACTIVATIONS]
    + [f"{j}_fwd" for j in LOSSES]
    + ["sigmoid_binary_cross_entropy_fwd", "softmax_cross_entropy_fwd", "canonical_value_and_delta/cross_entropy"]
)


@gpu
@pytest.mark.parametrize("op", NAN_OPS)
def test_nan_propagates_as_in_numpy(op):
    """A diverged value must stay NaN on the GPU too (CUDA's max(NaN, 0) is 0)."""
    from bpgpu.kernels import cuda

    case = cases.Case(op, np.float64, "random")
    host = case.build(seed=2)
    host[0][2, 3] = np.nan
    reference = [a.copy() if isinstance(a, np.ndarray) else a for a in host]
    device = [to_device(a) for a in host]
    got = case.call(cuda, device)
    with np.errstate(invalid="ignore"):
        want = case.reference(reference)
    if np.ndim(want) == 0:
        assert np.isnan(float(want)) and np.isnan(float(got))
    for i in case.compared():
        np.testing.assert_array_equal(np.isnan(device[i].get()), np.isnan(reference[i]), err_msg=f"{op}: arg {i}")
    assert any(np.isnan(reference[i]).any() for i in case.compared()) or np.ndim(want) == 0


def _problem(sizes, loss, output, m=17, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, sizes[0])), targets_for(loss, output, m, sizes[-1], rng)


@gpu
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_cupy_mlp_matches_numpy_in_float64(hidden, output, loss):
    import cupy

    sizes = [4, 6, 5, 3]
    X, T = _problem(sizes, loss, output)
    kw = dict(hidden=hidden, output=output, loss=loss, dtype="float64", init="uniform", epsilon=0.8, seed=3)
    ref, gpu = bp.MLP(sizes, backend="numpy", **kw), bp.MLP(sizes, backend="cupy", **kw)
    assert gpu.backend.ops.__name__ == "bpgpu.kernels.cuda"
    out = gpu.forward(X)
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float64
    np.testing.assert_allclose(out.get(), ref.forward(X), rtol=1e-12, atol=1e-14)
    assert gpu.loss(X, T) == pytest.approx(ref.loss(X, T), rel=1e-12)
    J, g = gpu.loss_and_gradient(X, T)
    J_ref, g_ref = ref.loss_and_gradient(X, T)
    assert isinstance(g, cupy.ndarray)
    assert J == pytest.approx(J_ref, rel=1e-12)
    np.testing.assert_allclose(g.get(), g_ref, rtol=1e-10, atol=1e-13)


@gpu
@pytest.mark.parametrize("output,loss", [("sigmoid", "binary_cross_entropy"), ("softmax", "cross_entropy")])
def test_saturated_logits_give_finite_equal_losses(output, loss):
    sizes = [3, 4, 2]
    X, T = _problem(sizes, loss, output)
    kw = dict(hidden="relu", output=output, loss=loss, dtype="float64", init="uniform", epsilon=60.0, seed=1)
    ref, gpu = bp.MLP(sizes, backend="numpy", **kw), bp.MLP(sizes, backend="cupy", **kw)
    J, g = gpu.loss_and_gradient(X, T)
    J_ref, g_ref = ref.loss_and_gradient(X, T)
    assert np.isfinite(J) and J == pytest.approx(J_ref, rel=1e-12)
    np.testing.assert_allclose(g.get(), g_ref, rtol=1e-10, atol=1e-12)


@gpu
def test_float32_forward_and_gradient_agree_with_numpy():
    sizes = [8, 32, 16, 4]
    X, T = _problem(sizes, "cross_entropy", "softmax", m=64)
    kw = dict(hidden="tanh", output="softmax", loss="cross_entropy", dtype="float32", seed=5)
    ref, gpu = bp.MLP(sizes, backend="numpy", **kw), bp.MLP(sizes, backend="cupy", **kw)
    np.testing.assert_allclose(gpu.forward(X).get(), ref.forward(X), rtol=1e-5, atol=1e-6)
    J, g = gpu.loss_and_gradient(X, T)
    J_ref, g_ref = ref.loss_and_gradient(X, T)
    assert J == pytest.approx(J_ref, rel=1e-5)
    assert np.abs(g.get() - g_ref).max() <= 1e-5 * np.abs(g_ref).max()


@gpu
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("batch_size", [1, 6])
def test_cupy_training_matches_numpy(optimizer, batch_size):
    """Every optimizer update, L2 and (batch 1, plain SGD) the fused per-sample outer update."""
    rng = np.random.default_rng(4)
    X = rng.uniform(-2, 2, size=(18, 2))
    T = np.sin(X[:, :1]) * np.cos(X[:, 1:])
    alpha = 0.0 if batch_size == 1 else 1e-3
    nets = [
        bp.MLP([2, 8, 1], hidden="tanh", output="identity", dtype="float64", backend=b, init="glorot", seed=2)
        for b in ("numpy", "cupy")
    ]
    for net in nets:
        bp.fit(
            net,
            X,
            T,
            optimizer=optimizer,
            learning_rate=0.05,
            epochs=3,
            batch_size=batch_size,
            seed=1,
            alpha=alpha,
            progress=False,
            tol=None,
        )
    np.testing.assert_allclose(bp.to_numpy(nets[1].params), nets[0].params, rtol=1e-10, atol=1e-12)


@gpu
@pytest.mark.parametrize("output,loss", OUTPUT_LOSS_PAIRS)
def test_weighted_loss_gradient_and_fit_on_cupy_match_numpy(output, loss):
    """Sample weights on the device: the weighted δ(L), per-sample losses and a shuffled weighted fit."""
    sizes = [4, 6, 3]
    X, T = _problem(sizes, loss, output)
    s = np.random.default_rng(7).uniform(0.0, 3.0, size=X.shape[0])
    kw = dict(hidden="tanh", output=output, loss=loss, dtype="float64", seed=3)
    ref, gpu = bp.MLP(sizes, backend="numpy", **kw), bp.MLP(sizes, backend="cupy", **kw)
    J, g = gpu.loss_and_gradient(X, T, sample_weight=s)
    J_ref, g_ref = ref.loss_and_gradient(X, T, sample_weight=s)
    assert J == pytest.approx(J_ref, rel=1e-12)
    np.testing.assert_allclose(g.get(), g_ref, rtol=1e-10, atol=1e-13)
    for net in (ref, gpu):
        bp.fit(
            net,
            X,
            T,
            sample_weight=s,
            optimizer="adam",
            learning_rate=0.01,
            batch_size=5,
            epochs=3,
            seed=1,
            progress=False,
            tol=None,
        )
    np.testing.assert_allclose(bp.to_numpy(gpu.params), ref.params, rtol=1e-10, atol=1e-12)


@gpu
def test_gemms_of_a_training_step_write_into_their_buffers_without_copies():
    """The three GEMMs of backprop on Wᵀ views of the flat vector allocate nothing
    (CuPy copies an operand that is neither C- nor F-contiguous: the control)."""
    import cupy

    from bpgpu.kernels import cuda

    net = bp.MLP([33, 65, 17], dtype="float32", backend="cupy", seed=0)
    ws = net.workspace(129)
    rng = np.random.default_rng(0)
    X = cupy.asarray(rng.normal(size=(129, 33)), dtype=cupy.float32)
    ws.D[2][...] = cupy.asarray(rng.normal(size=(129, 17)), dtype=cupy.float32)
    grad = ws.grad
    calls = [
        lambda: cuda.matmul(X, net.layout.wt(net.params, 1), ws.A[1]),  # Z = A Wᵀ
        lambda: cuda.matmul(X.T, ws.D[1], net.layout.wt(grad, 1)),  # ∂J/∂Wᵀ = Aᵀ δ, into the flat gradient
        lambda: cuda.matmul(ws.D[2], net.layout.wt(net.params, 2).T, ws.D[1]),  # δ W(l+1)
    ]
    pool = cupy.get_default_memory_pool()
    allocations = []

    def counting_malloc(size):
        allocations.append(size)
        return pool.malloc(size)

    strided = cupy.zeros((129, 66), dtype=cupy.float32)[:, ::2]  # neither C- nor F-contiguous
    for call in calls:  # warm up: cuBLAS handle and workspace
        call()
    cupy.cuda.set_allocator(counting_malloc)
    try:
        for call in calls:
            call()
        cupy.cuda.Device().synchronize()
        assert allocations == []
        cuda.matmul(strided, net.layout.wt(net.params, 1), ws.A[1])
        assert allocations, "the allocation counter saw no copy of a strided operand"
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    expected = bp.to_numpy(ws.D[2]) @ bp.to_numpy(net.layout.wt(net.params, 2)).T
    np.testing.assert_allclose(ws.D[1].get(), expected, rtol=1e-5, atol=1e-5)
