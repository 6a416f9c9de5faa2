"""The compiled Hessian-vector products and exact Hessian (bpgpu.kernels.compiled's R-operator
section, driven by bpgpu.kernels.jit.CompiledCurvature) against the engine's array-API R-pass.

bp.hvp and bp.hessian on the numpy backend run one numba call each; here they are held to the
array-API passes (engine.forward_backward + engine.r_pass through the reference table) to 1e-12
relative in float64 on random architectures, activations, (output, loss) pairs and reductions;
the compiled Hessian is exactly symmetric; and after warm-up a call allocates nothing but the
array it returns. The oracles (central differences, torch.func, JAX) are in test_derivatives.py.
"""

import tracemalloc
from unittest import mock

import numpy as np
import pytest
from helpers import HIDDEN, OUTPUT_LOSS_PAIRS, random_problem
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bpgpu as bp
from bpgpu import engine
from bpgpu.backend import Backend
from bpgpu.kernels import generic, jit, recycle

pytest.importorskip("numba", reason="numba is not installed: the compiled R-pass needs it")


def reference_hvp(net, X, T, V):
    """H V through the engine's array-API passes and the reference kernel table."""
    ref = bp.MLP(
        net.sizes,
        hidden=[g.name for g in net.activations[:-1]],
        output=net.activations[-1].name,
        loss=net.loss_function.name,
        reduction=net.reduction,
        dtype=net.dtype,
        backend=Backend("numpy", net.backend.xp, generic, "the array-API reference table"),
    )
    ref.set_params(net.params)
    X, T = ref.check_inputs(X, T)
    return engine.r_pass(ref, X, T, engine.forward_backward(ref, X, T), V)


def relative(a, b):
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-300)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(1, 5), min_size=2, max_size=5),
    st.sampled_from(HIDDEN),
    st.sampled_from(OUTPUT_LOSS_PAIRS),
    st.sampled_from(["mean", "sum"]),
    st.integers(1, 7),
    st.integers(0, 2**16),
)
def test_compiled_hvp_and_hessian_match_the_array_api_passes_to_1e_12(sizes, hidden, pair, reduction, m, seed):
    output, loss = pair
    net, X, T, rng = random_problem(sizes, hidden, output, loss, reduction, seed=seed, m=m)
    if output in ("sigmoid", "softmax") and loss != "squared_error":
        # a saturated output makes the float64 problem itself ill-conditioned: at a = 0.99972 with
        # softmax and binary cross-entropy both tables and torch.func were 3e-10 from an 80-digit
        # mpmath Hessian (and so from each other), which no agreement of formulas can beat
        a = net.predict(X)
        assume(float(np.min(np.minimum(a, 1 - a))) >= 1e-3)
    assert jit.curvature_for(net) is not None
    v = rng.normal(size=net.n_params)
    reference = reference_hvp(net, X, T, np.eye(net.n_params)).T
    # H v against the size of its terms, max (|H| |v|): where they cancel, rounding is relative to
    # them (softmax, squared error, m = 1: 1.02e-12 of max |H v| from the reference, 6.3e-13 from
    # torch.func's H v, both within 1e-12 of max (|H| |v|))
    error = np.max(np.abs(bp.hvp(net, X, T, v) - reference_hvp(net, X, T, v[None, :])[0]))
    assert error <= 1e-12 * max(float(np.max(np.abs(reference) @ np.abs(v))), 1e-300)
    H = bp.hessian(net, X, T)
    np.testing.assert_array_equal(H, H.T)
    assert relative(H, reference) <= 1e-12


