"""bpgpu's gradient, input Jacobian, HVP and exact Hessian against JAX jit and torch.func (issue 12).

One test per (net, dtype, quantity): the three implementations are checked to agree
(bpgpu/bench/derivatives.py, the cases ``bpgpu bench`` times too), then timed interleaved in rounds
(:func:`bpgpu.bench.interleaved_timings`, so a burst of load on the shared machine hits all
three alike); pytest-benchmark records bpgpu's own time, and ``extra_info`` the peers' times
and the ratios peer / bpgpu (> 1: bpgpu is faster). The ratios are printed at the end.

    python -m pytest benchmarks/test_derivatives.py -k "8-16-1" -s
"""

import pytest

from bpgpu.bench import derivatives as dc

pytest.importorskip("jax", reason="the peers extra (jax, torch) is needed")
pytest.importorskip("torch", reason="the peers extra (jax, torch) is needed")

ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if ROWS:
        from bpgpu.bench.machine import cpu_model, load_average

        # the host, so that runs on two machines named alike can be told apart (benchmarks/NOTES.md, "B5")
        load = load_average()
        where = f"; load average {load[0]:.1f} (1 min), {load[1]:.1f} (5 min)" if load else ""
        print(f"\nMachine: {cpu_model()}{where}")
        print("\n| net | dtype | quantity | bpgpu s | JAX / bpgpu | torch.func / bpgpu | Hessian GEMM rate / GEMM |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(ROWS))


@pytest.mark.parametrize("quantity", dc.QUANTITIES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(dc.NETS))
def test_derivative(benchmark, name, dtype, quantity):
    if not dc.applies(name, quantity):
        pytest.skip(f"exact Hessian of {name}: W > {dc.HESSIAN_MAX_W} (W² entries)")
    row = dc.ratios(name, dtype, quantity)
    best = row["seconds"]
    benchmark.group = f"{quantity} {name} {dtype}"
    benchmark.extra_info.update({f"{impl}_s": s for impl, s in best.items()})
    benchmark.extra_info.update({f"{impl}_over_bpgpu": r for impl, r in row["over_bpgpu"].items()})
    benchmark.pedantic(
        dc.bpgpu_fns(*dc.problem(*dc.NETS[name], dtype))[quantity], rounds=3, iterations=1, warmup_rounds=1
    )
    ROWS.append(
        f"| {name} | {dtype} | {quantity} | {best['bpgpu']:.3g} | {best['jax'] / best['bpgpu']:.2f} "
        f"| {best['torch'] / best['bpgpu']:.2f} | {row.get('gemm_fraction', float('nan')):.2f} |"
    )
