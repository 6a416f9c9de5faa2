"""Section ``derivatives``: bpgpu's gradient, input Jacobian, HVP and exact Hessian against JAX jit
and torch.func, float64 and float32, each row timed interleaved after the three were
checked to agree (:mod:`bpgpu.bench.derivatives`). Without peers (``--no-peers``) bpgpu alone.
"""

from __future__ import annotations

from .. import derivatives as dc
from ..report import duration, md_table
from ..section import Context, Section


def _peers(ctx: Context) -> tuple[str, ...]:
    """The derivative peers whose libraries the run has (ctx.peers names the step's implementations)."""
    wanted = {"jax_jit": "jax", "torch_eager": "torch"}
    return tuple(wanted[p] for p in ctx.peers if p in wanted)


def _rows(ctx: Context):
    return [
        (name, dtype, q)
        for name in ctx.plan.derivative_nets
        for dtype in ctx.plan.dtypes
        for q in dc.QUANTITIES
        if dc.applies(name, q)
    ]


def _run(ctx: Context) -> dict:
    rows = []
    for name, dtype, quantity in _rows(ctx):
        rows.append(
            dc.ratios(
                name, dtype, quantity, _peers(ctx), min_time=ctx.plan.min_time_s, settle=ctx.plan.derivative_settle_s
            )
        )
        ctx.tick(f"{quantity} {name} {dtype}")
    return {"rows": rows, "settle_s": ctx.plan.derivative_settle_s}


def _cells(r: dict) -> list[str]:
    peer = r["over_bpgpu"]
    return [
        r["net"],
        r["dtype"],
        r["quantity"],
        duration(r["seconds"]["bpgpu"]),
        f"{peer['jax']:.2f}" if "jax" in peer else "-",
        f"{peer['torch']:.2f}" if "torch" in peer else "-",
        f"{r['gemm_fraction']:.2f}" if "gemm_fraction" in r else "-",
    ]


HEADER = ["net", "dtype", "quantity", "bpgpu", "JAX jit / bpgpu", "torch.func / bpgpu", "Hessian GEMM rate / GEMM"]


def text(s: dict) -> list[str]:
    return ["Derivatives (peer time / bpgpu time; > 1: bpgpu faster)"] + [
        "  " + "  ".join(_cells(r)) for r in s["rows"]
    ]


def markdown(s: dict) -> list[str]:
    return [
        "## Derivatives",
        "",
        "Peer time over bpgpu's (> 1: bpgpu faster), interleaved (order shuffled per round, each burst "
        f"after {s.get('settle_s', 0.0):g} s idle), agreement checked:",
        "",
    ] + md_table(HEADER, [_cells(r) for r in s["rows"]])


SECTION = Section("derivatives", tasks=lambda ctx: len(_rows(ctx)), run=_run, text=text, markdown=markdown)
