"""Levenberg–Marquardt benchmark cases: the problems, bpgpu's LM iteration, the same
iteration in torch-levenberg-marquardt, and training runs recorded as (seconds, MSE).

Shared by the ``levenberg_marquardt`` section of ``bpgpu bench``,
benchmarks/test_levenberg_marquardt.py (pytest-benchmark: one iteration against
torch-LM, the normal-equation product against GEMM) and benchmarks/lm_curves.py
(training curves, one plot per problem). Heavy peers (torch, scikit-learn) are
imported inside the functions that use them.

Every net: tanh hidden layers, identity output, squared error, float64, CPU, Glorot
initial parameters from one seed shared by every optimizer of a problem.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bpgpu as bp
from bpgpu.levenberg_marquardt import LevenbergMarquardt


@contextlib.contextmanager
def one_thread():
    """One BLAS thread (numpy's and scipy's) and, where torch is installed (the peers are
    optional: ``pip install -e ".[bench]"`` has none), one torch intra-op thread, so that every
    library shares a loaded machine alike; restored afterwards."""
    from bpgpu.kernels import jit

    torch = importlib.import_module("torch") if installed("torch") else None
    threads = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with jit.blas_limit(1):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Problem:
    name: str
    sizes: tuple[int, ...]
    X: np.ndarray
    T: np.ndarray


def sinc(m: int = 200) -> Problem:
    """sinc(10x) = sin(10πx)/(10πx) on m points of [−1, 1], net [1, 20, 20, 1] (W = 481)."""
    x = np.linspace(-1.0, 1.0, m)[:, None]
    return Problem("sinc(10x)", (1, 20, 20, 1), x, np.sinc(10.0 * x))


def regression8(m: int = 2000, hidden: int = 64) -> Problem:
    """y = sin(x·a) + 0.5 cos(x·b) of 8 standard normal inputs, net [8, h, h, 1] (h = 64: W = 4,801)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((m, 8))
    a, b = rng.standard_normal(8) / np.sqrt(8), rng.standard_normal(8) / np.sqrt(8)
    return Problem(
        f"8-input regression (m={m})", (8, hidden, hidden, 1), X, (np.sin(X @ a) + 0.5 * np.cos(2 * X @ b))[:, None]
    )


def franke(m: int = 400) -> Problem:
    """Franke's 2-D test function on m uniform points of [0, 1]², net [2, 20, 20, 1] (W = 501)."""
    rng = np.random.default_rng(1)
    x, y = rng.uniform(size=(2, m))
    f = (
        0.75 * np.exp(-((9 * x - 2) ** 2 + (9 * y - 2) ** 2) / 4)
        + 0.75 * np.exp(-((9 * x + 1) ** 2) / 49 - (9 * y + 1) / 10)
        + 0.5 * np.exp(-((9 * x - 7) ** 2 + (9 * y - 3) ** 2) / 4)
        - 0.2 * np.exp(-((9 * x - 4) ** 2) - (9 * y - 7) ** 2)
    )
    return Problem("Franke 2-D", (2, 20, 20, 1), np.stack([x, y], axis=1), f[:, None])


def friedman1(m: int = 500) -> Problem:
    """scikit-learn's make_friedman1 (10 inputs, 5 informative, noise 0), net [10, 20, 1] (W = 241)."""
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(n_samples=m, noise=0.0, random_state=0)
    return Problem("Friedman #1", (10, 20, 1), X, (y[:, None] - y.mean()) / y.std())


def bpgpu_net(problem: Problem, seed: int = 0) -> bp.MLP:
    return bp.MLP(
        problem.sizes,
        hidden="tanh",
        output="identity",
        loss="squared_error",
        dtype="float64",
        backend="numpy",
        init="glorot",
        seed=seed,
    )


# --- one LM iteration, from the same point each call ----------------------------------


class BpgpuIteration:
    """bpgpu's LM iteration (R by backprop, normal equations, Cholesky, trial forward passes),
    restarted from the same parameters and μ at every call."""

    def __init__(self, problem: Problem, mu_t: float = 1e-3):
        self.net = bpgpu_net(problem)
        self.w0 = np.array(self.net.params, copy=True)
        # torch-LM damps JᵀJ / m with μ_t, bpgpu the unnormalised JᵀJ: μ = m μ_t is the same step
        self.mu = problem.X.shape[0] * mu_t
        self.solver = LevenbergMarquardt(self.net, problem.X, problem.T, mu=self.mu)

    def __call__(self):
        self.net.params[...] = self.w0
        self.solver.reset(self.mu)
        return self.solver.step()


