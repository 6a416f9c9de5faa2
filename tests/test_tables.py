"""Every kernel table against the array-API reference (bpgpu.kernels.generic).

Three tables, one per language: compiled CPU (bpgpu.kernels.cpu over bpgpu.kernels.compiled, numba), CUDA C
(bpgpu.kernels.cuda) and the array-API reference. Here: every table has every op of
OPS with the reference's signature; the compiled table's values match the
reference on every op, dtype and memory layout of bpgpu.testing.cases; its scalar
g″ and ∂²ℓ/∂a² (those of the compiled R-operator) match the reference's. The CUDA
table's values are held against the same reference by tests/test_kernel_sources.py
(its generated sources run on the CPU) and tests/test_gpu.py (on a GPU). Last, the
one-call compiled gradient (forward, backprop and the δ·aᵀ products in one numba call)
against the engine's passes through the reference table, to 1e-12 in float64.
"""

import inspect

import numpy as np
import pytest
from helpers import HIDDEN, OUTPUT_LOSS_PAIRS, targets_for
from hypothesis import given, settings
from hypothesis import strategies as st

import bpgpu as bp
from bpgpu import engine
from bpgpu.backend import Backend
from bpgpu.kernels import ACTIVATIONS, LOSSES, OPS, compiled, cpu, cuda, generic, jit
from bpgpu.testing import cases, checks


@pytest.mark.parametrize("table", [cpu, cuda], ids=lambda t: t.__name__)
def test_every_table_has_every_op_with_the_reference_signature(table):
    for op in OPS:
        assert inspect.signature(getattr(table, op)) == inspect.signature(getattr(generic, op)), op


# every op but matmul and take_rows (numpy's own matmul and take in the compiled table)
COMPILED_CASES = cases.all_cases(dtypes=(np.float32, np.float64))


@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: c.id)
def test_compiled_table_matches_the_reference(case):
    err, where, failure = checks.check_table(case, cpu)
    assert not failure, failure


def _outputs(name, rng):
    """Valid outputs a = g(z) of activation ``name``, saturated ones included."""
    z = np.concatenate([rng.normal(scale=3.0, size=200), [-40.0, -5.0, 0.0, 5.0, 40.0]])
    return {
        "identity": z,
        "sigmoid": 1.0 / (1.0 + np.exp(-z)),
        "tanh": np.tanh(z),
        "relu": np.maximum(z, 0.0),
        "leaky_relu": np.where(z > 0, z, 0.01 * z),
        "softplus": np.logaddexp(z, 0.0),
        "exp": np.exp(z),
    }[name]


@pytest.mark.parametrize("name", [g for g in ACTIVATIONS if g != "softmax"])
def test_compiled_second_derivative_matches_the_reference(name):
    a = _outputs(name, np.random.default_rng(1))
    code = ACTIVATIONS.index(name)
    got = np.array([compiled.g2(code, x, 1.0) for x in a])
    reference = generic.SECOND_DERIVATIVES[name]
    want = np.zeros_like(a) if reference is None else reference(a)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("name", [g for g in ACTIVATIONS if g != "softmax"])
def test_compiled_scalar_g_and_g1_match_the_reference_kernels(name):
    rng = np.random.default_rng(2)
    z = np.concatenate([rng.normal(scale=3.0, size=(1, 200)), [[-800.0, -40.0, 0.0, 40.0, 800.0] * 40]])
    code = ACTIVATIONS.index(name)
    with np.errstate(over="ignore", invalid="ignore"):  # exp(800) is inf in both
        a = getattr(generic, f"{name}_fwd")(z.copy(), np.zeros(200), np.empty_like(z), None, None)
        want = getattr(generic, f"{name}_bwd")(s := rng.normal(size=z.shape), a, np.empty_like(z), None, None)
    got = np.array([[compiled.g(code, x, 1.0, 0.01) for x in row] for row in z])
    np.testing.assert_allclose(got, a, rtol=1e-15, atol=0.0)
    got = s * np.array([[compiled.g1(code, x, 1.0, 0.01) for x in row] for row in a])
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_compiled_loss_curvature_matches_the_reference(loss):
    rng = np.random.default_rng(3)
    a = np.concatenate([rng.uniform(0.01, 0.99, 100), [0.0, 1.0, 1e-320]])
    t = np.concatenate([rng.uniform(0, 1, 100), [1.0, 0.0, 1.0]])
    tiny, below = float(np.finfo(np.float64).tiny), float(np.nextafter(1.0, 0.0))
    code = LOSSES.index(loss)
    got = np.array([compiled.loss_curvature(code, x, y, 1.0, tiny, below) for x, y in zip(a, t)])
    with np.errstate(over="ignore", divide="ignore"):  # saturated outputs: t / tiny² is inf in both
        want = generic.LOSS_CURVATURES[loss](a, t)
    np.testing.assert_allclose(got, want, rtol=1e-13)


