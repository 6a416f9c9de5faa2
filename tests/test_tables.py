"""Every kernel table against the array-API reference (bpgpu.kernels.generic).

Three tables, one per language: compiled CPU (bpgpu.kernels.compiled, numba), CUDA C
(bpgpu.kernels.cuda) and the array-API reference. Here: every table has every op of
OPS with the reference's signature; the compiled table's values match the
reference on every op, dtype and memory layout of bpgpu.testing.cases; its scalar
g″ and ∂²ℓ/∂a² (those of the compiled R-operator) match the reference's. The CUDA
table's values are held against the same reference by tests/test_kernel_sources.py
(its generated sources run on the CPU) and tests/test_gpu.py (on a GPU).
"""

import inspect

import numpy as np
import pytest

from bpgpu.kernels import ACTIVATIONS, LOSSES, OPS, compiled, cuda, generic
from bpgpu.testing import cases, checks


@pytest.mark.parametrize("table", [compiled, cuda], ids=lambda t: t.__name__)
def test_every_table_has_every_op_with_the_reference_signature(table):
    for op in OPS:
        assert inspect.signature(getattr(table, op)) == inspect.signature(getattr(generic, op)), op


# every op but matmul and take_rows (numpy's own matmul and take in the compiled table)
COMPILED_CASES = cases.all_cases(dtypes=(np.float32, np.float64))


@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: c.id)
def test_compiled_table_matches_the_reference(case):
    err, where, failure = checks.check_table(case, compiled)
    assert not failure, failure


def _outputs(name, rng):
    """Valid outputs a = g(z) of activation ``name``, saturated ones included."""
    z = np.concatenate([rng.normal(scale=3.0, size=200), [-40.0, -5.0, 0.0, 5.0, 40.0]])
    return {"identity": z, "sigmoid": 1.0 / (1.0 + np.exp(-z)), "tanh": np.tanh(z), "relu": np.maximum(z, 0.0),
            "leaky_relu": np.where(z > 0, z, 0.01 * z), "softplus": np.logaddexp(z, 0.0)}[name]


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
    a = getattr(generic, f"{name}_fwd")(z.copy(), np.zeros(200), np.empty_like(z), None, None)
    got = np.array([[compiled.g(code, x, 1.0, 0.01) for x in row] for row in z])
    np.testing.assert_allclose(got, a, rtol=1e-15, atol=0.0)
    s = rng.normal(size=z.shape)
    want = getattr(generic, f"{name}_bwd")(s, a, np.empty_like(z), None, None)
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


def test_the_sigmoid_is_the_same_formula_in_every_table():
    """σ = exp(−softplus(−z)) everywhere: exact where σ is tiny, where (1 + tanh(z/2))/2 cancels to 0."""
    z = np.array([[-745.0, -700.0, -100.0, -30.0, 0.0, 30.0]])
    want = np.exp(-np.logaddexp(-z, 0.0))
    got = compiled.sigmoid_fwd(z.copy(), np.zeros(6), np.empty_like(z), None, None)
    np.testing.assert_array_equal(got, want)
    assert got[0, 1] > 0.0 and np.log(got[0, 1]) == pytest.approx(-700.0, rel=1e-15)
    assert "exp(-bpgpu_softplus(T(-v)))" in cuda.SPECS["sigmoid_fwd"].operation