class TorchLMIteration:
    """torch-levenberg-marquardt's ``LevenbergMarquardtModule.training_step`` (solve_method="cholesky",
    its default vmap Jacobian), on the same net and parameters, restarted likewise."""

    def __init__(self, problem: Problem, mu_t: float = 1e-3):
        import torch
        from torch_levenberg_marquardt.damping import StandardDampingStrategy
        from torch_levenberg_marquardt.training import LevenbergMarquardtModule

        net = bpgpu_net(problem)
        layers = []
        for l in range(1, net.n_layers + 1):
            theta = np.asarray(net.theta(l))
            linear = torch.nn.Linear(theta.shape[1] - 1, theta.shape[0], dtype=torch.float64)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(theta[:, 1:].copy()))
                linear.bias.copy_(torch.from_numpy(theta[:, 0].copy()))
            layers += [linear, torch.nn.Tanh()] if l < net.n_layers else [linear]
        self.model = torch.nn.Sequential(*layers)
        self.mu_t = mu_t
        self.module = LevenbergMarquardtModule(
            self.model, damping_strategy=StandardDampingStrategy(mu_t), solve_method="cholesky"
        )
        self.w0 = self.module.flat_params.clone()
        self.X, self.T = torch.from_numpy(problem.X), torch.from_numpy(problem.T)

    def __call__(self):
        import torch

        self.module.flat_params.copy_(self.w0)
        self.module.backup_parameters()
        self.module.damping_strategy.damping_factor = torch.tensor(self.mu_t)
        return self.module.training_step(self.X, self.T)

    def bpgpu_params(self) -> np.ndarray:
        """The model's parameters in bpgpu's flat layout (block l = [b; Wᵀ] row-major)."""
        blocks = []
        for linear in (m for m in self.model if hasattr(m, "weight")):
            blocks.append(np.vstack([linear.bias.detach().numpy()[None, :], linear.weight.detach().numpy().T]))
        return np.concatenate([b.reshape(-1) for b in blocks])


# --- training runs recorded against wall time ------------------------------------------


def mse(net: bp.MLP, problem: Problem) -> float:
    return float(np.mean((bp.to_numpy(net.forward(problem.X)) - problem.T) ** 2))


def bpgpu_run(problem: Problem, optimizer: str, budget: float, **options) -> list[tuple[float, float]]:
    """bp.fit with ``optimizer`` until ``budget`` seconds: (seconds, training MSE) per iteration.
    The MSE is 2 × the half squared error bp.fit records (no L2 term). No stopping rule
    (tol=None; L-BFGS: gtol = 0, as scikit-learn's tol=0 below)."""
    options = {"tol": 0.0 if optimizer == "lbfgs" else None, **options}
    bp.fit(
        bpgpu_net(problem), problem.X, problem.T, optimizer=optimizer, epochs=2, progress=False, **options
    )  # warm: numba's compiled step, the workspaces
    net = bpgpu_net(problem)
    points = [(0.0, mse(net, problem))]
    start = time.perf_counter()

    def record(epoch, history, net):
        elapsed = time.perf_counter() - start
        points.append((elapsed, 2.0 * history.loss[-1]))
        return elapsed > budget

    bp.fit(net, problem.X, problem.T, optimizer=optimizer, epochs=10**7, progress=False, callbacks=[record], **options)
    return points


def torch_lm_run(problem: Problem, budget: float) -> list[tuple[float, float]]:
    """torch-LM's training_step in a loop until ``budget`` seconds (its loss is the MSE)."""
    import torch

    TorchLMIteration(problem)()  # warm: torch.func's first vmap/jacrev
    case = TorchLMIteration(problem)
    with torch.no_grad():
        points = [(0.0, float(case.module.loss_fn(case.model(case.X), case.T)))]
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        _, loss, stop, _ = case.module.training_step(case.X, case.T)
        points.append((time.perf_counter() - start, float(loss)))
        if stop:
            break
    return points


def sklearn_lbfgs_run(problem: Problem, budget: float) -> list[tuple[float, float]]:
    """scikit-learn's MLPRegressor(solver="lbfgs"), which has no per-iteration hook: fresh fits
    with max_iter = 1, 2, 4, ... (same random_state, so each is a prefix of the next), timed."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    points, max_iter = [], 1
    while True:
        model = MLPRegressor(
            hidden_layer_sizes=problem.sizes[1:-1],
            activation="tanh",
            solver="lbfgs",
            alpha=0.0,
            max_iter=max_iter,
            tol=0.0,
            random_state=0,
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(problem.X, problem.T.ravel())
        elapsed = time.perf_counter() - start
        points.append((elapsed, float(np.mean((model.predict(problem.X) - problem.T.ravel()) ** 2))))
        if elapsed > budget or model.n_iter_ < max_iter:
            return points
        max_iter *= 2


def gemm_rate(n: int, k: int, repeats: int = 3) -> float:
    """The machine's float64 GEMM rate (GFLOP/s) on an (n × k)(k × n) product, best of ``repeats``."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((n, k)), rng.standard_normal((k, n))
    C = np.empty((n, n))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(A, B, out=C)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n * n * k / best / 1e9