def _ulps(a, b):
    """|a − b| in units in the last place of their dtype (a and b of one float dtype, finite or ±inf)."""
    ints = {np.float32: np.int32, np.float64: np.int64}[a.dtype.type]
    ia, ib = (x.view(ints).astype(np.int64) for x in (a, b))
    sign = np.int64(np.iinfo(ints).min)
    ia, ib = (np.where(x < 0, sign - x, x) for x in (ia, ib))  # monotone in the float's value
    return np.abs(ia - ib)


@pytest.mark.parametrize("dtype, to_rounded, to_numpy", [(np.float32, 2, 3), (np.float64, 3, 3)])
def test_compiled_tanh_is_within_a_few_ulp_of_the_rounded_tanh_and_numpys(dtype, to_rounded, to_numpy):
    """The compiled tanh (arithmetic only, float32 arithmetic for float32 arrays) through the vectorized
    forward loop: a dense sweep of [−12, 12], log-spaced magnitudes down to the subnormals, both signs;
    ±0, ±inf and NaN kept (the scalar). Against tanh in float64 (float32: rounded to float32) and numpy's own tanh
    (float64: the same; numpy's is within an ulp of the exact tanh, the compiled one's e/(e + 2) rounds three
    times near 0, so 3 ulp are reached at a few points such as ±0.2)."""
    tiny = np.finfo(dtype).smallest_subnormal
    magnitudes = np.logspace(np.log10(tiny), np.log10(30.0), 200_000)
    z = np.concatenate([np.linspace(-12.0, 12.0, 400_001), magnitudes, -magnitudes]).astype(dtype)[None, :]
    z[0, :2] = tiny, -tiny  # the log sweep's ends rounded in float64
    got = cpu.tanh_fwd(z.copy(), np.zeros(z.shape[1], dtype=dtype), np.empty_like(z), None, None)
    rounded = np.tanh(z.astype(np.float64)).astype(dtype)
    assert _ulps(got, rounded).max() <= to_rounded
    assert _ulps(got, np.tanh(z)).max() <= to_numpy
    special = np.array([compiled.tanh(x) for x in np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype=dtype)])
    np.testing.assert_array_equal(special, np.array([0.0, -0.0, 1.0, -1.0, np.nan]))
    assert list(np.signbit(special[:2])) == [False, True] and got.dtype == dtype


def test_the_sigmoid_is_the_same_formula_in_every_table():
    """σ = exp(−softplus(−z)) everywhere: exact where σ is tiny, where (1 + tanh(z/2))/2 cancels to 0."""
    z = np.array([[-745.0, -700.0, -100.0, -30.0, 0.0, 30.0]])
    want = np.exp(-np.logaddexp(-z, 0.0))
    got = cpu.sigmoid_fwd(z.copy(), np.zeros(6), np.empty_like(z), None, None)
    np.testing.assert_array_equal(got, want)
    assert got[0, 1] > 0.0 and np.log(got[0, 1]) == pytest.approx(-700.0, rel=1e-15)
    assert "exp(-bpgpu_softplus(T(-v)))" in cuda.SPECS["sigmoid_fwd"].operation


# --- the one-call compiled gradient against the array-API passes ---------------------------


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=2, max_size=4),
    st.sampled_from(HIDDEN),
    st.sampled_from(OUTPUT_LOSS_PAIRS),
    st.integers(1, 9),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_compiled_gradient_matches_the_array_api_passes_to_1e_12(sizes, hidden, pair, m, weighted, seed):
    """net.loss_and_gradient on numpy (one numba call) against the engine's passes through the
    array-API reference table, float64: the same J and ∂J/∂w to 1e-12 relative."""
    output, loss = pair
    if output == "softmax" and sizes[-1] < 2:
        sizes = sizes[:-1] + [2]
    rng = np.random.default_rng(seed)
    net = bp.MLP(sizes, hidden=hidden, output=output, loss=loss, dtype="float64", backend="numpy", seed=seed)
    X = rng.normal(size=(m, sizes[0]))
    T = targets_for(loss, output, m, sizes[-1], rng)
    s = rng.uniform(0.1, 2.0, m) if weighted else None
    assert jit.gradient_for(net) is not None
    J, g = net.loss_and_gradient(X, T, sample_weight=s)
    reference = bp.MLP(
        sizes,
        hidden=hidden,
        output=output,
        loss=loss,
        dtype="float64",
        backend=Backend("numpy", net.backend.xp, generic, "the array-API reference table"),
    )
    reference.set_params(net.params)
    Xr, Tr = reference.check_inputs(X, T)
    ws = reference.workspace(m)
    engine.forward(reference, Xr, ws, reference.params)
    J_ref = float(
        engine.backward(reference, Xr, Tr, ws, reference.params, ws.grad, reference.weighting(s) if weighted else None)
    )
    assert J == pytest.approx(J_ref, rel=1e-12, abs=1e-300)
    scale = max(1.0, float(np.max(np.abs(ws.grad))))
    assert float(np.max(np.abs(g - ws.grad))) <= 1e-12 * scale
