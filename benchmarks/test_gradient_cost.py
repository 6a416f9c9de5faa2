"""Gradient cost versus W: backprop O(W), finite differences O(W²), on every backend.

The nets, batch and single-threaded host BLAS are those of ``bpgpu bench``
(the full plan's, see :mod:`bpgpu.bench.sections.gradient_cost`). Finite differences stop at
--fd-max-log10-W; the session summary fits the exponents and extrapolates.
"""

import pytest

from bpgpu import bench
from bpgpu.kernels import jit

PLAN = bench.plan_for("full")
BACKENDS = {b.name: b for b in bench.available_backends()}
GRID = PLAN.gradient_log10_W[::2]  # half decades, 10^2 .. 10^6
DTYPE = "float64"


@pytest.fixture(autouse=True)
def one_blas_thread():
    with jit.blas_limit(1):
        yield


def _net(backend, e):
    return bench.plan_net(PLAN, 10**e, BACKENDS[backend], DTYPE)


@pytest.mark.parametrize("e", GRID, ids=lambda e: f"W1e{e:g}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_backprop(benchmark, record, backend, e):
    net, X, T = _net(backend, e)
    case = bench.backprop_case(net, X, T)
    benchmark.group = f"gradient {backend} W=1e{e:g}"
    benchmark.extra_info["W"] = net.n_params
    benchmark(lambda: case.finish(case.fn()))
    record("gradient", (backend, "backprop", net.n_params), benchmark)


@pytest.mark.parametrize("e", GRID, ids=lambda e: f"W1e{e:g}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_evaluation(benchmark, record, backend, e):
    """One forward pass: the unit finite differences repeat W or 2W times."""
    net, X, T = _net(backend, e)
    case = bench.loss_case(net, X, T)
    benchmark.group = f"gradient {backend} W=1e{e:g}"
    benchmark(lambda: case.finish(case.fn()))
    record("gradient", (backend, "loss_pass", net.n_params), benchmark)


@pytest.mark.parametrize("e", GRID, ids=lambda e: f"W1e{e:g}")
@pytest.mark.parametrize("method", ["central_difference", "forward_difference"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_differences(benchmark, record, backend, method, e, fd_max_log10_W):
    if e > fd_max_log10_W:
        pytest.skip(f"W = 1e{e:g} is beyond --fd-max-log10-W={fd_max_log10_W:g} (O(W^2)); extrapolated in the summary")
    net, X, T = _net(backend, e)
    case = bench.finite_difference_case(net, X, T, method)
    benchmark.group = f"gradient {backend} W=1e{e:g}"
    benchmark.pedantic(lambda: case.finish(case.fn()), rounds=3, iterations=1, warmup_rounds=0)
    record("gradient", (backend, method, net.n_params), benchmark)
