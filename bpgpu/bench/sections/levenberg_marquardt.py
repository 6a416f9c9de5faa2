"""Section ``levenberg_marquardt``: one LM iteration against torch-levenberg-marquardt's
``training_step`` (Cholesky), and training curves (training MSE against wall time) of
bpgpu LM, Adam and L-BFGS, scikit-learn's L-BFGS and torch-LM, CPU float64, every
library on one BLAS / intra-op thread (:mod:`bpgpu.bench.levenberg_marquardt`).
"""

from __future__ import annotations

from pathlib import Path

from .. import levenberg_marquardt as lm
from ..report import duration, md_table, optional
from ..section import Context, Section


def _run(ctx: Context) -> dict:
    plan, peers = ctx.plan, bool(ctx.peers)
    rows, curves = [], {}
    with lm.one_thread():
        for name in plan.lm_iterations:
            rows.append(lm.iteration_times(name, plan.lm_rounds, peers))
            ctx.tick(f"LM iteration {name}")
        for name in plan.lm_curves:
            problem = lm.CURVE_PROBLEMS[name]()
            runs = lm.curves(problem, plan.lm_budget_s, peers)
            curves[name] = {
                "problem": problem.name,
                "sizes": list(problem.sizes),
                "m": problem.X.shape[0],
                "budget_s": plan.lm_budget_s,
                "final_mse": {label: lm.at_time(points, plan.lm_budget_s) for label, points in runs.items()},
                "curves": {label: lm.thinned(points) for label, points in runs.items()},
            }
            ctx.tick(f"LM curves {name}")
    return {"iterations": rows, "curves": curves}


def _iteration_cells(r: dict) -> list[str]:
    return [
        f"{r['problem']} {r['sizes']} m={r['m']} W={r['W']}",
        duration(r["bpgpu_s"]),
        duration(r["torch_lm_s"]) if "torch_lm_s" in r else "-",
        optional(r["torch_lm_over_bpgpu"]),
    ]


def _curve_rows(s: dict) -> list[list[str]]:
    return [
        [c["problem"], label, f"{mse:.3g}", f"{mse / c['final_mse']['bpgpu LM']:.3g}"]
        for c in s["curves"].values()
        for label, mse in c["final_mse"].items()
    ]


def text(s: dict) -> list[str]:
    lines = ["Levenberg–Marquardt: one iteration (time; torch-LM / bpgpu)"]
    lines += ["  " + "  ".join(_iteration_cells(r)) for r in s["iterations"]]
    budgets = {c["budget_s"] for c in s["curves"].values()}
    lines.append(f"  training MSE after {', '.join(f'{b:g}' for b in budgets)} s (and / bpgpu LM's):")
    lines += ["    " + "  ".join(row) for row in _curve_rows(s)]
    return lines


def markdown(s: dict) -> list[str]:
    lines = [
        "## Levenberg–Marquardt",
        "",
        "One iteration from the same parameters and μ (CPU float64, one thread):",
        "",
    ]
    lines += md_table(
        ["problem", "bpgpu", "torch-LM", "torch-LM / bpgpu"], [_iteration_cells(r) for r in s["iterations"]]
    )
    lines += ["", "Training MSE at the end of each run's time budget:", ""]
    lines += md_table(["problem", "optimizer", "MSE", "/ bpgpu LM's"], _curve_rows(s))
    return lines


def plot(s: dict, out: Path) -> list[str]:
    """lm_<problem>.png: training MSE against wall time, one line per optimizer."""
    names = []
    for name, c in s["curves"].items():
        problem = lm.Problem(c["problem"], tuple(c["sizes"]), lm.CURVE_PROBLEMS[name]().X, None)
        lm.plot_curves(problem, c["curves"], out / f"lm_{name}.png")
        names.append(f"lm_{name}.png")
    return names


SECTION = Section(
    "levenberg_marquardt",
    tasks=lambda ctx: len(ctx.plan.lm_iterations) + len(ctx.plan.lm_curves),
    run=_run,
    text=text,
    markdown=markdown,
    plot=plot,
)
