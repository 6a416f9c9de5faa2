"""Section ``gradient_cost``: the gradient's cost versus the number of parameters W.

Backpropagation costs one forward and one backward pass, O(m W) for a batch of
m; finite differences cost W (forward) or 2W (central) loss evaluations, each a
forward pass, so O(m W²) (docs/guide/finite_differences.rst). The nets are [n0, h, 1] (identity
output, squared error, float64) with W = h (n0 + 2) + 1, one width fixed and the
other grown with W (:class:`bpgpu.bench.plan.NetFamily`):

- quick and smoke grow h with n0 = 1 and softplus hidden: every part of a pass
  (the products z(1) = Θ(1) a(0), z(2) = Θ(2) a(1), the bias and softplus, the
  deltas) costs ∝ m·h ∝ W; softplus costs ~17 ns an element (tanh ~3 ns), so at
  batch 2048 a pass costs ≥ 40× its fixed per-call cost (~15 µs; ~25 µs for
  backprop) from W ≈ 80 (h ≈ 25, where the per-row overheads of the bias add and
  the column sums are down to a few per cent), its (m, h) arrays stay within the
  2 MB L2 cache up to W ≈ 400 (h ≈ 130), and finite differences over that range
  take seconds;
- full grows n0 with h = 16 (tanh) up to W = 10⁶: both products and the reads of X grow
  like W, the 16-unit layer's elementwise work does not, so a pass is
  proportional to W only above W ≈ 5000 (benchmarks/NOTES.md, attempts 1 and 5).

The host BLAS runs on one thread and, on the CPU, the clock is the process's CPU
time: the slopes are about the algorithms, not about threading or the other
processes on a shared machine. Exponents are fitted where a pass costs at least
8× its fixed cost (:mod:`bpgpu.bench.fits`), over the W range where all three
methods were measured.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bpgpu import engine
from bpgpu.backend import Backend
from bpgpu.kernels import jit
from bpgpu.network import MLP

from ..cases import batch
from ..fits import METHODS, OVERHEAD_FACTOR, PASSES, fit_gradient_cost
from ..machine import load_average
from ..plan import FULL_NETS, NetFamily, Plan
from ..report import duration, load_text, md_table, optional
from ..section import Context, Section
from ..timing import CLOCKS, Case, interleaved_timings, seconds_per_call, sync_scalar

NET = {"output": "identity", "loss": "squared_error"}
DIFFERENCES = {"central_difference": "central", "forward_difference": "forward"}


def gradient_net(W_target: float, m: int, dtype: str, backend: Backend, nets: NetFamily = FULL_NETS):
    """A net of the family with W ≈ W_target, and a batch of m on the backend."""
    net = MLP(nets.sizes(W_target), dtype=dtype, backend=backend, seed=0, hidden=nets.activation, **NET)
    X, T = net.check_inputs(*batch(backend, net.sizes, m, dtype))
    return net, X, T


def plan_net(plan: Plan, W_target: float, backend: Backend, dtype: str = "float64", m: int | None = None):
    """:func:`gradient_net` for the plan's family (batch ``m``, default the plan's)."""
    return gradient_net(W_target, plan.gradient_batch if m is None else m, dtype, backend, plan.gradient_nets)


def describe_nets(plan: Plan) -> tuple[str, str]:
    """(what the plan's nets are, why those nets), for the reports."""
    nets = plan.gradient_nets
    what = f"{nets.describe()}, identity output, squared error; batch {plan.gradient_batch}"
    if nets.grow == "hidden":
        inputs = "one input" if nets.fixed == 1 else f"{nets.fixed} inputs"
        why = (
            f"with {inputs} every part of a pass (both products, the bias and {nets.activation}, "
            f"the deltas) costs ∝ m·h ∝ W; {nets.activation}'s cost per element and the batch of "
            f"{plan.gradient_batch} make a pass many times its fixed per-call cost from small W on, with "
            "arrays small enough to stay in cache, so finite differences (W or 2W passes) are measured "
            "over the same W range as backprop within the run"
        )
    else:
        why = (
            f"W grows through the input width: both products and the reads of X grow like W; the "
            f"{nets.fixed}-unit layer's elementwise work and the per-call cost do not, so a pass is "
            "proportional to W only at larger W (from about 5000)"
        )
    return what, why


def backprop_case(net: MLP, X, T) -> Case:
    """One forward and one backward pass into the net's workspace (no copy, no checks)."""
    ws = net.workspace(X.shape[0])

    def gradient():
        engine.forward(net, X, ws, net.params)
        return engine.backward(net, X, T, ws, net.params, ws.grad)

    return Case(gradient, sync_scalar)


def loss_case(net: MLP, X, T) -> Case:
    """One loss evaluation (a forward pass): the unit finite differences repeat."""
    ws = net.workspace(X.shape[0])
    return Case(lambda: engine.loss(net, X, T, ws, net.params), sync_scalar)


def finite_difference_case(net: MLP, X, T, method: str) -> Case:
    """The library's finite-difference gradient (bpgpu.numerical_gradient)."""
    from bpgpu.derivatives import numerical_gradient

    kind = DIFFERENCES[method]
    return Case(lambda: numerical_gradient(net, X, T, method=kind), lambda g: float(g[0]))


def method_cases(net: MLP, X, T) -> dict[str, Case]:
    return {"backprop": backprop_case(net, X, T), **{m: finite_difference_case(net, X, T, m) for m in DIFFERENCES}}


def gradient_cost(backend: Backend, plan: Plan, dtype: str = "float64", tick: Callable[[str], None] = print) -> dict:
    """Time backprop on the whole W grid and finite differences up to the plan's
    limit while the budget lasts; fit the exponents.

    The host BLAS runs on one thread here: OpenBLAS switches to threads above a
    size threshold (a kink in the curve), and threads on a shared machine turn
    small GEMMs erratic.
    """
    with jit.blas_limit(1) as threads:
        blas = threads if threads is not None else "default (threadpoolctl missing)"
        return {**_gradient_cost(backend, plan, dtype, tick), "blas_threads": blas}


def _floors(plan: Plan, backend: Backend, dtype: str, clock: str) -> dict[str, float]:
    """Each method's fixed cost per pass: timed on the grid's smallest net with a batch of one."""
    net, X, T = plan_net(plan, 10 ** plan.gradient_log10_W[0], backend, dtype, m=1)
    W = net.n_params
    return {
        m: seconds_per_call(case, max(plan.min_time_s, 0.02), clock=clock)["best"] / PASSES[m](W)
        for m, case in method_cases(net, X, T).items()
    }


def _gradient_cost(backend: Backend, plan: Plan, dtype: str, tick: Callable[[str], None]) -> dict:
    clock = plan.gradient_clock if backend.device == "cpu" else "wall"
    # One pass before any clock runs: the compiled kernels' first call for a dtype compiles them
    # when numba's on-disk cache is cold, which the timing would otherwise take for a long call.
    warm = plan_net(plan, 10 ** plan.gradient_log10_W[0], backend, dtype)
    backprop_case(*warm).fn()
    loss_case(*warm).fn()
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), load_average()
    floors = _floors(plan, backend, dtype, clock)
    points, nets = [], {}
    read_clock = CLOCKS[clock]
    spent = dict.fromkeys(DIFFERENCES, 0.0)  # clock seconds spent per method (the budget's unit)
    cost: dict[tuple[int, str], float] = {}  # clock seconds of one timing, per (W, method)
    stopped = dict.fromkeys(DIFFERENCES, False)

    def time_passes(W: int) -> dict[str, float]:
        net, X, T = nets[W]
        passes = {"backprop": backprop_case(net, X, T), "loss_pass": loss_case(net, X, T)}
        return {k: t["best"] for k, t in interleaved_timings(passes, plan.min_time_s, clock=clock).items()}

    def time_difference(W: int, method: str) -> float:
        net, X, T = nets[W]
        t0 = read_clock()
        # one call per round when there are rounds, so every W is the best of as many single
        # calls (bursts of the short calls would give small W more chances at a quiet moment);
        # in one round a call of 0.1 s or more is timed once, so the time spent stays the budget's
        long_call = 0.0 if plan.fd_rounds > 1 else 0.1
        best = seconds_per_call(
            finite_difference_case(net, X, T, method), plan.min_time_s, long_call=long_call, clock=clock
        )["best"]
        cost[W, method] = read_clock() - t0
        spent[method] += cost[W, method]
        return best

    for e in plan.gradient_log10_W:
        net, X, T = plan_net(plan, 10**e, backend, dtype)
        W = net.n_params
        tick(f"gradient W={W}")
        nets[W] = (net, X, T)
        point = {"W": W, "n": net.sizes[0], "sizes": list(net.sizes), **time_passes(W)}
        if e > plan.fd_max_log10_W + 1e-9:
            del nets[W]  # timed once: only the finite-difference range is re-timed in further rounds
        for method in DIFFERENCES if W in nets else ():
            if stopped[method]:
                continue
            prev = [p["W"] for p in points if (p["W"], method) in cost]
            # predict this point from the last one (cost ∝ W²) and stop before the budget is blown
            guess = cost[prev[-1], method] * (W / prev[-1]) ** 2 if prev else 0.0
            if spent[method] + guess * plan.fd_rounds > plan.fd_budget_s / 2:
                stopped[method] = True
                continue
            point[method] = time_difference(W, method)
        points.append(point)
    # further rounds over the finite-difference range, in shuffled order (a change of the
    # machine's load then hits no W systematically); each time keeps its best round
    by_W = {p["W"]: p for p in points}
    jobs = [(W, "passes") for W in nets] + list(cost)
    shuffle = random.Random(0).shuffle
    for _ in range(plan.fd_rounds - 1):
        shuffle(jobs)
        for W, job in jobs:
            if job == "passes":
                by_W[W].update({k: min(by_W[W][k], t) for k, t in time_passes(W).items()})
            elif spent[job] + cost[W, job] <= plan.fd_budget_s / 2:
                by_W[W][job] = min(by_W[W][job], time_difference(W, job))
    nets.clear()
    what, why = describe_nets(plan)
    return {
        "backend": backend.name,
        "dtype": dtype,
        "batch": plan.gradient_batch,
        "net": what,
        "net_reason": why,
        "clock": {
            "process_cpu": "CPU seconds of this process (time.process_time)",
            "wall": "wall-clock seconds (time.perf_counter)",
        }[clock],
        "finite_differences": "bpgpu.numerical_gradient(net, X, T, method='central'|'forward')",
        "rounds": f"finite differences, and backprop and the loss pass over their W range: best of "
        f"{plan.fd_rounds} rounds, rounds after the first in shuffled order",
        "extrapolation": "finite differences beyond the budget: loss evaluations x one timed loss evaluation, "
        "scaled to the last measured point (estimates, not measurements)",
        "fit_rule": f"log-log least squares over points whose time per pass is >= {OVERHEAD_FACTOR:g}x the "
        "method's fixed cost per pass ('floors': the smallest net at batch 1); 'exponents', 'r2' and "
        "'fit_range' use the W range where all three methods were measured",
        "floors": floors,
        "points": points,
        "load_average": {"before": load_before, "after": load_average()},
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        **fit_gradient_cost(points, floors),
    }


