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

# what benchmarks/test_gradient_cost.py times: the full plan's gradient nets
GRADIENT_NETS, GRADIENT_WHY = bench.describe_nets(bench.plan_for("full"))

RESULTS: dict = {"gradient": {}, "gemm": {}, "gemm_seconds": {}, "step": {}, "memory": {}, "lm": {}}


def pytest_addoption(parser):
    group = parser.getgroup("bpgpu benchmarks")
    group.addoption(
        "--fd-max-log10-W",
        type=float,
        default=3.5,
        help="largest W (as log10) timed by finite differences (default 3.5; O(W^2) beyond)",
    )
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
    """The derived figures, formatted by the same code as ``bpgpu bench``'s table."""
    from bpgpu.bench.sections import gradient_cost, train_step

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
        section = {
            "backend": backend,
            "dtype": "float64",
            "blas_threads": 1,
            "clock": "wall-clock seconds",
            "net": GRADIENT_NETS,
            "net_reason": GRADIENT_WHY,
            "points": points,
            **bench.fit_gradient_cost(points),
        }
        write("")
        for line in gradient_cost.text(section):
            write(line)
    if RESULTS["step"]:
        rows = []
        for (config, dtype, backend, impl), t in RESULTS["step"].items():
            gemm = RESULTS["gemm"].get((config, dtype, backend))
            rows.append(train_step.step_row(config, dtype, backend, impl, "", t, gemm))
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r["config"], r["dtype"], r["backend"]), []).append(r)
        for (config, dtype, _), group in groups.items():
            train_step.add_ratios(group, RESULTS["step"].get((config, dtype, "numpy", "numpy_reference")))
        memory = [{"config": c, "dtype": d, "backend": b, **mem} for (c, d, b), mem in RESULTS["memory"].items()]
        write("")
        for line in train_step.text({"rows": rows, "memory": memory}):
            write(line)
    lm = RESULTS["lm"]
    for name in sorted({key[0] for key in lm if (key[0], "bpgpu") in lm}):
        ours = lm[(name, "bpgpu")]
        peers = ", ".join(
            f"{impl} {bench.duration(t)} ({t / ours:.2f}x bpgpu's)"
            for (n, impl), t in lm.items()
            if n == name and impl != "bpgpu"
        )
        write(f"\n{name}: bpgpu {bench.duration(ours)}; {peers}")
    for (kind, W), rate in lm.items():
        if kind == "product_gflops":
            gemm = lm[("gemm_gflops", W)]
            write(
                f"LM normal-equation product at W={W}: {rate:.1f} GFLOP/s (GEMM-equivalent), same-run GEMM "
                f"{gemm:.1f} GFLOP/s: {rate / gemm:.2f} of GEMM"
            )
