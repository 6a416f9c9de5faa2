"""Timing harness: cases timed in interleaved rounds, best round kept.

Every figure ``bpgpu bench``, ``benchmarks/compare_step.py`` and the
pytest-benchmark summaries print comes from :func:`interleaved_timings`, so a
change to how things are timed happens here once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# clocks a sweep can be timed with: wall time, or the CPU seconds of this process
# (all its threads), which do not count the time spent waiting for a core that
# other processes hold
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process_cpu": time.process_time}


@dataclass
class Case:
    """A callable under test: ``fn()`` does one unit of work and returns a handle
    that ``finish(handle)`` waits on (a device scalar for the GPU), so timings
    include the work and not only its launch."""

    fn: Callable[[], Any]
    finish: Callable[[Any], Any] = lambda handle: handle


def sync_scalar(handle: Any) -> float:
    """Wait for a device computation by reading one scalar it produced."""
    return float(handle)


def burst(case: Case, n: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of n back-to-back calls, waiting for the last one's result."""
    t0 = clock()
    for _ in range(n):
        handle = case.fn()
    case.finish(handle)
    return (clock() - t0) / n


def seconds_per_call(
    case: Case, min_time: float = 0.2, repeats: int = 5, long_call: float = 1.0, clock: str = "wall"
) -> dict:
    """Time one case: see :func:`interleaved_timings`."""
    return interleaved_timings({"case": case}, min_time, repeats, long_call, clock=clock)["case"]


def interleaved_timings(
    cases: dict[str, Case],
    min_time: float = 0.2,
    repeats: int = 5,
    long_call: float = 1.0,
    settle: float = 0.0,
    seed: int = 0,
    clock: str = "wall",
) -> dict[str, dict]:
    """Time several cases in interleaved rounds, so they share the machine's state.

    Each case gets a warm-up call and a calibration call, then ``repeats`` rounds; in
    every round each case runs n calls (n chosen from the calibration call so its
    round lasts about min_time / repeats) before the next case runs. On a shared
    machine a burst of load then hits all cases alike and the ratios between them
    stay meaningful. Returns, per case, the best and median round in seconds per
    call, the number of calls and every round's time (``rounds``). A call longer
    than ``long_call`` is timed once (finite differences at large W), with no
    warm-up spent on it.

    The order of the cases is shuffled in every round (``seed``) and each burst
    starts after ``settle`` idle seconds: thread pools (OpenBLAS, PyTorch's OpenMP,
    XLA's) spin for a while after their last call, and on 2 cores that spinning
    would slow whichever case always came next (benchmarks/NOTES.md, N2).
    ``clock``: a key of :data:`CLOCKS`.
    """
    tick = CLOCKS[clock]
    calls, stats = {}, {}
    for name, case in cases.items():
        first = burst(case, 1, tick)
        if first >= long_call:
            stats[name] = {"best": first, "median": first, "calls": 1, "rounds": [first]}
            continue
        # calibrate on a second call: the first may have compiled (numba, XLA, NVRTC)
        calls[name] = max(1, int(min_time / repeats / max(burst(case, 1, tick), 1e-7)))
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    order, shuffle = list(calls), random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            time.sleep(settle)
            rounds[name].append(burst(cases[name], calls[name], tick))
    for name, times in rounds.items():
        stats[name] = {
            "best": min(times),
            "median": float(np.median(times)),
            "calls": calls[name] * repeats,
            "rounds": times,
        }
    return {name: stats[name] for name in cases}