# --- reports -------------------------------------------------------------------


def _range_kind(g: dict) -> str:
    return (
        f", measured for all three methods ({g['common_fit_points']} points)"
        if g["fit_range_is_common"]
        else " (no range where all three were measured: each method over its own)"
    )


def _cells(g: dict, p: dict, marker: Callable[[str], str]) -> list[str]:
    """One table row: measured times, or the extrapolated estimate marked, or '-'."""
    estimates = {q["W"]: q for q in g["extrapolated"]}
    cells = [duration(p["backprop"])]
    for method in METHODS[1:]:
        est = estimates.get(p["W"], {}).get(method)
        cells.append(duration(p[method]) if p.get(method) is not None else marker(duration(est)) if est else "-")
    return cells


def _took(g: dict) -> list[str]:
    if "cpu_seconds" not in g:
        return []
    return [f"  took {g['seconds']:.0f} s ({g['cpu_seconds']:.0f} s of this process's CPU time)"]


def text(g: dict) -> list[str]:
    r2 = g.get("r2") or {}
    lines = [
        (
            f"gradient cost vs W ({g['backend']}, {g['dtype']}, {g.get('clock', 'seconds')}, "
            f"BLAS threads: {g['blas_threads']}; {load_text(g.get('load_average'))})"
        ),
        f"  nets {g['net']}",
        f"  why: {g.get('net_reason', '')}",
        *_took(g),
        f"fitted exponents k of t ~ W^k over W in [{g['fit_range'][0]}, {g['fit_range'][1]}]{_range_kind(g)}:",
    ]
    for method in METHODS:
        k, own = g["exponents"][method], g["fits"][method]
        line = f"  {method:20s} " + (f"W^{k:.2f}" if k is not None else "(not measured)")
        if method in r2:
            line += f" (R² {r2[method]:.3f})"
        if own:
            line += (
                f"   own range {own['fit_range'][0]}-{own['fit_range'][1]}: W^{own['exponent']:.2f}"
                f" (R² {own.get('r2', float('nan')):.3f})"
            )
        lines.append(line)
    lines += ["", f"  {'W':>8s} {'backprop':>10s} {'central':>10s} {'forward':>10s}   (~: extrapolated, not measured)"]
    for p in g["points"]:
        lines.append(f"  {p['W']:8d} " + " ".join(f"{c:>10s}" for c in _cells(g, p, lambda s: "~" + s)))
    return lines