def test_many_directions_at_once_and_strided_inputs():
    """engine.hessian_vector_products on K directions equals K single products; non-contiguous
    X, T and V give the same result as their contiguous copies."""
    net, X, T, rng = random_problem([4, 6, 3], "sigmoid", "sigmoid", "binary_cross_entropy", seed=1, m=9)
    V = rng.normal(size=(5, net.n_params))
    Xc, Tc = net.check_inputs(X, T)
    many = engine.hessian_vector_products(net, Xc, Tc, V)
    for r in range(5):
        np.testing.assert_allclose(many[r], bp.hvp(net, X, T, V[r]), rtol=1e-13, atol=1e-14)
    wide = np.asfortranarray(X)
    strided_v = np.repeat(V[0], 2)[::2]
    np.testing.assert_allclose(bp.hvp(net, wide, np.asfortranarray(T), strided_v), many[0], rtol=1e-13, atol=1e-14)


def test_float32_follows_float64():
    net, X, T, rng = random_problem([5, 7, 4], "tanh", "softmax", "cross_entropy", seed=2, m=6)
    twin = bp.MLP([5, 7, 4], hidden="tanh", output="softmax", loss="cross_entropy", dtype="float32", backend="numpy")
    twin.set_params(net.params)
    v = rng.normal(size=net.n_params)
    Hv = bp.hvp(twin, X, T, v)
    H = bp.hessian(twin, X, T)
    assert Hv.dtype == np.float32 and H.dtype == np.float32
    assert relative(Hv, bp.hvp(net, X, T, v)) <= 1e-4
    assert relative(H, bp.hessian(net, X, T)) <= 1e-4


def test_other_backends_keep_the_array_path():
    strict = pytest.importorskip("array_api_strict")
    assert jit.curvature_for(bp.MLP([2, 3, 1], backend=strict)) is None


@pytest.mark.parametrize("split", [False, True], ids=["one call", "split over the cores"])
def test_no_allocation_but_the_result_after_warm_up(split):
    """One bp.hvp / bp.hessian call allocates the array it returns and at most 4 KiB more
    (tracemalloc sees numpy's buffers; the kernels' work vectors are made once per batch size).
    A call split over the cores (the Hessian's parts, the HVP's sample blocks) also hands one task
    per further core to jit's thread pool: a concurrent.futures Future and its work item, about
    2.7 KiB each (measured), allowed on top."""
    rng = np.random.default_rng(0)
    net = bp.MLP([16, 32, 32, 3], hidden="tanh", output="identity", dtype="float64", backend="numpy", seed=0)
    X, T = rng.normal(size=(64, 16)), rng.normal(size=(64, 3))
    v = rng.normal(size=net.n_params)
    hand_off = 4096 * (jit._CORES - 1) if split else 0
    with mock.patch.object(jit, "_splits", lambda size: split):  # whatever the load average
        for call in (lambda: bp.hvp(net, X, T, v), lambda: bp.hessian(net, X, T)):
            call()
            tracemalloc.start()
            try:
                start, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                result = call()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak - start <= result.nbytes + 4096 + hand_off, (peak - start, result.nbytes)


def _hessian_in_parts(net, X, T, parts):
    """(one call's H, the same H formed as ``parts`` parts then mirrored) by the compiled kernels."""
    module = jit.kernels()
    X, T = net.check_inputs(X, T)
    W, plan, m = net.n_params, jit.plan(net, module), X.shape[0]
    code, mean = bp.kernels.LOSSES.index(net.loss_function.name), net.reduction == "mean"
    whole, split = np.full((W, W), np.nan), np.full((W, W), np.nan)
    work = np.empty(module.hessian_work_length(plan, m))
    jit.blas_threads.one_thread(module.exact_hessian, X, T, net.params, whole, work, plan, code, mean)
    for part in range(parts):
        work = np.full(module.hessian_work_length(plan, m), np.nan)  # no part reads what another left
        jit.blas_threads.one_thread(
            module.exact_hessian_part, X, T, net.params, split, work, plan, code, mean, part, parts
        )
    for part in range(parts):
        module.hessian_mirror(split, part, parts)
    return whole, split


