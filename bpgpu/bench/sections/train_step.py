"""Section ``train_step``: one training step (forward + backward + SGD update of w).

Configs tiny [2,2,2,1] b1, small [64,32,10] b32, medium [784,256,256,10] b128 and
large [4096,4096,4096,10] b512 (relu, identity output, squared error), per
backend and dtype, next to a GEMM of the config's largest layer timed in the
same rounds, the plain preallocated numpy step and the installed peers
(PyTorch eager, JAX jit, scikit-learn's MLPRegressor), plus the bytes bpgpu's
step allocates after warm-up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bpgpu.backend import Backend

from ..cases import gemm_case, implementations, step_case
from ..configs import CONFIGS, largest_layer, step_flops
from ..memory import bytes_allocated_per_step
from ..peers import available_peers, peer_device
from ..plan import Plan
from ..report import duration, md_table, optional
from ..section import Context, Section
from ..timing import interleaved_timings


def step_row(
    config: str, dtype: str, backend: str, impl: str, device: str, seconds: float, gemm_gflops: float | None, **extra
) -> dict:
    """One row of results.json's ``train_step.rows``: time, GFLOP/s (GEMM flops) and the
    ratio to the same run's GEMM rate; :func:`add_ratios` adds the ratios to bpgpu."""
    sizes, m = CONFIGS[config]
    k, n = largest_layer(sizes)
    gflops = step_flops(sizes, m) / seconds / 1e9
    return {
        "config": config,
        "layer_sizes": sizes,
        "batch": m,
        "dtype": dtype,
        "backend": backend,
        "impl": impl,
        "device": device,
        "seconds": seconds,
        **extra,
        "gflops": gflops,
        "gemm_shape": [m, k, n],
        "gemm_gflops": gemm_gflops,
        "ratio_to_gemm": gflops / gemm_gflops if gemm_gflops else None,
    }


def add_ratios(group: list[dict], reference: float | None = None) -> list[dict]:
    """ratio_to_bpgpu (time / bpgpu's) and ratio_to_numpy_reference (time / the plain
    numpy step's, ``reference`` or the group's own row) for rows timed together."""
    base = {r["impl"]: r["seconds"] for r in group}
    ref = reference or base.get("numpy_reference")
    for r in group:
        r["ratio_to_bpgpu"] = r["seconds"] / base["bpgpu"] if "bpgpu" in base else None
        r["ratio_to_numpy_reference"] = r["seconds"] / ref if ref else None
    return group


def train_step_rows(backends: list[Backend], plan: Plan, tick: Callable[[str], None] = print) -> dict:
    """Every config x dtype x backend x implementation, with GFLOP/s, the GEMM of the
    config's largest layer timed in the same run, ratios and bytes per step."""
    rows, memory = [], []
    peers = available_peers() if plan.peers else []
    for name in plan.configs:
        sizes, m = CONFIGS[name]
        k, n = largest_layer(sizes)
        for dtype in plan.dtypes:
            for backend in backends:
                cases = {"gemm": gemm_case(backend, m, k, n, dtype)}
                for impl in implementations(backend, peers):
                    tick(f"{name} {dtype} {backend.name} {impl}")
                    case = cases[impl] = step_case(impl, sizes, m, dtype, backend)
                    case.finish(case.fn())  # compile (numba, XLA) or load its cache: not a step to time
                tick(f"{name} {dtype} {backend.name} timing")
                timings = interleaved_timings(cases, plan.min_time_s, repeats=plan.repeats, settle=plan.settle_s)
                gemm_gflops = 2 * m * k * n / timings.pop("gemm")["best"] / 1e9
                group = [
                    step_row(
                        name,
                        dtype,
                        backend.name,
                        impl,
                        backend.device if impl == "bpgpu" else peer_device(backend, impl),
                        t["best"],
                        gemm_gflops,
                        seconds_median=t["median"],
                        calls=t["calls"],
                    )
                    for impl, t in timings.items()
                ]
                memory.append(
                    {
                        "config": name,
                        "dtype": dtype,
                        "backend": backend.name,
                        **bytes_allocated_per_step(cases["bpgpu"], backend),
                    }
                )
                rows.extend(add_ratios(group))
    return {
        "net": "relu hidden, identity output, squared error (mean over the batch), SGD lr=0.01",
        "timing": "best of interleaved rounds (every implementation and the GEMM of a group take turns, in an "
        f"order shuffled per round, each burst after {plan.settle_s:g} s idle) of repeated calls after a warm-up "
        "call; seconds per step",
        "flops": "GEMM flops only: 2 m n_in n_out per product, 2 products for layer 1, 3 for the others",
        "ratio_to_gemm": "step GFLOP/s / GFLOP/s of (m, n_in) @ (n_in, n_out) for the config's largest layer",
        "ratios": "seconds / bpgpu's seconds (>1: slower than bpgpu) and / the plain numpy step's",
        "rows": rows,
        "memory": memory,
    }


