"""pytest-benchmark set-up for ``python -m pytest benchmarks/`` (not part of the test run).

Every case comes from :mod:`bpgpu.bench`, the code ``bpgpu bench`` runs. Each
benchmark records its best time here; at the end of the session the derived
figures that benchmarks/NOTES.md checks the targets against (log-log exponents with their fit ranges,
GFLOP/s against the same-run GEMM, ratios to bpgpu and to the plain numpy
step, bytes per step) are printed from the numbers of this one run.
"""

from __future__ import annotations

import pytest

from bpgpu import bench

RESULTS: dict = {"gradient": {}, "gemm": {}, "gemm_seconds": {}, "step": {}, "memory": {}, "lm": {}}


def pytest_addoption(parser):
    group = parser.getgroup("bpgpu benchmarks")
    group.addoption("--fd-max-log10-W", type=float, default=3.5,
                    help="largest W (as log10) timed by finite differences (default 3.5; O(W^2) beyond)")
    group.addoption("--no-large", action="store_true", help="skip the [4096,4096,4096,10] b512 step (~90 GFLOP)")


@pytest.fixture(scope="session")
def fd_max_log10_W(request):
    return request.config.getoption("--fd-max-log10-W")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--no-large"):
        skip = pytest.mark.skip(reason="--no-large")
        for item in items:
            callspec = getattr(item, "callspec", None)
            if callspec is not None and callspec.params.get("config") == "large":
                item.add_marker(skip)


@pytest.fixture(scope="session")
def record():
    """record(kind, key, benchmark) keeps the benchmark's best time for the summary;
    record(kind, key, value=...) keeps a number (GFLOP/s, bytes). Returns the value."""

    def keep(kind: str, key: tuple, benchmark=None, value=None):
        RESULTS[kind][key] = benchmark.stats.stats.min if benchmark is not None else value
        return RESULTS[kind][key]

    return keep


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    grad = RESULTS["gradient"]
    for backend in sorted({key[0] for key in grad}):
        by_W: dict[int, dict] = {}
        for (b, method, W), t in grad.items():
            if b == backend:
                by_W.setdefault(W, {"W": W})[method] = t
        points = [by_W[W] for W in sorted(by_W) if "backprop" in by_W[W] and "loss_pass" in by_W[W]]
        if len(points) < 2:
            continue
        fits = bench.fit_gradient_cost(points)
        write(f"\ngradient cost on {backend} (exponents over W in {fits['fit_range']}):")
        for method in bench.METHODS:
            own = fits["fits"][method]
            if own:
                write(f"  {method:20s} W^{fits['exponents'][method]:.2f}   own range {own['fit_range']}: "
                      f"W^{own['exponent']:.2f}")
        for row in fits["extrapolated"][-1:]:
            write("  extrapolated at W=%d: " % row["W"] + ", ".join(
                f"{m} ~{bench.duration(t)}" for m, t in row.items() if m != "W"))
    if RESULTS["step"]:
        write("\ntraining step: time, GFLOP/s / same-run GEMM, time / bpgpu, time / plain numpy step")
        for (config, dtype, backend, impl), t in RESULTS["step"].items():
            sizes, m = bench.CONFIGS[config]
            gflops = bench.step_flops(sizes, m) / t / 1e9
            gemm = RESULTS["gemm"].get((config, dtype, backend))
            base = RESULTS["step"].get((config, dtype, backend, "bpgpu"))
            ref = RESULTS["step"].get((config, dtype, "numpy", "numpy_reference"))
            cells = [f"{bench.duration(t):>9s}", f"{gflops:8.2f} GFLOP/s",
                     f"{gflops / gemm:5.2f} of GEMM" if gemm else "", f"{t / base:5.2f}x bpgpu" if base else "",
                     f"{t / ref:5.2f}x numpy" if ref else ""]
            write(f"  {config:7s} {dtype:8s} {backend:6s} {impl:16s} " + "  ".join(cells))
    for (config, dtype, backend), mem in RESULTS["memory"].items():
        write(f"  bytes per bpgpu step {config} {dtype} {backend}: peak {mem['peak']}, retained {mem['retained']}, "
              f"pool growth {mem['pool_growth']} ({mem['method']})")
    lm = RESULTS["lm"]
    for name in sorted({key[0] for key in lm if len(key) == 2 and key[1] in ("bpgpu", "torch_lm")}):
        ours, theirs = lm.get((name, "bpgpu")), lm.get((name, "torch_lm"))
        if ours and theirs:
            write(f"\nLM iteration {name}: bpgpu {bench.duration(ours)}, torch-LM {bench.duration(theirs)}, "
                  f"torch-LM / bpgpu = {theirs / ours:.2f}")
    for (kind, W), rate in lm.items():
        if kind == "product_gflops":
            gemm = lm[("gemm_gflops", W)]
            write(f"LM normal-equation product at W={W}: {rate:.1f} GFLOP/s (GEMM-equivalent), same-run GEMM "
                  f"{gemm:.1f} GFLOP/s: {rate / gemm:.2f} of GEMM")
