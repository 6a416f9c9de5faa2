"""What a new process pays for its first fit (issue 12's cold-start target).

Runs, in a fresh Python process each time, ``bp.MLPClassifier(hidden_layer_sizes=(128, 64),
max_iter=100).fit`` on scikit-learn's digits twice: the first fit (imports of CuPy's probe,
numba and its cached kernels included, but not ``import bpgpu`` itself) and the second,
warm one; prints both, their difference, and where the first one's extra time went.

    python benchmarks/cold_start.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, time, warnings
t0 = time.perf_counter()
import bpgpu as bp
from sklearn.datasets import load_digits
X, y = load_digits(return_X_y=True)
t1 = time.perf_counter()
from bpgpu import backend
backend.gpu_status()
t2 = time.perf_counter()
backend.resolve("auto")
t3 = time.perf_counter()
warnings.simplefilter("ignore")
bp.MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=100, random_state=0).fit(X, y)
t4 = time.perf_counter()
bp.MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=100, random_state=0).fit(X, y)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "gpu_probe": t2 - t1, "numba_table": t3 - t2,
                  "first_fit": t4 - t3, "warm_fit": t5 - t4}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        "| run | GPU probe s | numpy backend with the numba table s | first fit (after both) s | warm fit s | "
        "first call − warm s |"
    )
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        first = r["gpu_probe"] + r["numba_table"] + r["first_fit"]
        print(
            f"| {i} | {r['gpu_probe']:.3f} | {r['numba_table']:.3f} | {r['first_fit']:.3f} | "
            f"{r['warm_fit']:.3f} | {first - r['warm_fit']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
