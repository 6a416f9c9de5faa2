"""Levenberg–Marquardt (docs/guide/second_order.rst): one iteration against torch-levenberg-marquardt, and the
normal-equation product against the machine's GEMM, CPU float64, measured in one run,
both libraries on one BLAS / intra-op thread (as the other benchmarks here), so that a
shared machine's load disturbs them alike.

    python -m pytest benchmarks/test_levenberg_marquardt.py -q

The session summary (benchmarks/conftest.py) prints torch-LM's time over bpgpu's per
problem and the product's rate as a fraction of the same-run GEMM rate. Before timing,
each problem checks that both libraries take the same step from the same parameters.
"""

import time

import numpy as np
import pytest

from bpgpu.bench import levenberg_marquardt as lm_cases
from bpgpu.levenberg_marquardt import LevenbergMarquardt

pytest.importorskip("torch_levenberg_marquardt", reason="torch-levenberg-marquardt (extra 'peers') is the peer")


@pytest.fixture(autouse=True)
def one_thread():
    with lm_cases.one_thread():
        yield


PROBLEMS = {"sinc200": lm_cases.sinc, "regression8_2000": lm_cases.regression8}
CASES = {"bpgpu": lm_cases.BpgpuIteration, "torch_lm": lm_cases.TorchLMIteration}


@pytest.fixture(scope="module", params=list(PROBLEMS))
def problem(request):
    problem = PROBLEMS[request.param]()
    ours, theirs = lm_cases.BpgpuIteration(problem), lm_cases.TorchLMIteration(problem)
    step = ours()
    theirs()
    moved = np.asarray(ours.net.params) - ours.w0
    gap = np.abs(np.asarray(ours.net.params) - theirs.bpgpu_params()).max() / np.abs(moved).max()
    assert step.accepted and gap < 1e-6, f"bpgpu and torch-LM take different steps (relative gap {gap:.2e})"
    return request.param, problem


@pytest.mark.parametrize("impl", list(CASES))
def test_one_iteration(benchmark, record, problem, impl):
    name, data = problem
    case = CASES[impl](data)
    case()  # warm: torch's vmap tracing, numpy's workspaces
    benchmark.group = f"LM iteration {name}"
    # sinc: a few ms per call, so 30 rounds (the best of them is what counts on a shared machine)
    benchmark.pedantic(case, rounds=30 if name == "sinc200" else 3, warmup_rounds=1)
    record("lm", (f"LM iteration {name}", impl), benchmark)


def test_normal_equation_product_against_gemm(record):
    """RᵀR summed over chunks (``LevenbergMarquardt.gram``'s product, ``Backend.gram``: SYRK in place,
    then the triangle mirrored) at W = 5,671 ([8, 70, 70, 1]), N = 1,024 rows, against an
    (W × N)(N × W) GEMM of the same shape timed in the same run."""
    data = lm_cases.regression8(m=1024, hidden=70)
    net = lm_cases.bpgpu_net(data)
    solver = LevenbergMarquardt(net, data.X, data.T, form="parameters")
    chunks = [rows for _, _, rows in solver.chunks()]
    W, N = net.n_params, data.X.shape[0]
    assert W >= 5000
    best = np.inf
    for _ in range(3):
        start = time.perf_counter()
        A = net.backend.gram(chunks, W, net.xp_dtype)
        best = min(best, time.perf_counter() - start)
        del A
    gemm = lm_cases.gemm_rate(W, N)
    rate = 2.0 * N * W * W / best / 1e9  # GEMM-equivalent flops: the product a GEMM would do
    record("lm", ("product_gflops", W), value=rate)
    record("lm", ("gemm_gflops", W), value=gemm)
