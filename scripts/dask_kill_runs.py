"""Kill a Dask worker (SIGKILL) at a random moment of ``bpgpu.dask.fit``, N times in a row.

A LocalCluster of worker processes on loopback; X (m × 8) and T = [x0·x1 > 0] are built
by dask's random generator and persisted, so Dask can recompute any chunk a dead worker
held. The single-process result: the same ``bd.fit`` in this process (dask's "sync"
scheduler, one BLAS thread as on the workers, the same chunks and sums). Next to it, for scale, the same
optimizer over all rows at once in memory (``--optimizer lbfgs``: scipy's L-BFGS-B on
``net.loss_and_gradient``; ``lm``: ``bpgpu.fit(optimizer="lm")``): other rounding, so a
trajectory that drifts by ~1e-11 over 60 L-BFGS iterations. Then three fits on the cluster with
no fault (the window of moments is 3/4 of the fastest one's wall time, so that the kill
lands inside a fit even when the machine's load drops), and the runs: each refits the
same initial net while a thread sleeps a moment drawn uniformly from that window, from
``--seed``, and SIGKILLs a worker drawn from the same generator (its nanny restarts it).
A run passes when the kill came before the fit ended and the fit completed with its
final loss and parameters equal to the single-process ones to ``--rtol``. The last line is
the time a fit loses to one killed worker (median of the runs' wall times minus the fault-free median).

    PYTHONPATH=$PWD python scripts/dask_kill_runs.py --runs 20 --seed 0 \
        | tee benchmarks/results/<date>-dask-kill-runs/kill_runs.txt
    PYTHONPATH=$PWD python scripts/dask_kill_runs.py --optimizer lm --max-iter 8 --runs 5 --seed 0
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time

import dask
import dask.array as da
import distributed
import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

import bpgpu as bp
import bpgpu.dask as bd

SIZES = [8, 16, 1]


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_net() -> bp.MLP:
    return bp.MLP(
        SIZES, hidden="tanh", output="sigmoid", loss="binary_cross_entropy", dtype="float64", backend="numpy", seed=0
    )


def in_memory(X: np.ndarray, T: np.ndarray, optimizer: str, max_iter: int) -> tuple[float, float]:
    """(final loss, seconds) of the same optimizer on all rows at once, in memory, on one BLAS
    thread as every fit here (on 2 loaded cores, OpenBLAS's threads made LM's 8 iterations 9×
    slower), timed after one untimed iteration (the first call's loading)."""
    net = make_net()
    bp.fit(make_net(), X, T, optimizer=optimizer, epochs=1, progress=False)

    def loss_and_gradient(w):
        net.set_params(w)
        return net.loss_and_gradient(X, T)

    start = time.perf_counter()
    with threadpool_limits(1, user_api="blas"):
        if optimizer == "lm":
            J = bp.fit(net, X, T, optimizer="lm", epochs=max_iter, tol=1e-6, progress=False).loss[-1]
        else:
            options = {"maxiter": max_iter, "gtol": 1e-6}
            J = float(minimize(loss_and_gradient, net.params.copy(), jac=True, method="L-BFGS-B", options=options).fun)
    return J, time.perf_counter() - start


def kill(pid: int, record: list[float]) -> None:
    os.kill(pid, signal.SIGKILL)
    record.append(time.perf_counter())


def timed_fit(Xd, Td, optimizer: str, max_iter: int) -> tuple[float, bp.MLP, float]:
    net = make_net()
    start = time.perf_counter()
    # one BLAS thread on the driver as on the workers (dask's nannies set it), in the single-process
    # fit and on the cluster alike: LM's Cholesky on the driver then rounds the same in both
    with threadpool_limits(1, user_api="blas"):
        history = bd.fit(net, Xd, Td, optimizer=optimizer, max_iter=max_iter)
    return time.perf_counter() - start, net, history.loss[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--optimizer", choices=("lbfgs", "lm"), default="lbfgs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--chunk", type=int, default=7_500)
    parser.add_argument("--max-iter", type=int, default=60)
    parser.add_argument("--rtol", type=float, default=1e-12)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    with (
        # a LocalCluster closes the nanny of a worker not back within lost-worker-timeout (15 s),
        # which a loaded machine can exceed; then the cluster would shrink run after run
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}),
        distributed.LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        Xd = da.random.default_rng(args.seed).standard_normal((args.rows, SIZES[0]), chunks=(args.chunk, -1))
        Td = (Xd[:, :1] * Xd[:, 1:2] > 0).astype("float64")
        Xd, Td = client.persist([Xd, Td])
        distributed.wait([Xd, Td])
        X, T = client.compute([Xd, Td], sync=True)
        J_memory, memory_s = in_memory(X, T, args.optimizer, args.max_iter)
        with dask.config.set(scheduler="sync"):
            one_s, one, J_one = timed_fit(
                da.from_array(X, chunks=Xd.chunks), da.from_array(T, chunks=Td.chunks), args.optimizer, args.max_iter
            )
        clean = [timed_fit(Xd, Td, args.optimizer, args.max_iter) for _ in range(3)]
        clean_s = statistics.median(c[0] for c in clean)
        window = 0.75 * min(c[0] for c in clean)  # so that a kill lands inside a fit that runs fast
        print(
            f"# bpgpu from {bp.__file__}; {args.workers} worker processes x 1 thread, X {args.rows} x {SIZES[0]} "
            f"in chunks of {args.chunk}, MLP {SIZES} binary cross-entropy float64, "
            f"fit(optimizer={args.optimizer!r}, max_iter={args.max_iter}), seed {args.seed}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"# single-process fit (sync scheduler) {one_s:.2f} s, loss {J_one!r}; "
            f"{'scipy on net.loss_and_gradient' if args.optimizer == 'lbfgs' else 'bpgpu.fit in memory'}: "
            f"{memory_s:.2f} s, loss {J_memory!r} (relative difference {abs(J_memory - J_one) / J_one:.1e})"
        )
        print(
            "# fault-free cluster fits: "
            + ", ".join(
                f"{s_:.2f} s (loss diff {abs(J - J_one) / J_one:.1e}, params diff {relative(n.params, one.params):.1e})"
                for s_, n, J in clean
            )
        )
        print(
            "run  moment_s  killed_worker                during_fit  elapsed_s  lost_s  loss_rel_diff  "
            "params_rel_diff  ok"
        )
        passed, lost, inside = 0, [], 0
        for run in range(args.runs):
            client.wait_for_workers(args.workers, timeout=300)
            moment = float(rng.uniform(0, window))
            pids = client.run(os.getpid)
            victim = sorted(pids)[int(rng.integers(len(pids)))]
            killed_at = []
            killer = threading.Timer(moment, kill, (pids[victim], killed_at))
            start = time.perf_counter()
            killer.start()
            try:
                elapsed, net, J = timed_fit(Xd, Td, args.optimizer, args.max_iter)
                failure = ""
            except Exception as exc:  # noqa: BLE001 (recorded, not hidden: the run fails)
                elapsed, net, J, failure = float("nan"), None, float("nan"), f"{type(exc).__name__}: {exc}"
            killer.join()
            during = killed_at[0] - start < elapsed
            deadline = time.monotonic() + 120  # the scheduler drops the dead worker before the next run
            while victim in client.scheduler_info()["workers"] and time.monotonic() < deadline:
                time.sleep(0.1)
            loss_diff = abs(J - J_one) / J_one
            params_diff = relative(net.params, one.params) if net is not None else float("nan")
            ok = during and not failure and loss_diff <= args.rtol and params_diff <= args.rtol
            inside += during
            passed += ok
            if during:
                lost.append(elapsed - clean_s)
            print(
                f"{run:3d}  {moment:8.3f}  {victim:27s}  {'yes' if during else 'no':10s}  {elapsed:9.2f}  "
                f"{elapsed - clean_s:6.2f}  "
                f"{loss_diff:13.1e}  {params_diff:15.1e}  {'yes' if ok else 'NO ' + failure}",
                flush=True,
            )
        print(
            f"# {passed} of {args.runs} consecutive runs had the worker killed during the fit and completed with "
            f"parity (loss and params to {args.rtol:g}); kills inside the fit: {inside}"
        )
        print(
            f"# time a fit loses to one killed worker: median {statistics.median(lost):.2f} s, "
            f"max {max(lost):.2f} s (fault-free fit, median of 3: {clean_s:.2f} s; load average now "
            f"{os.getloadavg()[0]:.2f})"
        )
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