@pytest.mark.parametrize(
    ("sizes", "hidden", "output", "loss", "m"),
    [
        ([5, 35, 17, 3], "tanh", "softmax", "cross_entropy", 7),  # Θ(2)'s diagonal block in two pair tiles
        ([4, 16, 16], "sigmoid", "identity", "squared_error", 1),  # one whole group of 16 units
        ([3, 20, 33, 18, 2], "softplus", "sigmoid", "binary_cross_entropy", 5),  # groups of 16 + a rest
        ([6, 3, 20, 2], "relu", "exp", "poisson", 4),  # Θ(1) only has an adjacent paired block
        ([8, 20, 80, 1], "tanh", "identity", "squared_error", 3),  # adjacent block in 2 tiles, diagonal in 3
    ],
)
def test_pair_gemm_blocks_match_the_array_api_passes_and_split_bitwise(sizes, hidden, output, loss, m):
    """Layers of HESSIAN_PAIRED or more units have their diagonal and adjacent blocks formed by
    GEMMs over pairs of inputs (compiled._pair_block), in tiles of pairs and groups of units: H
    equals the array-API passes' to 1e-12 relative, is exactly symmetric, and parts that split the
    units in whole groups give the one call's H bitwise."""
    module = jit.kernels()
    assert max(sizes[1:]) >= module.HESSIAN_PAIRED  # the pair path is taken
    net, X, T, _ = random_problem(sizes, hidden, output, loss, "sum", seed=sum(sizes), m=m)
    H = bp.hessian(net, X, T)
    np.testing.assert_array_equal(H, H.T)
    assert relative(H, reference_hvp(net, X, T, np.eye(net.n_params)).T) <= 1e-12
    for parts in (2, 3, 5):
        whole, split = _hessian_in_parts(net, X, T, parts)
        np.testing.assert_array_equal(split, whole)
    np.testing.assert_array_equal(whole, H)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.one_of(st.integers(1, 6), st.sampled_from([16, 17, 23])), min_size=2, max_size=4),
    st.sampled_from(HIDDEN),
    st.sampled_from(OUTPUT_LOSS_PAIRS),
    st.integers(1, 9),
    st.integers(2, 5),
    st.integers(0, 2**16),
)
def test_the_hessian_in_parts_equals_one_call_bitwise(sizes, hidden, pair, m, parts, seed):
    """compiled.exact_hessian_part over ``parts`` ranges of units (some empty where a layer has
    fewer units or groups than parts), then hessian_mirror over ``parts`` tile sets, gives exactly
    the one-call H: every entry comes from the same products in the same order. The random
    architectures mix layers below and at or above HESSIAN_PAIRED units, so paired and G_j′
    blocks meet in one H in either order; H is also exactly symmetric and within 1e-12 of the
    array-API passes'."""
    output, loss = pair
    net, X, T, _ = random_problem(sizes, hidden, output, loss, seed=seed, m=m)
    whole, split = _hessian_in_parts(net, X, T, parts)
    np.testing.assert_array_equal(split, whole)
    np.testing.assert_array_equal(whole, whole.T)
    assert relative(whole, reference_hvp(net, X, T, np.eye(net.n_params)).T) <= 1e-12


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_the_mirror_of_an_h_past_the_caches_is_exact(dtype, parts):
    """compiled.hessian_mirror on an H of HESSIAN_STREAM_BYTES or more (written by non-temporal
    stores) and on a small one (plain stores) leaves the upper triangle and gives its transpose
    below, in ``parts`` tile sets, whatever the lower triangle held before."""
    module = jit.kernels()
    rng = np.random.default_rng(parts)
    itemsize = np.dtype(dtype).itemsize
    large = int(np.ceil(np.sqrt(module.HESSIAN_STREAM_BYTES / itemsize))) + 37  # not a multiple of a tile
    for W in (large, 301):
        upper = np.triu(rng.normal(size=(W, W)).astype(dtype))
        H = upper + np.tril(np.full((W, W), np.nan, dtype=dtype), -1)
        for part in range(parts):
            module.hessian_mirror(H, part, parts)
        np.testing.assert_array_equal(H, upper + np.triu(upper, 1).T)
    assert large * large * itemsize >= module.HESSIAN_STREAM_BYTES