# --- reports -------------------------------------------------------------------


def _memory_text(r: dict) -> str:
    if r["method"] == "tracemalloc":
        return f"peak {r['peak']:.0f} B, retained {r['retained']:.0f} B"
    return f"in use {r['retained']:.0f} B, pool growth {r['pool_growth']:.0f} B"


def text(s: dict) -> list[str]:
    lines = [
        "training step (seconds per step; ratio: time / bpgpu's time, and / plain numpy step's):",
        (
            f"  {'config':7s} {'dtype':8s} {'backend':7s} {'impl':16s} {'time':>10s} {'GFLOP/s':>8s} "
            f"{'/GEMM':>6s} {'/bpgpu':>7s} {'/numpy':>7s}"
        ),
    ]
    for r in s["rows"]:
        lines.append(
            f"  {r['config']:7s} {r['dtype']:8s} {r['backend']:7s} {r['impl']:16s} {duration(r['seconds']):>10s} "
            f"{r['gflops']:8.2f} {optional(r['ratio_to_gemm']):>6s} {optional(r['ratio_to_bpgpu']):>7s} "
            f"{optional(r['ratio_to_numpy_reference']):>7s}"
        )
    if s["memory"]:
        lines += ["", "bytes allocated per bpgpu step after warm-up:"]
        lines += [
            f"  {r['config']:7s} {r['dtype']:8s} {r['backend']:7s} {_memory_text(r)} ({r['method']})"
            for r in s["memory"]
        ]
    return lines


def markdown(s: dict) -> list[str]:
    lines = [
        (
            "One training step (forward + backward + SGD update; relu, identity output, squared error). "
            "Time is the best interleaved round; ×bpgpu = time / bpgpu's time; ×numpy = time / the plain "
            "preallocated numpy step's; GEMM = step GFLOP/s / GFLOP/s of the config's largest layer GEMM, same run."
        ),
        "",
    ]
    lines += md_table(
        ["config", "dtype", "backend", "implementation", "time", "GFLOP/s", "of GEMM", "×bpgpu", "×numpy"],
        [
            [
                f"{r['config']} {r['layer_sizes']} b{r['batch']}",
                r["dtype"],
                r["backend"],
                r["impl"],
                duration(r["seconds"]),
                f"{r['gflops']:.2f}",
                optional(r["ratio_to_gemm"]),
                optional(r["ratio_to_bpgpu"]),
                optional(r["ratio_to_numpy_reference"]),
            ]
            for r in s["rows"]
        ],
    )
    lines += ["", "Bytes allocated per bpgpu step after warm-up:", ""]
    lines += md_table(
        ["config", "dtype", "backend", "method", "peak above start", "retained per step", "pool growth per step"],
        [
            [r["config"], r["dtype"], r["backend"], r["method"]]
            + [optional(r[k], ".0f") + ("" if r[k] is None else " B") for k in ("peak", "retained", "pool_growth")]
            for r in s["memory"]
        ],
    )
    return lines


def plot(s: dict, out: Path) -> list[str]:
    """train_step.png: seconds per step per config, one bar per implementation and dtype (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    impls = list(dict.fromkeys((r["impl"], r["backend"]) for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    series = [(impl, backend, dtype) for dtype in dtypes for impl, backend in impls]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(1, len(series))
    for i, (impl, backend, dtype) in enumerate(series):
        xs, ys = [], []
        for j, c in enumerate(configs):
            match = [r for r in rows if (r["impl"], r["backend"], r["dtype"], r["config"]) == (impl, backend, dtype, c)]
            if match:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(match[0]["seconds"])
        # one colour per implementation, float64 hatched
        ax.bar(
            xs,
            ys,
            width=width,
            color=f"C{impls.index((impl, backend)) % 10}",
            edgecolor="black",
            linewidth=0.3,
            hatch="//" if dtype != dtypes[0] else None,
            label=f"{impl} ({backend}, {dtype})",
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{c}\n{CONFIGS[c][0]} b{CONFIGS[c][1]}" for c in configs], fontsize=8)
    ax.set_ylabel("seconds per training step (log)")
    ax.set_title("One training step (forward + backward + SGD update)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "train_step.png", dpi=110)
    plt.close(fig)
    return ["train_step.png"]


def _tasks(ctx: Context) -> int:
    return (
        len(ctx.plan.configs) * len(ctx.plan.dtypes) * sum(1 + len(implementations(b, ctx.peers)) for b in ctx.backends)
    )


def _run(ctx: Context) -> dict:
    return train_step_rows(ctx.backends, ctx.plan, tick=ctx.tick)


SECTION = Section("train_step", tasks=_tasks, run=_run, text=text, markdown=markdown, plot=plot)
