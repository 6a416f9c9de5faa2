"""One training step per size, dtype and backend, next to the same-run GEMM, the
plain preallocated numpy step and the installed peers; bytes per step."""

import pytest

from bpgpu import bench

BACKENDS = {b.name: b for b in bench.available_backends()}
DTYPES = ("float32", "float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", bench.CONFIGS)
def test_gemm(benchmark, record, config, backend, dtype):
    """(m, n_in) @ (n_in, n_out) for the config's largest layer: the rate a step is judged against."""
    sizes, m = bench.CONFIGS[config]
    k, n = bench.largest_layer(sizes)
    case = bench.gemm_case(BACKENDS[backend], m, k, n, dtype)
    benchmark.group = f"step {config} {dtype}"
    benchmark(lambda: case.finish(case.fn()))
    seconds = record("gemm_seconds", (config, dtype, backend), benchmark)
    benchmark.extra_info["gflops"] = record("gemm", (config, dtype, backend), value=2 * m * k * n / seconds / 1e9)


@pytest.mark.parametrize("impl", bench.IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", bench.CONFIGS)
def test_train_step(benchmark, record, config, backend, dtype, impl):
    if impl in bench.PEER_MODULES:
        pytest.importorskip(bench.PEER_MODULES[impl])
    if impl not in bench.implementations(BACKENDS[backend], list(bench.PEER_MODULES)):
        pytest.skip(f"{impl} runs on the CPU: timed with the numpy backend")
    sizes, m = bench.CONFIGS[config]
    case = bench.step_case(impl, sizes, m, dtype, BACKENDS[backend])
    case.finish(case.fn())  # compile (numba, XLA) or load its cache before pytest-benchmark calibrates
    benchmark.group = f"step {config} {dtype}"
    benchmark(lambda: case.finish(case.fn()))
    seconds = record("step", (config, dtype, backend, impl), benchmark)
    benchmark.extra_info["gflops"] = bench.step_flops(sizes, m) / seconds / 1e9
    if impl == "bpgpu":
        memory = bench.bytes_allocated_per_step(case, BACKENDS[backend])
        benchmark.extra_info["bytes_per_step"] = record("memory", (config, dtype, backend), value=memory)
