"""Data-parallel gradient scaling on a Dask LocalCluster: 1, 2 and 4 worker processes.

The gradient of a small net ([10, 16, 1], tanh, squared error, float64, W = 193)
over 10⁶ samples, X and T generated and persisted on the workers in 8 row chunks
of 125 000 (so 1, 2 and 4 workers hold equal shares); each worker process has one
thread and one BLAS thread (dask's nanny sets OMP/MKL/OPENBLAS_NUM_THREADS=1).
Next to it, the same gradient in this process on one BLAS thread.

    python -m pytest benchmarks/test_dask_scaling.py --benchmark-columns=min,median,max,rounds

Workers beyond the machine's cores cannot help: on 2 cores, 4 processes time-share them.
"""

import os

import numpy as np
import pytest

import bpgpu as bp

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import bpgpu.dask as bd  # noqa: E402
from bpgpu.kernels import jit  # noqa: E402

M, CHUNK, SIZES = 1_000_000, 125_000, [10, 16, 1]
GROUP = f"dask gradient, {M:.0e} samples, MLP {SIZES}"


def _net():
    return bp.MLP(SIZES, hidden="tanh", output="identity", dtype="float64", backend="numpy", seed=0)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}-workers")
def cluster_data(request):
    with (
        distributed.LocalCluster(
            n_workers=request.param, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        rng = da.random.default_rng(0)
        X = rng.standard_normal((M, SIZES[0]), chunks=(CHUNK, -1))
        T = rng.standard_normal((M, SIZES[-1]), chunks=(CHUNK, -1))
        X, T = client.persist([X, T])
        distributed.wait([X, T])
        yield request.param, X, T


def test_dask_gradient(benchmark, cluster_data):
    workers, X, T = cluster_data
    net = _net()
    benchmark.group = GROUP
    benchmark.extra_info["workers"] = workers
    benchmark.extra_info["load_average_1min"] = os.getloadavg()[0]  # other work on the same cores
    g = benchmark.pedantic(bd.gradient, args=(net, X, T), rounds=5, warmup_rounds=1)
    assert g.shape == (net.n_params,) and np.all(np.isfinite(g))


def test_one_process_gradient(benchmark):
    rng = np.random.default_rng(0)
    X, T = rng.standard_normal((M, SIZES[0])), rng.standard_normal((M, SIZES[-1]))
    net = _net()
    benchmark.group = GROUP
    with jit.blas_limit(1):
        benchmark.pedantic(net.gradient, args=(X, T), rounds=5, warmup_rounds=1)