def markdown(g: dict) -> list[str]:
    r2 = g.get("r2") or {}
    lines = [
        (
            f"Gradient cost vs W ({g['backend']}, {g['dtype']}, {g.get('clock', 'seconds')}, BLAS threads: "
            f"{g['blas_threads']}; {load_text(g.get('load_average'))}). Nets {g['net']}: "
            f"{g.get('net_reason', '')}. Fitted exponent k of t ∝ W^k over W ∈ "
            f"[{g['fit_range'][0]}, {g['fit_range'][1]}]{_range_kind(g)}:"
        ),
        "",
    ]
    rows = []
    for method in METHODS:
        k, own = g["exponents"][method], g["fits"][method]
        rows.append(
            [method.replace("_", " "), optional(k), optional(r2.get(method), ".3f")]
            + ([f"{own['fit_range'][0]}–{own['fit_range'][1]}", f"{own['exponent']:.2f}"] if own else ["-", "-"])
        )
    lines += md_table(["method", "exponent (common range)", "R²", "own fit range", "exponent (own range)"], rows)
    lines += [""] + md_table(
        ["W", "backprop", "central difference", "forward difference"],
        [[str(p["W"])] + _cells(g, p, lambda s: f"~{s} (extrapolated)") for p in g["points"]],
    )
    return lines