# --- training curves ----------------------------------------------------------------

CURVE_PROBLEMS = {"sinc": sinc, "franke": franke, "friedman1": friedman1}


def torch_lm_available() -> bool:
    return installed("torch") and installed("torch_levenberg_marquardt")


def curves(problem: Problem, budget: float, peers: bool = True) -> dict[str, list[tuple[float, float]]]:
    """Every optimizer's (seconds, MSE) run on ``problem`` for ``budget`` seconds (peers: also
    scikit-learn's L-BFGS and, when installed, torch-LM)."""
    runs = {
        "bpgpu LM": bpgpu_run(problem, "lm", budget),
        "bpgpu Adam (full batch, lr 0.01)": bpgpu_run(problem, "adam", budget, learning_rate=0.01),
        "bpgpu L-BFGS": bpgpu_run(problem, "lbfgs", budget, max_fun=10**7),
    }
    if peers and installed("sklearn"):
        runs["scikit-learn L-BFGS"] = sklearn_lbfgs_run(problem, budget)
    if peers and torch_lm_available():
        runs["torch-LM (Cholesky)"] = torch_lm_run(problem, budget)
    return runs


ITERATION_PROBLEMS = {"sinc200": sinc, "regression8_2000": regression8}


def iteration_times(name: str, rounds: int, peers: bool, min_seconds: float = 0.25) -> dict:
    """Best seconds of one LM iteration from the same point, bpgpu and (peers, installed) torch-LM,
    calls interleaved round by round; the two steps checked equal first. At least ``rounds``
    rounds, and more (up to 20 × rounds) until every case has run ``min_seconds``: sinc's
    iteration takes milliseconds, and on a shared machine only the best of many is its cost."""
    problem = ITERATION_PROBLEMS[name]()
    cases = {"bpgpu": BpgpuIteration(problem)}
    if peers and torch_lm_available():
        cases["torch_lm"] = TorchLMIteration(problem)
    for case in cases.values():
        case()  # warm, and the step compared below
    row = {"problem": name, "sizes": list(problem.sizes), "m": problem.X.shape[0], "W": cases["bpgpu"].net.n_params}
    if "torch_lm" in cases:
        ours = np.asarray(cases["bpgpu"].net.params)
        moved = np.abs(ours - cases["bpgpu"].w0).max()
        row["step_gap"] = float(np.abs(ours - cases["torch_lm"].bpgpu_params()).max() / moved)
    best = {impl: np.inf for impl in cases}
    spent = dict.fromkeys(cases, 0.0)
    done = 0
    while done < rounds or (min(spent.values()) < min_seconds and done < 20 * rounds):
        for impl, case in cases.items():
            start = time.perf_counter()
            case()
            elapsed = time.perf_counter() - start
            best[impl], spent[impl] = min(best[impl], elapsed), spent[impl] + elapsed
        done += 1
    row["rounds"] = done
    row.update({f"{impl}_s": t for impl, t in best.items()})
    row["torch_lm_over_bpgpu"] = best["torch_lm"] / best["bpgpu"] if "torch_lm" in best else None
    return row


def thinned(points: list[tuple[float, float]], n: int = 200) -> list[tuple[float, float]]:
    """At most about n points, log-spaced in time, keeping the first and the last (for curves.json)."""
    if len(points) <= n:
        return points
    t = np.array([p[0] for p in points])
    edges = np.geomspace(max(t[1], 1e-6), t[-1], n)
    keep = sorted({0, len(points) - 1, *np.searchsorted(t, edges).clip(0, len(points) - 1).tolist()})
    return [points[i] for i in keep]


def at_time(points: list[tuple[float, float]], t: float) -> float:
    """The lowest MSE a run had reached by time t (its best so far)."""
    reached = [mse for seconds, mse in points if seconds <= t]
    return min(reached) if reached else points[0][1]


def plot_curves(problem: Problem, runs: dict, path: Path) -> None:
    """One plot: training MSE (best so far) against wall time, log-log, one line per run."""
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
