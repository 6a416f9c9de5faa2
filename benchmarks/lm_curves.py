"""Training curves: training MSE against wall time for bpgpu LM, bpgpu Adam, bpgpu L-BFGS,
scikit-learn's L-BFGS and torch-levenberg-marquardt, one plot per problem (issue 13).

    python benchmarks/lm_curves.py --budget 5 --out benchmarks/results/lm-curves

Every run starts from the same Glorot parameters of the problem's net (scikit-learn's
from its own random_state), CPU float64, each library on one BLAS / intra-op thread so
that they share the machine alike. Writes ``<problem>.png`` per problem and
``curves.json`` (every (seconds, MSE) point), and prints each curve's MSE at the end
of the budget and LM's ratio to the others at equal wall time.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

import lm_cases

PROBLEMS = {"sinc": lm_cases.sinc, "franke": lm_cases.franke, "friedman1": lm_cases.friedman1}


def curves(problem: lm_cases.Problem, budget: float) -> dict[str, list[tuple[float, float]]]:
    return {
        "bpgpu LM": lm_cases.bpgpu_run(problem, "lm", budget),
        "bpgpu Adam (full batch, lr 0.01)": lm_cases.bpgpu_run(problem, "adam", budget, learning_rate=0.01),
        "bpgpu L-BFGS": lm_cases.bpgpu_run(problem, "lbfgs", budget, max_fun=10**7),
        "scikit-learn L-BFGS": lm_cases.sklearn_lbfgs_run(problem, budget),
        "torch-LM (Cholesky)": lm_cases.torch_lm_run(problem, budget),
    }


def at_time(points: list[tuple[float, float]], t: float) -> float:
    """The lowest MSE a run had reached by time t (its best so far)."""
    reached = [mse for seconds, mse in points if seconds <= t]
    return min(reached) if reached else points[0][1]


def plot(name: str, problem: lm_cases.Problem, runs: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in runs.items():
        t, mse = np.array(points).T
        ax.plot(np.maximum(t, 1e-4), np.minimum.accumulate(mse), label=label, lw=1.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("training MSE (best so far)")
    ax.set_title(f"{problem.name}: m={problem.X.shape[0]}, net {list(problem.sizes)}, CPU float64")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/lm-curves"))
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with threadpool_limits(1, user_api="blas"):
        for name in args.problems:
            problem = PROBLEMS[name]()
            runs = curves(problem, args.budget)
            results[name] = {"problem": problem.name, "sizes": list(problem.sizes), "m": problem.X.shape[0],
                             "budget_s": args.budget, "curves": runs}
            plot(name, problem, runs, args.out / f"{name}.png")
            lm = at_time(runs["bpgpu LM"], args.budget)
            print(f"{problem.name} (m={problem.X.shape[0]}, {list(problem.sizes)}), MSE after {args.budget:g} s:")
            for label, points in runs.items():
                mse = at_time(points, args.budget)
                print(f"  {label:34s} {mse:10.3e}  = {mse / lm:9.3g} x LM's   ({len(points) - 1} iterations)")
    (args.out / "curves.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
