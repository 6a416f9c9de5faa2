"""What a new process pays for its first fit (issue 12's cold-start target).

Runs, in a fresh Python process each time, ``bp.MLPClassifier(hidden_layer_sizes=(128, 64),
max_iter=100).fit`` on scikit-learn's digits twice, and prints, per run, the wall-clock and
the CPU time (``time.process_time``, which load on a shared machine inflates far less) of

- ``import bpgpu`` (not part of the first call, but what a user pays before it),
- the first call's parts: the estimators' module (``bp.MLPClassifier``, scikit-learn's
  modules), the GPU probe, the numpy backend (the compiled table: with the kernels compiled
  ahead of time, loading the extension; otherwise numba's import and the first dispatch,
  which loads numba's typing and lowering registries, and SciPy's BLAS when scikit-learn
  has not loaded it yet), the first fit,
- the second, warm fit, and the first call minus the warm fit (the target: at most 0.5 s),
- the cyclic collector's work inside the first call (collections of generation 0, 1, 2, and
  their time),

then the median and range over the runs. Loading digits happens before the timed calls.

    python benchmarks/cold_start.py [--runs 5] [--blas-threads 1] [--cold-cache] [--against DIR] [--numba-floor]
                                    [--also-env NAME=VALUE]

``--blas-threads N`` sets OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS in the
child (on a shared 2-core machine under load, two BLAS threads per process make the fits
themselves several times slower and noisier). ``--cold-cache`` gives each child an empty
NUMBA_CACHE_DIR, so its first fit compiles every kernel it needs: a user's first-ever process.
``--against DIR`` runs the same processes in DIR too (another checkout, its numba cache warm),
alternately with this one, and prints its table first: a before/after in one run.
``--also-env NAME=VALUE`` also runs this checkout with that variable set (repeatable), alternately
with the others: e.g. ``--also-env BPGPU_AOT=0`` puts numba's JIT beside the kernels compiled ahead
of time. Each table ends with how many processes imported numba and which kernels ran.
``--numba-floor`` also times, in fresh processes with SciPy and scikit-learn loaded, numba's
own share: ``import numba`` and the first call of a one-line ``@njit(cache=True)`` function
whose cache is warm (what any numba-compiled first call pays, whatever it computes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import gc, json, time, warnings
W, C = time.perf_counter, time.process_time
out, gc_log, start = {}, {"on": False, "s": 0.0, "n": [0, 0, 0]}, {}

def on_gc(phase, info):
    if gc_log["on"]:
        if phase == "start":
            start["c"] = C()
        else:
            gc_log["s"] += C() - start["c"]
            gc_log["n"][info["generation"]] += 1

gc.callbacks.append(on_gc)

def timed(name, fn):
    w, c = W(), C()
    result = fn()
    out[name] = (W() - w, C() - c)
    return result

bp = timed("import_bpgpu", lambda: __import__("bpgpu"))
from sklearn.datasets import load_digits
X, y = load_digits(return_X_y=True)
warnings.simplefilter("ignore")
gc_log["on"] = True
Est = timed("estimators", lambda: bp.MLPClassifier)
from bpgpu import backend
timed("gpu_probe", backend.gpu_status)
timed("numpy_backend", lambda: backend.resolve("auto"))
fit = lambda: Est(hidden_layer_sizes=(128, 64), max_iter=100, random_state=0).fit(X, y)
timed("first_fit", fit)
gc_log["on"] = False
timed("warm_fit", fit)
out["gc"] = (gc_log["n"], gc_log["s"])
import sys
out["numba"] = "numba" in sys.modules
out["kernels"] = backend.resolve("auto").reason.rsplit("; ", 1)[-1]
print(json.dumps(out))
"""

FLOOR = r"""
import json, sys, time
import scipy.linalg, sklearn.datasets
C = time.process_time
c = C()
import numba
imported = C() - c
sys.path.insert(0, sys.argv[1])
import bpgpu_floor
c = C()
bpgpu_floor.f(1.0)
print(json.dumps({"import_numba": imported, "first_call": C() - c}))
"""
FLOOR_MODULE = "from numba import njit\n\n\n@njit(cache=True)\ndef f(x):\n    return x + 1.0\n"

