"""Training curves: training MSE against wall time for bpgpu LM, bpgpu Adam, bpgpu L-BFGS,
scikit-learn's L-BFGS and torch-levenberg-marquardt, one plot per problem (docs/guide/second_order.rst).

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

from bpgpu.bench import levenberg_marquardt as lm_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/lm-curves"))
    problems = list(lm_cases.CURVE_PROBLEMS)
    parser.add_argument("--problems", nargs="*", default=problems, choices=problems)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with lm_cases.one_thread():
        for name in args.problems:
            problem = lm_cases.CURVE_PROBLEMS[name]()
            runs = lm_cases.curves(problem, args.budget)
            results[name] = {
                "problem": problem.name,
                "sizes": list(problem.sizes),
                "m": problem.X.shape[0],
                "budget_s": args.budget,
                "curves": {label: lm_cases.thinned(points) for label, points in runs.items()},
            }
            lm_cases.plot_curves(problem, runs, args.out / f"{name}.png")
            lm = lm_cases.at_time(runs["bpgpu LM"], args.budget)
            print(f"{problem.name} (m={problem.X.shape[0]}, {list(problem.sizes)}), MSE after {args.budget:g} s:")
            for label, points in runs.items():
                mse = lm_cases.at_time(points, args.budget)
                print(f"  {label:34s} {mse:10.3e}  = {mse / lm:9.3g} x LM's   ({len(points) - 1} points)")
    (args.out / "curves.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