def plot(g: dict, out: Path) -> list[str]:
    """gradient_cost.png: log-log, fitted slopes shaded over their ranges, extrapolation dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"backprop": ("C0", "o"), "central_difference": ("C1", "s"), "forward_difference": ("C2", "^")}
    for method, (color, marker) in styles.items():
        pts = [(p["W"], p[method]) for p in g["points"] if p.get(method) is not None]
        if not pts:
            continue
        fit = g["fits"][method]
        k = fit["exponent"] if fit else float("nan")
        where = f" over W in [{fit['fit_range'][0]:.0e}, {fit['fit_range'][1]:.0e}]" if fit else ""
        ax.loglog(*zip(*pts), marker=marker, color=color, label=f"{method.replace('_', ' ')}: slope {k:.2f}{where}")
        if fit:
            Ws = np.array(fit["fit_range"], dtype=float)
            ax.loglog(Ws, fit["prefactor"] * Ws ** fit["exponent"], color=color, lw=6, alpha=0.25)
        ext = [(p["W"], p[method]) for p in g["extrapolated"] if method in p]
        if ext:
            ax.loglog(
                [pts[-1][0]] + [w for w, _ in ext],
                [pts[-1][1]] + [t for _, t in ext],
                ls="--",
                color=color,
                label=f"{method.replace('_', ' ')} (extrapolated)",
            )
    ax.set_xlabel("W (number of parameters)")
    ax.set_ylabel("seconds per gradient")
    ax.set_title(f"Gradient cost, {g['backend']} {g['dtype']}, batch {g['batch']} (shaded: fit ranges)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gradient_cost.png", dpi=110)
    plt.close(fig)
    return ["gradient_cost.png"]


def _run(ctx: Context) -> dict:
    return gradient_cost(ctx.backend, ctx.plan, tick=ctx.tick)


SECTION = Section(
    "gradient_cost", tasks=lambda ctx: len(ctx.plan.gradient_log10_W), run=_run, text=text, markdown=markdown, plot=plot
)