@pytest.mark.parametrize("split", [False, True], ids=["one call", "split over the cores"])
def test_a_large_hessian_reuses_the_memory_of_the_one_dropped_and_overwrites_all_of_it(split):
    """An H of RECYCLE_BYTES or more (bpgpu.kernels.recycle) is formed in the memory of the last
    one the caller dropped, here filled with NaN first: it equals, bitwise, an H formed in fresh
    memory while it is held; an H still held is never written by the next call."""
    net, X, T, _ = random_problem([40, 48, 5], "tanh", "identity", "squared_error", seed=5, m=9)
    assert net.n_params**2 * 8 >= recycle.RECYCLE_BYTES
    with mock.patch.object(jit, "_splits", lambda size: split):
        first = bp.hessian(net, X, T)
        where = first.__array_interface__["data"][0]
        first[:] = np.nan
        del first
        reused = bp.hessian(net, X, T)
        assert reused.__array_interface__["data"][0] == where
        fresh = bp.hessian(net, X, T)  # reused is held: other memory
        assert fresh.__array_interface__["data"][0] != where
        np.testing.assert_array_equal(reused, fresh)
        assert relative(fresh, reference_hvp(net, X, T, np.eye(net.n_params)).T) <= 1e-12


@pytest.mark.skipif(jit._CORES < 2, reason="one core: bp.hessian never splits its rows over threads")
def test_threaded_hessian_equals_the_one_call_hessian():
    """bp.hessian split over the cores (forced) returns the one-call H, bitwise,
    and the array-API passes' H to 1e-12; a part that raises fails the call (no hang)."""
    net, X, T, _ = random_problem([7, 9, 5, 3], "tanh", "softmax", "cross_entropy", seed=3, m=11)
    with mock.patch.object(jit, "_splits", lambda size: False):
        whole = bp.hessian(net, X, T)
    with mock.patch.object(jit, "_splits", lambda size: True):  # whatever the size and load average
        split = bp.hessian(net, X, T)
        np.testing.assert_array_equal(split, whole)
        assert relative(split, reference_hvp(net, X, T, np.eye(net.n_params)).T) <= 1e-12
        curvature = jit.curvature_for(net)
        with mock.patch.object(curvature, "_module", mock.Mock(wraps=curvature._module)) as module:
            module.exact_hessian_part.side_effect = RuntimeError("a part failed")
            with pytest.raises(RuntimeError, match="a part failed"):
                bp.hessian(net, X, T)
        np.testing.assert_array_equal(bp.hessian(net, X, T), whole)  # a failed call leaves no state behind


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("K", [1, 3])
def test_hvp_split_into_sample_blocks_gives_the_whole_calls_result_and_allocates_nothing(monkeypatch, reduction, K):
    """Large H V calls run as one block of samples per core on Python threads, each block's share of
    the sum into its own buffer (jit.CompiledCurvature): the whole call's H V to 1e-12, against the
    array-API passes too; after warm-up nothing is allocated but the result and the thread hand-off's
    few Python objects (a future, a work item: under 16 KiB, where a (K, W) partial is 28–85 KiB)."""
    net, X, T, rng = random_problem([20, 64, 32, 3], "tanh", "softmax", "cross_entropy", reduction, 4, 11)
    V = rng.normal(size=(K, net.n_params))
    compiled = jit.curvature_for(net)
    whole = compiled.hessian_vector_products(X, T, V)
    with monkeypatch.context() as patch:
        patch.setattr(jit, "_SPLIT_WORK", 1)
        patch.setattr(jit, "_CORES", 3)
        patch.setattr(jit.blas_threads, "load", lambda: 0.0)
        split = compiled.hessian_vector_products(X, T, V)
        tracemalloc.start()
        try:
            start, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            again = compiled.hessian_vector_products(X, T, V)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert relative(split, whole) <= 1e-12
    assert relative(split, reference_hvp(net, X, T, V)) <= 1e-12
    np.testing.assert_array_equal(again, split)
    assert peak - start <= again.nbytes + 16384, (peak - start, again.nbytes)