FIRST_CALL = ("estimators", "gpu_probe", "numpy_backend", "first_fit")
COLUMNS = ("import_bpgpu", *FIRST_CALL, "warm_fit", "first_minus_warm")


def _child_env(blas_threads: int | None, cache_dir: str | None, extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ, **(extra or {}))
    if blas_threads is not None:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(blas_threads)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    return env


def run_once(
    blas_threads: int | None = None, cold_cache: bool = False, tree: str | None = None, extra: dict | None = None
) -> dict:
    """One fresh process in ``tree`` (default: the current directory), with the variables ``extra``:
    {phase: (wall s, cpu s)}, first_minus_warm included, gc: ([n0, n1, n2], cpu s), numba: whether
    it imported numba, kernels: the backend's words on its compiled kernels."""
    with tempfile.TemporaryDirectory(prefix="bpgpu-numba-cache-") as cache_dir:
        env = _child_env(blas_threads, cache_dir if cold_cache else None, extra)
        done = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env, cwd=tree or os.getcwd()
        )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["first_minus_warm"] = tuple(sum(row[k][i] for k in FIRST_CALL) - row["warm_fit"][i] for i in (0, 1))
    return row


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def numba_floor(runs: int) -> list[dict]:
    """``import numba`` and a warm-cache first call of a one-line njit function, CPU s, per fresh process."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bpgpu-floor-") as where:
        with open(os.path.join(where, "bpgpu_floor.py"), "w") as module:
            module.write(FLOOR_MODULE)
        for _ in range(runs + 1):  # the first process compiles the function into its cache
            done = subprocess.run(
                [sys.executable, "-c", FLOOR, where], capture_output=True, text=True, check=True, cwd=where
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows[1:]


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def print_table(rows: list[dict]) -> None:
    print("| run | " + " | ".join(COLUMNS) + " | gc in first call: collections gen 0/1/2, cpu s |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for i, r in enumerate(rows, 1):
        cells = " | ".join(f"{r[k][0]:.3f} / {r[k][1]:.3f}" for k in COLUMNS)
        (n0, n1, n2), gc_s = r["gc"]
        print(f"| {i} | {cells} | {n0}/{n1}/{n2}, {gc_s:.3f} |")
    summary = [" / ".join(_median_range([r[k][i] for r in rows]) for i in (0, 1)) for k in COLUMNS]
    gc_summary = _median_range([r["gc"][1] for r in rows])
    print("| median (range) | " + " | ".join(summary) + f" | {gc_summary} |")
    imported = sum(bool(r.get("numba")) for r in rows)
    kernels = sorted({r.get("kernels", "?") for r in rows})
    print(f"numba imported in {imported} of {len(rows)} processes; kernels: {' | '.join(kernels)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blas-threads", type=int, default=None, help="BLAS threads in the child (default: as set)")
    parser.add_argument("--cold-cache", action="store_true", help="an empty numba cache per run (first fit compiles)")
    parser.add_argument("--against", metavar="DIR", help="another checkout, run alternately with this one")
    parser.add_argument("--numba-floor", action="store_true", help="also time numba's own import and first call")
    parser.add_argument(
        "--also-env", action="append", default=[], metavar="NAME=VALUE", help="also run this checkout with NAME=VALUE"
    )
    args = parser.parse_args(argv)
    here = os.getcwd()
    variants = [(args.against, args.against, {})] if args.against else []
    variants.append((here, here, {}))
    for item in args.also_env:
        name, _, value = item.partition("=")
        variants.append((f"{here} with {name}={value}", here, {name: value}))
    print(f"load average before: {_load()}")
    rows: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for _ in range(args.runs):
        for label, tree, extra in variants:
            rows[label].append(run_once(args.blas_threads, args.cold_cache, tree, extra))
    floor = numba_floor(args.runs) if args.numba_floor else []
    print(f"load average after: {_load()}")
    print("wall s / cpu s per phase; the first call is estimators + GPU probe + numpy backend + first fit")
    for label, _, _ in variants:
        print(f"\n{label}:")
        print_table(rows[label])
    if floor:
        print(
            "\nnumba's floor, cpu s, median (range): import numba "
            f"{_median_range([r['import_numba'] for r in floor])}, first call of a cached one-line function "
            f"{_median_range([r['first_call'] for r in floor])}, together "
            f"{_median_range([r['import_numba'] + r['first_call'] for r in floor])}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
