"""One training step, every CPU implementation in one run, interleaved (the CPU targets of benchmarks/NOTES.md).

    python benchmarks/compare_step.py [--sizes tiny small medium] [--dtype float32]
                                      [--rounds 40] [--round-seconds 0.04] [--settle 0.2] [--json out.json]

Implementations (same net: relu hidden, identity output, ½‖a − t‖² / m, SGD lr 0.01):

    numpy_reference  the plain preallocated numpy step (bpgpu.bench.numpy_reference_case)
    bpgpu_numpy      bpgpu's numpy path: forward, backward, optimizer.update (bpgpu.bench.bpgpu_numpy_path_case)
    bpgpu_jit        the compiled step, one numba call (bpgpu.bench.bpgpu_jit_case)
    bpgpu_train_step bpgpu.training.train_step as it is wired now (bpgpu.bench.bpgpu_step_case)
    jax_jit          value_and_grad + SGD in one jax.jit, parameters donated
    torch_eager      nn.Linear/ReLU, backward, optim.SGD
    gemm             (m, n_in) @ (n_in, n_out) of the largest layer: the machine's rate in
                     this run, for the GFLOP/s column (step flops: GEMMs only, bpgpu.bench.step_flops)

The machine is shared, so a single timing is noise: every implementation runs a
short burst of steps in each round, the order shuffled per round, and the table
gives the best and the median round (seconds per step) and both ratios to the
plain numpy step measured in the same rounds. Case builders and the timing
(bpgpu.bench.interleaved_timings) come from bpgpu.bench, the code ``bpgpu bench``
and benchmarks/test_train_step.py time, so the peers and the rounds are the same
code in all three places.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from bpgpu import bench
from bpgpu.backend import resolve
from bpgpu.kernels import jit


def cases(sizes, m, dtype, only=None):
    backend = resolve("numpy")
    found = {
        "numpy_reference": bench.numpy_reference_case(sizes, m, dtype),
        "bpgpu_numpy": bench.bpgpu_numpy_path_case(sizes, m, dtype, backend),
        "bpgpu_jit": bench.bpgpu_jit_case(sizes, m, dtype, backend),
        "bpgpu_train_step": bench.bpgpu_step_case(sizes, m, dtype, backend),
    }
    peers = [p for p in bench.available_peers() if only is None or p in only]
    if "jax_jit" in peers:
        found["jax_jit"] = bench.jax_case(sizes, m, dtype)
    if "torch_eager" in peers:
        found["torch_eager"] = bench.torch_case(sizes, m, dtype)
    found = {name: case for name, case in found.items() if case is not None and (only is None or name in only)}
    k, n = bench.largest_layer(sizes)
    found["gemm"] = bench.gemm_case(backend, m, k, n, dtype)
    return found


def summary(stats, sizes, m, base="numpy_reference"):
    """Per implementation: best and median round, both ratios to the plain numpy step, GFLOP/s of the best."""
    best0, median0 = stats[base]["best"], stats[base]["median"]
    k, n = bench.largest_layer(sizes)
    flops = {name: bench.step_flops(sizes, m) for name in stats} | {"gemm": 2 * m * k * n}
    return {
        name: {
            "best_s": s["best"],
            "median_s": s["median"],
            "calls_per_round": s["calls"] // len(s["rounds"]),
            "ratio_best": s["best"] / best0,
            "ratio_median": s["median"] / median0,
            "gflops_best": flops[name] / s["best"] / 1e9,
        }
        for name, s in stats.items()
    }


def table(results):
    header = ["size", "dtype", "implementation", "best µs", "median µs", "ratio best", "ratio median", "GFLOP/s (best)"]
    rows = [
        [
            config,
            dtype,
            name,
            f"{r['best_s'] * 1e6:.1f}",
            f"{r['median_s'] * 1e6:.1f}",
            f"{r['ratio_best']:.2f}",
            f"{r['ratio_median']:.2f}",
            f"{r['gflops_best']:.1f}",
        ]
        for (config, dtype), rows in results.items()
        for name, r in rows.items()
    ]
    return "\n".join(bench.md_table(header, rows, align=["", "", ""] + ["r"] * 5))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"], choices=list(bench.CONFIGS))
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    parser.add_argument("--only", nargs="+", help="implementations to run (default: all; numpy_reference always)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--round-seconds", type=float, default=0.04, help="length of one burst per implementation")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="idle seconds before each burst (other libraries' BLAS threads stop spinning)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not jit.available():
        print("numba is not installed: bpgpu_jit is left out (pip install 'bpgpu[jit]')", file=sys.stderr)
    results = {}
    for config in args.sizes:
        sizes, m = bench.CONFIGS[config]
        rounds = args.rounds if config != "large" else min(args.rounds, 5)
        for dtype in args.dtype:
            print(f"{config} {dtype}: building", file=sys.stderr)
            found = cases(sizes, m, dtype, args.only and {"numpy_reference", *args.only})
            stats = bench.interleaved_timings(
                found, min_time=rounds * args.round_seconds, repeats=rounds, long_call=np.inf, settle=args.settle
            )
            results[(config, dtype)] = summary(stats, sizes, m)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{c} {d}": rows for (c, d), rows in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
