"""One training step, every CPU implementation in one run, interleaved (the CPU targets of benchmarks/NOTES.md).

    python benchmarks/compare_step.py [--sizes tiny small medium] [--dtype float32]
                                      [--rounds 40] [--round-seconds 0.04] [--settle 0.2] [--json out.json]

Implementations (same net: relu hidden, identity output, ½‖a − t‖² / m, SGD lr 0.01):

    numpy_reference  the plain preallocated numpy step (bpgpu.bench.numpy_reference_case)
    bpgpu_numpy      bpgpu's numpy path: engine.forward, engine.backward, optimizer.update
    bpgpu_jit        the compiled step (bpgpu.kernels.jit.compiled_train_step), one numba call
    bpgpu_train_step bpgpu.training.train_step as it is wired now (bpgpu.bench.bpgpu_step_case)
    jax_jit          value_and_grad + SGD in one jax.jit, parameters donated
    torch_eager      nn.Linear/ReLU, backward, optim.SGD
    gemm             (m, n_in) @ (n_in, n_out) of the largest layer: the machine's rate in
                     this run, for the GFLOP/s column (step flops: GEMMs only, bpgpu.bench.step_flops)

The machine is shared, so a single timing is noise: every implementation runs a
short burst of steps in each round, the order shuffled per round, and the table
gives the best and the median round (seconds per step) and both ratios to the
plain numpy step measured in the same rounds. Case builders come from
bpgpu.bench (the code benchmarks/test_train_step.py times), so the peers are the
same code in both places.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np

from bpgpu import bench, engine, optim
from bpgpu.kernels import jit
from bpgpu.network import MLP


def numpy_path_case(sizes, m, dtype, backend):
    """bpgpu's numpy path, whatever train_step routes to: the three calls of a step."""
    net = MLP(sizes, dtype=dtype, backend=backend, init="he", seed=0, **bench.STEP_NET)
    X, T = net.check_inputs(*bench.batch(backend, sizes, m, dtype))
    opt = optim.SGD(net, learning_rate=bench.LEARNING_RATE)
    ws = net.workspace(m)

    def step():
        engine.forward(net, X, ws, net.params)
        loss = engine.backward(net, X, T, ws, net.params, ws.grad)
        opt.update(ws.grad)
        return loss

    return bench.Case(step, float)


def jit_case(sizes, m, dtype, backend):
    net = MLP(sizes, dtype=dtype, backend=backend, init="he", seed=0, **bench.STEP_NET)
    X, T = net.check_inputs(*bench.batch(backend, sizes, m, dtype))
    step = jit.compiled_train_step(net, optim.SGD(net, learning_rate=bench.LEARNING_RATE))
    if step is None:
        return None
    step(X, T)  # compile (or load numba's cache)
    return bench.Case(lambda: step(X, T), float)


def cases(sizes, m, dtype, only=None):
    backend = bench.resolve("numpy")
    found = {
        "numpy_reference": bench.numpy_reference_case(sizes, m, dtype),
        "bpgpu_numpy": numpy_path_case(sizes, m, dtype, backend),
        "bpgpu_jit": jit_case(sizes, m, dtype, backend),
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


def burst(case, n):
    t0 = time.perf_counter()
    for _ in range(n):
        handle = case.fn()
    case.finish(handle)
    return (time.perf_counter() - t0) / n


def interleaved(found, rounds, round_seconds, settle=0.0, seed=0):
    """Per implementation: seconds per step of every round (bursts of n steps, n calibrated once).

    settle: seconds of sleep before each burst, so the thread pools of the
    implementation before (numpy's and scipy's OpenBLAS, PyTorch's OpenMP, XLA's)
    stop spin-waiting on the 2 cores before the next one is timed.
    """
    calls = {}
    for name, case in found.items():
        case.finish(case.fn())  # warm-up
        once = burst(case, 1)
        calls[name] = max(1, int(round_seconds / max(once, 1e-7)))
        calls[name] = max(1, int(round_seconds / burst(case, calls[name])))  # re-measured over a burst
        print(f"  {name}: {calls[name]} steps per burst", file=sys.stderr, flush=True)
    order, times = list(found), {name: [] for name in found}
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            time.sleep(settle)
            times[name].append(burst(found[name], calls[name]))
    return times, calls


def summary(times, calls, sizes, m, base="numpy_reference"):
    best0, median0 = min(times[base]), float(np.median(times[base]))
    k, n = bench.largest_layer(sizes)
    flops = {name: bench.step_flops(sizes, m) for name in times} | {"gemm": 2 * m * k * n}
    return {
        name: {
            "best_s": min(t), "median_s": float(np.median(t)), "calls_per_round": calls[name],
            "ratio_best": min(t) / best0, "ratio_median": float(np.median(t)) / median0,
            "gflops_best": flops[name] / min(t) / 1e9,
        }
        for name, t in times.items()
    }


def table(results):
    lines = ["| size | dtype | implementation | best µs | median µs | ratio best | ratio median | GFLOP/s (best) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (config, dtype), rows in results.items():
        for name, r in rows.items():
            lines.append(f"| {config} | {dtype} | {name} | {r['best_s'] * 1e6:.1f} | {r['median_s'] * 1e6:.1f} "
                         f"| {r['ratio_best']:.2f} | {r['ratio_median']:.2f} | {r['gflops_best']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"], choices=list(bench.CONFIGS))
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    parser.add_argument("--only", nargs="+", help="implementations to run (default: all; numpy_reference always)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--round-seconds", type=float, default=0.04, help="length of one burst per implementation")
    parser.add_argument("--settle", type=float, default=0.2,
                        help="idle seconds before each burst (other libraries' BLAS threads stop spinning)")
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
            times, calls = interleaved(cases(sizes, m, dtype, args.only and {"numpy_reference", *args.only}), rounds, args.round_seconds, args.settle)
            results[(config, dtype)] = summary(times, calls, sizes, m)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{c} {d}": rows for (c, d), rows in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
