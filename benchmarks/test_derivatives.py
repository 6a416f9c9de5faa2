"""bpgpu's gradient, input Jacobian, HVP and exact Hessian against JAX jit and torch.func (issue 12).

One test per (net, dtype, quantity): the three implementations are checked to agree
(benchmarks/derivative_cases.py), then timed interleaved in rounds
(:func:`bpgpu.bench.interleaved_timings`, so a burst of load on the shared machine hits all
three alike); pytest-benchmark records bpgpu's own time, and ``extra_info`` the peers' times
and the ratios peer / bpgpu (> 1: bpgpu is faster). The ratios are printed at the end.

    python -m pytest benchmarks/test_derivatives.py -k "8-16-1" -s
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="the peers extra (jax, torch) is needed")
pytest.importorskip("torch", reason="the peers extra (jax, torch) is needed")

sys.path.insert(0, str(Path(__file__).parent))
import derivative_cases as dc  # noqa: E402

from bpgpu import bench  # noqa: E402

ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if ROWS:
        print("\n| net | dtype | quantity | bpgpu s | JAX / bpgpu | torch.func / bpgpu |")
        print("|---|---|---|---|---|---|")
        print("\n".join(ROWS))


@pytest.mark.parametrize("quantity", dc.QUANTITIES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(dc.NETS))
def test_derivative(benchmark, name, dtype, quantity):
    if not dc.applies(name, quantity):
        pytest.skip(f"exact Hessian of {name}: W > {dc.HESSIAN_MAX_W} (W² entries)")
    cases = dc.cases(name, dtype, quantity)
    times = bench.interleaved_timings(cases, min_time=1.0)
    best = {impl: t["best"] for impl, t in times.items()}
    benchmark.group = f"{quantity} {name} {dtype}"
    benchmark.extra_info.update({f"{impl}_s": s for impl, s in best.items()})
    benchmark.extra_info.update({f"{impl}_over_bpgpu": best[impl] / best["bpgpu"] for impl in ("jax", "torch")})
    benchmark.pedantic(cases["bpgpu"].fn, rounds=3, iterations=1, warmup_rounds=1)
    ROWS.append(f"| {name} | {dtype} | {quantity} | {best['bpgpu']:.3g} | {best['jax'] / best['bpgpu']:.2f} "
                f"| {best['torch'] / best['bpgpu']:.2f} |")
