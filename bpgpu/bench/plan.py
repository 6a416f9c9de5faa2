"""How much work one run does: the full, quick and smoke plans.

A section reads what it needs from :class:`Plan`; a new section adds its own
fields here, with defaults, so the other sections' plans need no change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .configs import CONFIGS


@dataclass(frozen=True)
class NetFamily:
    """The gradient-cost nets [n0, h, 1] (``activation`` hidden, identity output, squared
    error), W = h (n0 + 2) + 1: ``grow`` "hidden" reaches each W through h with n0 =
    ``fixed``, "input" through n0 with h = ``fixed``."""

    grow: str = "input"
    fixed: int = 16
    activation: str = "tanh"

    def sizes(self, W_target: float) -> list[int]:
        """[n0, h, 1] with W ≈ W_target."""
        if self.grow == "hidden":
            return [self.fixed, max(1, round((W_target - 1) / (self.fixed + 2))), 1]
        if self.grow == "input":
            return [max(1, round((W_target - 1) / self.fixed) - 2), self.fixed, 1]
        raise ValueError(f"grow must be 'hidden' or 'input', got {self.grow!r}")

    def describe(self) -> str:
        if self.grow == "hidden":
            return f"[{self.fixed}, h, 1], h grown with W = {self.fixed + 2}h + 1; {self.activation} hidden"
        return f"[n, {self.fixed}, 1], n grown with W = {self.fixed}(n + 2) + 1; {self.activation} hidden"


# Idle seconds before each burst of a derivative row: the thread pools of the case before (OpenBLAS's,
# XLA's, PyTorch's) spin for about 0.1 s after their last call, and on 2 cores a two-thread call
# started inside that window ran 20–30% slower (bp.hessian at [32,64,64,4] right after a 1024³ numpy
# GEMM 175 ms against 145 ms 0.1 s later: benchmarks/NOTES.md, "B8").
DERIVATIVE_SETTLE_S = 0.15


@dataclass(frozen=True)
class Plan:
    """How much work one run does.

    Finite differences
    are measured up to W = 10^fd_max_log10_W while ``fd_budget_s`` lasts, each
    point the best of ``fd_rounds`` interleaved rounds. ``gradient_nets``: see :class:`NetFamily`.
    """

    configs: tuple[str, ...]
    dtypes: tuple[str, ...]
    gradient_batch: int
    gradient_log10_W: tuple[float, ...]  # the W grid, as exponents of 10
    fd_budget_s: float  # seconds (of the sweep's clock) for the finite-difference sweeps, all rounds
    min_time_s: float  # seconds of calls behind each timing
    peers: bool
    repeats: int = 5  # interleaved rounds per training-step group
    settle_s: float = 0.05  # idle seconds before each burst of a training-step group (see interleaved_timings)
    mode: str = "custom"
    gradient_nets: NetFamily = NetFamily("input", 16, "tanh")
    fd_max_log10_W: float = 6.0
    fd_rounds: int = 1
    gradient_clock: str = "process_cpu"  # on a GPU backend the wall clock (the CPU only launches)
    sections: tuple[str, ...] = field(default=())  # empty: every section
    # Levenberg–Marquardt: one-iteration problems (vs torch-LM), rounds, training-curve problems, seconds per curve
    lm_iterations: tuple[str, ...] = ("sinc200",)
    lm_rounds: int = 5
    lm_curves: tuple[str, ...] = ("sinc",)
    lm_budget_s: float = 1.5
    # derivatives against JAX and torch.func: the nets of bpgpu.bench.derivatives.NETS timed
    # (quick and smoke: the smallest; its exact Hessian takes milliseconds, W ≈ 6500's minutes here)
    derivative_nets: tuple[str, ...] = ("8-16-1",)
    # idle seconds before each burst of a derivative row (DERIVATIVE_SETTLE_S); quick's one net runs
    # on one thread, where the peers' spinning threads matter less
    derivative_settle_s: float = DERIVATIVE_SETTLE_S


# quick: W = 10^1.9 .. 10^2.6 in tenths of a decade (where finite differences are measured),
# then half decades to 10^4 for backprop alone
QUICK_GRID = tuple(
    float(e) for e in np.round(np.concatenate([np.arange(1.9, 2.61, 0.1), np.arange(3.0, 4.01, 0.5)]), 2)
)
QUICK_NETS = NetFamily("hidden", 1, "softplus")
FULL_NETS = NetFamily("input", 16, "tanh")
FULL_GRID = tuple(float(e) for e in np.round(np.arange(2.0, 6.01, 0.25), 2))


def plan_for(mode: str) -> Plan:
    """full: everything (W up to 10⁶); quick: about 2 minutes on 2 cores; smoke: a few seconds (tests).

    quick's gradient nets are [1, h, 1] with softplus at batch 2048, where a pass
    costs ∝ W (benchmarks/NOTES.md, attempt 5), so finite differences are measured,
    best of 3 rounds, over W ≈ 80 to 400 within the run; full keeps the [n, 16, 1]
    tanh nets up to W = 10⁶, whose passes are proportional to W only above W ≈ 5000.
    """
    if mode == "full":
        return Plan(
            tuple(CONFIGS),
            ("float32", "float64"),
            512,
            FULL_GRID,
            120.0,
            1.0,
            True,
            10,
            mode=mode,
            lm_iterations=("sinc200", "regression8_2000"),
            lm_curves=("sinc", "franke", "friedman1"),
            lm_budget_s=5.0,
            derivative_nets=("8-16-1", "32-64-64-4", "64-128-128-10", "784-256-10"),
        )
    if mode == "quick":
        return Plan(
            ("tiny", "small", "medium"),
            ("float32", "float64"),
            2048,
            QUICK_GRID,
            80.0,
            0.3,
            True,
            7,
            mode=mode,
            gradient_nets=QUICK_NETS,
            fd_max_log10_W=2.6,
            fd_rounds=3,
            derivative_settle_s=0.05,
        )
    if mode == "smoke":
        # finite differences at two points only, so the budget (wall seconds) is never what stops them
        return Plan(
            ("tiny", "small"),
            ("float32",),
            64,
            (2.0, 2.5, 3.0, 3.5),
            5.0,
            0.01,
            False,
            settle_s=0.0,
            mode=mode,
            gradient_nets=QUICK_NETS,
            fd_max_log10_W=2.5,
            fd_rounds=2,
            lm_rounds=1,
            lm_budget_s=0.1,
            derivative_settle_s=0.0,
        )
    raise ValueError(f"mode must be 'full', 'quick' or 'smoke', got {mode!r}")
