"""Data-parallel loss, gradient, Hessian-vector product and training on Dask.

X and T are dask arrays chunked along the samples (rows) alike, one chunk along
the columns. Every chunk is computed where it lives, by a net rebuilt there from
``net.config`` with the backend the chunk's array type asks for (numpy chunks on
numpy, CuPy chunks on CuPy), with reduction "sum": the cost and its derivatives
are sums over samples (seed: J = (1/m) Σ_n J_n), so the per-chunk sums add up in
a tree reduction and the driver divides once by the total m for a "mean" net.
Only the flat parameter vector (and v for the HVP) travels to the workers, once
per evaluation, as one literal key of the evaluation's graph. Training runs on the
driver (the dask-glm pattern): L-BFGS from scipy and gradient descent call the
distributed loss and gradient; mini-batch SGD sums every chunk's share of each
mini-batch.

Levenberg–Marquardt needs the normal equations (RᵀR + α P + μ D) δ = −∇E
(levenberg_marquardt.py) in the parameters form: RᵀR = Σ_chunks R_cᵀ R_c and
∇E = Σ_chunks ∇E_c are sums over chunks like the gradient, each chunk's a W × W
and a W-vector share, so they travel up the same tree reduction, and the W × W
Cholesky and the μ trials run on the driver. The residuals form (N × N with
N = m n_L, chosen in one process when N < W) does not split so: R Rᵀ has a block
R_c R_c′ᵀ for every pair of chunks, an all-to-all exchange of the N × W rows of
R, and data with fewer residuals than parameters fit in one process anyway.

Losing a worker: every evaluation is one graph whose every key, the parameter
vector included, can be recomputed from the graph, so when a worker dies at any
moment dask.distributed reruns its tasks elsewhere and recomputes the data it held
(from X's and T's own graphs), and the evaluation returns the same sums it would
have without the loss: it is complete or it raises, never half-used. It raises
:class:`EvaluationError` when Dask cannot finish it: ``reason`` "data lost" (a chunk
existed only as scattered data and its only holder died), "retries exhausted"
(KilledWorker: the scheduler's ``allowed-failures`` ran out) or "timeout" (the
evaluation outlived ``timeout`` seconds, e.g. on a stalled worker).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import dask
import dask.array as da
import numpy as np

from bpgpu.backend import of_array, to_numpy
from bpgpu.network import MLP
from bpgpu.training import History

# --- on the workers ----------------------------------------------------------

_local = threading.local()  # a thread of a worker reuses its nets (and their workspaces) across tasks
_NETS_KEPT = 8


def _worker_net(config: dict[str, Any], chunk: Any) -> MLP:
    """A "sum"-reduction twin of the driver's net on the chunk's backend, cached per thread."""
    backend = of_array(chunk)
    key = (json.dumps(config, sort_keys=True), backend.name)
    nets = _local.__dict__.setdefault("nets", {})
    net = nets.get(key)
    if net is None:
        if len(nets) >= _NETS_KEPT:
            nets.clear()
        net = nets[key] = MLP(**{**config, "reduction": "sum"}, backend=backend, seed=0)
    return net


def _row_slice(n: int, step: int, steps: int) -> slice:
    """Part ``step`` of ``steps`` near-equal contiguous parts of n rows (numpy's array_split rule)."""
    size, extra = divmod(n, steps)
    start = step * size + min(step, extra)
    return slice(start, start + size + (step < extra))


def _loss_sum(net: MLP, x: Any, t: Any) -> np.ndarray:
    return np.array([net.loss(x, t)])


def _loss_and_gradient_sum(net: MLP, x: Any, t: Any) -> np.ndarray:
    J, g = net.loss_and_gradient(x, t)
    return np.concatenate(([J], to_numpy(g)))


def _hvp_sum(net: MLP, x: Any, t: Any, v: Any) -> np.ndarray:
    from bpgpu.derivatives import hvp

    return to_numpy(hvp(net, x, t, v))


def _lm_sums(net: MLP, x: Any, t: Any, chunk_size: int) -> np.ndarray:
    """[E, ∇E (W), RᵀR (W × W, flattened)] of the chunk's samples: the chunk's share of the
    Levenberg–Marquardt normal equations (a "sum" net: E = Σ_n ℓ_n), RᵀR built over
    sub-chunks of ``chunk_size`` samples so that a worker holds one W × W sum and one
    sub-chunk of R."""
    from bpgpu.levenberg_marquardt import gram

    x, t = net.check_inputs(x, t)
    J, g = net.loss_and_gradient(x, t)
    A = gram(net, x, t, None, min(chunk_size, x.shape[0]))
    return np.concatenate(([J], to_numpy(g), np.reshape(to_numpy(A), (-1,))))


def _lm_losses(net: MLP, x: Any, t: Any, candidates: Any) -> np.ndarray:
    """E_j = Σ_n ℓ_n of the chunk at each row w_j of ``candidates`` (k, W): all the μ trials of
    one round in one task."""
    values = []
    for w in candidates:
        net.set_params(w)
        values.append(net.loss(x, t))
    return np.array(values)


def _chunk_sums(x, t, *, part, config, w, v=None, rows=None, width):
    """One row (1, width) of per-chunk sums; ``rows`` = (step, steps) picks a mini-batch share."""
    if rows is not None:
        share = _row_slice(x.shape[0], *rows)
        x, t = x[share], t[share]
    if x.shape[0] == 0:  # a chunk smaller than the number of mini-batches has no share in some
        return np.zeros((1, width))
    net = _worker_net(config, x)
    if w is not None:  # None: the part sets the parameters itself (the LM trials)
        net.set_params(w)
    extra = () if v is None else (v,)
    # float64 partial sums: the tree adds many of them, and a float32 net loses nothing by it
    return np.asarray(part(net, x, t, *extra), dtype=np.float64).reshape(1, width)


# --- on the driver -------------------------------------------------------------


def _distributed_client():
    """The dask.distributed Client that dask.compute would use now, or None."""
    get = dask.base.get_scheduler()
    try:
        from distributed import Client
    except ImportError:
        return None
    owner = getattr(get, "__self__", None)
    return owner if isinstance(owner, Client) else None


def _broadcast(vector: Any) -> Any:
    """Ship a host vector once, as one literal key of the graph.

    Not client.scatter: scattered data has no graph to be recomputed from, so a worker
    dying mid-scatter (or the only holder dying) fails the evaluation, while a graph key
    is rerun by the scheduler like any task. A fresh key each time (pure=False): no
    evaluation can pick up a key that the previous one is releasing. A vector above
    distributed.admin.large-graph-warning-threshold (10 MB: 1.3 M float64 parameters)
    makes the client warn of a large graph; it still travels once per evaluation."""
    return dask.delayed(vector, pure=False)


class EvaluationError(RuntimeError):
    """A distributed evaluation that Dask could not complete; nothing of it was used.

    Parameters
    ----------
    reason : str
        Why, one of ``FAILURE_REASONS``.
    message : str
        What happened, after "reason: " in the error's text.

    Attributes
    ----------
    reason : str
        "data lost": a chunk of X or T existed only as scattered data (``client.scatter``,
        not built from a graph) and its only holder died. "retries exhausted":
        ``KilledWorker``, workers died running the same task more than the scheduler's
        ``distributed.scheduler.allowed-failures`` times. "timeout": the evaluation took
        longer than ``timeout`` seconds.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


FAILURE_REASONS = ("data lost", "retries exhausted", "timeout")


def _computed(summed: da.Array, timeout: float | None) -> np.ndarray:
    """summed.compute(), or :class:`EvaluationError` saying why Dask could not finish it."""
    client = _distributed_client()
    if client is None:  # a local scheduler has no workers to lose
        return np.asarray(summed.compute())
    from distributed import KilledWorker

    future = client.compute(summed)
    try:
        return np.asarray(future.result(timeout=timeout))
    except KilledWorker as exc:
        raise EvaluationError("retries exhausted", f"Dask gave up on a task ({type(exc).__name__}: {exc})") from exc
    except CancelledError as exc:
        # the scheduler cancels the keys that depend on lost data it cannot recompute
        raise EvaluationError(
            "data lost",
            "a chunk of X or T held only as scattered data (not built from a graph) was lost with its "
            "worker, and Dask cannot recompute it; persist arrays built from a graph "
            f"(dask.array.from_array, from_zarr, ...) instead ({type(exc).__name__}: {exc}; Dask's reason: "
            f"{getattr(exc, 'reason', None)})",
        ) from exc
    except TimeoutError as exc:
        raise EvaluationError(
            "timeout",
            f"the evaluation did not finish within timeout={timeout} s (a stalled worker? the scheduler "
            "restarts a worker silent for distributed.scheduler.worker-ttl)",
        ) from exc
    finally:
        # let go of the evaluation's keys now, not when the traceback that holds this future dies:
        # an erred key the client still wants fails any later graph that shares it (X's chunks)
        future.release()


def _known_chunks(a: Any, argument: str) -> None:
    if any(np.isnan(c) for axis in a.chunks for c in axis):
        raise ValueError(
            f"{argument} has unknown chunk sizes (chunks={a.chunks}); call {argument}.compute_chunk_sizes() first"
        )


def _check(net: MLP, X: Any, T: Any) -> tuple[Any, Any]:
    """X, T as 2-D dask arrays with matching row chunks and one column chunk each."""
    if not isinstance(net, MLP):
        raise TypeError(f"net must be a bpgpu.MLP, got {type(net).__name__}")
    for a, argument in ((X, "X"), (T, "T")):
        if not isinstance(a, da.Array):
            raise TypeError(
                f"{argument} must be a dask.array.Array chunked along the rows, got {type(a).__name__}; "
                "wrap an in-memory array with dask.array.from_array(a, chunks=(rows, -1))"
            )
        _known_chunks(a, argument)
    if T.ndim == 1 and net.sizes[-1] == 1:
        T = T.reshape(-1, 1)
    for a, argument, width, layer in (
        (X, "X", net.sizes[0], "layer 0 (input)"),
        (T, "T", net.sizes[-1], f"layer {net.n_layers} (output)"),
    ):
        if a.ndim != 2:
            raise ValueError(
                f"{argument} must be 2-D (samples, features) for {layer} of MLP {list(net.sizes)}, got shape {a.shape}"
            )
        if a.shape[1] != width:
            raise ValueError(
                f"{argument} has {a.shape[1]} columns but {layer} of MLP {list(net.sizes)} has {width} units: "
                f"{argument}.shape={a.shape}"
            )
        if len(a.chunks[1]) != 1:
            raise ValueError(
                f"{argument} must be one chunk along the columns, got {argument}.chunks[1]={a.chunks[1]}; "
                f"use {argument}.rechunk({{1: -1}})"
            )
    if X.shape[0] == 0:
        raise ValueError(f"X is an empty batch: shape {X.shape}")
    if X.chunks[0] != T.chunks[0]:
        raise ValueError(
            f"X and T must be chunked alike along the rows (samples): X.chunks[0]={X.chunks[0]}, "
            f"T.chunks[0]={T.chunks[0]}; use T.rechunk({{0: X.chunks[0]}})"
        )
    return X, T


def _summed(net: MLP, X: Any, T: Any, part: Callable, width: int, w: Any, v: Any = None, rows=None) -> da.Array:
    """Σ over chunks of part(chunk), lazily: a tree reduction (split_every from dask.config).
    w None: the workers' nets are not set to it (a part that sets its own parameters)."""
    w = None if w is None else _broadcast(to_numpy(w))
    kwargs = {"part": part, "config": net.config, "w": w, "rows": rows, "width": width}
    if v is not None:
        kwargs["v"] = _broadcast(to_numpy(v))
    per_chunk = da.map_blocks(
        _chunk_sums, X, T, chunks=((1,) * X.numblocks[0], (width,)), dtype=np.float64, meta=np.empty((0, 0)), **kwargs
    )
    return per_chunk.sum(axis=0)


def _sums(*args, timeout: float | None = None, **kwargs) -> np.ndarray:
    return _computed(_summed(*args, **kwargs), timeout)


def _loss_and_gradient_at(
    net: MLP, X: Any, T: Any, w: Any, rows=None, m: int | None = None, timeout: float | None = None
):
    """(J, dJ/dw as host float64) at parameters w, over all rows or one mini-batch of m rows."""
    sums = _sums(net, X, T, _loss_and_gradient_sum, 1 + net.n_params, w, rows=rows, timeout=timeout)
    c = net.reduction_factor(X.shape[0] if m is None else m)
    return float(sums[0] * c), sums[1:] * c


def loss(net: MLP, X: Any, T: Any, *, timeout: float | None = None) -> float:
    """The cost J over all rows of the dask arrays X, T, as a Python float.

    ``timeout``: seconds the evaluation may take on a dask.distributed cluster before it is
    cancelled and :class:`EvaluationError` (reason "timeout") is raised; None (default) waits.
    The same holds for every function of this module."""
    X, T = _check(net, X, T)
    return float(_sums(net, X, T, _loss_sum, 1, net.params, timeout=timeout)[0] * net.reduction_factor(X.shape[0]))


def loss_and_gradient(net: MLP, X: Any, T: Any, *, timeout: float | None = None) -> tuple[float, Any]:
    """(J, dJ/dw) over the dask arrays X, T: the gradient as a new flat vector (W,) on net's backend."""
    X, T = _check(net, X, T)
    J, g = _loss_and_gradient_at(net, X, T, net.params, timeout=timeout)
    return J, net.backend.asarray(g, net.xp_dtype)


def gradient(net: MLP, X: Any, T: Any, *, timeout: float | None = None) -> Any:
    """dJ/dw (W,) over the dask arrays X, T, summed from every chunk's backpropagation."""
    return loss_and_gradient(net, X, T, timeout=timeout)[1]


def hvp(net: MLP, X: Any, T: Any, v: Any, *, timeout: float | None = None) -> Any:
    """H v (W,), the exact Hessian-vector product of J over the dask arrays X, T (R-operator per chunk)."""
    X, T = _check(net, X, T)
    v = net.flat_vector(v, "v")
    sums = _sums(net, X, T, _hvp_sum, net.n_params, net.params, v=v, timeout=timeout)
    return net.backend.asarray(sums * net.reduction_factor(X.shape[0]), net.xp_dtype)


# --- training -------------------------------------------------------------------

FIT_OPTIMIZERS = ("lbfgs", "gd", "sgd", "lm")
# what fit(optimizer="lm") takes besides max_iter, tol and timeout
LM_OPTIONS = ("alpha", "mu", "mu_dec", "mu_inc", "mu_max", "damping", "n_iter_no_change", "chunk_size", "max_memory")


class _Stopped:
    """Turn a failed distributed evaluation into one clear error saying what net.params hold:
    the result of the last complete update (``updates`` counts them), never a partial one."""

    def __init__(self, optimizer: str):
        self.optimizer, self.updates = optimizer, 0

    def __enter__(self) -> _Stopped:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        stopped = (
            f"bpgpu.dask.fit(optimizer={self.optimizer!r}) stopped: a Dask computation failed; "
            f"net.params are the result of the {self.updates} complete update(s) before it"
        )
        if isinstance(exc, EvaluationError):
            raise EvaluationError(exc.reason, f"{stopped} ({exc})") from exc
        raise RuntimeError(f"{stopped} ({type(exc).__name__}: {exc})") from exc


def fit(
    net: MLP,
    X: Any,
    T: Any,
    optimizer: str = "lbfgs",
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    learning_rate: float = 0.1,
    update: str = "sgd",
    batch_size: int = 200,
    seed: int | None = None,
    timeout: float | None = None,
    **options: Any,
) -> History:
    """Train ``net`` in place on the dask arrays X, T; return a :class:`bpgpu.training.History`
    (loss and learning rate per iteration, or per epoch for "sgd"; stop_reason "max_iter",
    "tol" or L-BFGS's message).

    optimizer:
      "lbfgs"  scipy's L-BFGS-B on the driver, each evaluation a distributed loss and
               gradient (the dask-glm pattern); at most max_iter iterations, gtol=tol.
      "gd"     full-batch gradient descent: max_iter steps (fewer once ``max |g| <= tol``),
               each the step rule ``update`` of :mod:`bpgpu.optim` ("sgd", "momentum",
               "nesterov", "adam"; ``options`` such as momentum or alpha go to it).
      "sgd"    synchronous data-parallel mini-batch SGD for max_iter epochs: an epoch
               has S = min(ceil(m / batch_size), rows of the largest chunk) steps;
               step s takes the s-th of S contiguous
               near-equal slices of every chunk (so every worker computes its share of
               every mini-batch), the steps in an order drawn from ``seed`` each epoch;
               the summed share gradients make the mini-batch gradient, one update
               per step. Shuffle the rows once beforehand if they are sorted.
      "lm"     Levenberg–Marquardt (:mod:`bpgpu.levenberg_marquardt`), full batch, the
               same iterations as ``bpgpu.fit(optimizer="lm")`` (equal to rounding):
               each iteration is one graph in which every chunk computes its share of
               the normal equations, E, ∇E and RᵀR (W × W), tree-summed to the driver,
               which solves (RᵀR + α P + μ D) δ = −∇E by Cholesky for each μ of MATLAB's
               schedule; the trials' losses are one graph per round of 1, 2, 4, ...
               candidate μ. At most max_iter iterations; stop_reason "mu_max" when no
               μ ≤ mu_max lowers the loss, "tol" by bpgpu.fit's rule (the loss did not
               improve by tol for more than n_iter_no_change iterations; tol=None: never).
               ``options``: alpha, mu, mu_dec, mu_inc, mu_max, damping, n_iter_no_change
               (10), chunk_size (samples per sub-chunk of R on a worker; None: about
               64 MiB), max_memory (bytes for the W × W sums; a larger need raises
               ValueError before anything is computed). history.mu holds μ per
               iteration. The parameters form only (module docstring says why).

    A worker lost at any moment costs time, not the fit: Dask reruns its part of the
    evaluation (module docstring). When Dask cannot complete an evaluation, fit raises
    :class:`EvaluationError` (reason "data lost", "retries exhausted" or "timeout": each
    evaluation may take ``timeout`` seconds, None waits); any other failure raises
    RuntimeError. net.params then hold the result of the last complete update (for
    "lbfgs", the last completed iteration; for "lm", the last accepted step), never a
    partial one.
    """
    from bpgpu.optim import make_optimizer

    if optimizer not in FIT_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(FIT_OPTIMIZERS)}, got {optimizer!r}")
    _at_least_one(max_iter, "max_iter")
    X, T = _check(net, X, T)
    if optimizer == "lm":
        return _fit_lm(net, X, T, max_iter, tol, timeout, **options)
    if optimizer == "lbfgs":
        if options:
            raise TypeError(f"optimizer='lbfgs' takes no step-rule options, got {sorted(options)}")
        return _fit_lbfgs(net, X, T, max_iter, tol, timeout)
    step_rule = make_optimizer(update, net, learning_rate, **options)
    if optimizer == "gd":
        return _fit_gd(net, X, T, step_rule, max_iter, tol, timeout)
    _at_least_one(batch_size, "batch_size")
    return _fit_sgd(net, X, T, step_rule, max_iter, batch_size, seed, timeout)


def _at_least_one(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _penalized_gradient(
    net: MLP, X: Any, T: Any, step_rule: Any, timeout: float | None, rows=None, m: int | None = None
):
    """(J, g) at net.params with the step rule's L2 term, g on net's backend, ready for update(g)."""
    m = X.shape[0] if m is None else m
    J, g = _loss_and_gradient_at(net, X, T, net.params, rows=rows, m=m, timeout=timeout)
    g = net.backend.asarray(g, net.xp_dtype)
    return J + float(step_rule.penalize(g, net.reduction_factor(m))), g


def _fit_gd(net: MLP, X: Any, T: Any, step_rule: Any, max_iter: int, tol: float, timeout: float | None) -> History:
    history = History(stop_reason="max_iter")
    xp = net.backend.xp
    with _Stopped("gd") as stopped:
        for _ in range(max_iter):
            J, g = _penalized_gradient(net, X, T, step_rule, timeout)
            history.loss.append(J)
            history.learning_rate.append(step_rule.learning_rate)
            if float(xp.max(xp.abs(g))) <= tol:
                history.stop_reason = "tol"
                break
            step_rule.update(g)
            stopped.updates += 1
    return history


def _fit_sgd(
    net: MLP, X: Any, T: Any, step_rule: Any, epochs: int, batch_size: int, seed, timeout: float | None
) -> History:
    m = X.shape[0]
    # never more steps than the largest chunk has rows: every step then has a sample
    steps = min(-(-m // batch_size), max(X.chunks[0]))
    batch_rows = [sum(len(range(n)[_row_slice(n, s, steps)]) for n in X.chunks[0]) for s in range(steps)]
    weight = (lambda s: batch_rows[s] / m) if net.reduction == "mean" else (lambda s: 1.0)
    rng = np.random.default_rng(seed)
    history = History(stop_reason="max_iter")
    with _Stopped("sgd") as stopped:
        for _ in range(epochs):
            epoch_loss = 0.0
            for s in rng.permutation(steps).tolist():
                J, g = _penalized_gradient(net, X, T, step_rule, timeout, rows=(s, steps), m=batch_rows[s])
                step_rule.update(g)
                stopped.updates += 1
                epoch_loss += J * weight(s)  # the mean (or sum) over the epoch's samples
            history.loss.append(epoch_loss)
            step_rule.iteration_ends(step_rule.samples_seen + m)
            history.learning_rate.append(step_rule.learning_rate)
    return history


def _fit_lbfgs(net: MLP, X: Any, T: Any, max_iter: int, tol: float, timeout: float | None) -> History:
    """scipy's L-BFGS-B on host float64 vectors; net.params take each completed iterate.

    history.loss holds the loss after each L-BFGS iteration."""
    from scipy.optimize import minimize

    history = History()
    w0 = to_numpy(net.params).astype(np.float64)
    with _Stopped("lbfgs") as stopped:

        def iteration_done(intermediate_result) -> None:
            history.loss.append(float(intermediate_result.fun))
            net.set_params(intermediate_result.x)  # a failure later keeps this iterate
            stopped.updates += 1

        result = minimize(
            lambda w: _loss_and_gradient_at(net, X, T, w, timeout=timeout),
            w0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "gtol": tol},
            callback=iteration_done,
        )
    net.set_params(result.x)
    history.stop_reason = str(result.message)
    return history


def _fit_lm(
    net: MLP,
    X: Any,
    T: Any,
    max_iter: int,
    tol: float | None,
    timeout: float | None,
    n_iter_no_change: int = 10,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    **options: Any,
) -> History:
    """Levenberg–Marquardt with the normal equations summed over the chunks and the solves on
    the driver (:class:`bpgpu.levenberg_marquardt.LMDamping`): per iteration one graph for
    E, ∇E and RᵀR (W × W), then rounds of 1, 2, 4, ... μ trials, each round one graph of
    losses."""
    from bpgpu.levenberg_marquardt import LMDamping, check_memory, default_chunk_size

    if "form" in options:
        raise TypeError(
            "bpgpu.dask.fit(optimizer='lm') takes no form: it solves in the parameters form, RᵀR (W × W) "
            "summed over the chunks; the residuals form's N × N matrix R Rᵀ pairs every chunk's rows "
            "with every other chunk's (for N = m·n_L < W, fit in one process with bpgpu.fit)"
        )
    unknown = sorted(set(options) - set(LM_OPTIONS))
    if unknown:
        raise TypeError(f"optimizer='lm' does not take {', '.join(unknown)}; it takes {', '.join(LM_OPTIONS)}")
    _at_least_one(n_iter_no_change, "n_iter_no_change")
    if chunk_size is not None:
        _at_least_one(chunk_size, "chunk_size")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0):
        raise ValueError(f"tol must be a number >= 0 or None, got {tol!r}")
    damping = LMDamping(net, **options)
    m, W = X.shape[0], net.n_params
    chunk_size = default_chunk_size(net) if chunk_size is None else int(chunk_size)
    # the W × W sums travel and are added in float64 (_chunk_sums): on the driver and on each worker thread
    check_memory(
        net,
        max(X.chunks[0]),
        "parameters",
        damping.damping,
        chunk_size,
        max_memory,
        dtype="float64",
        advice="Use bpgpu.dask.fit with optimizer 'lbfgs', 'gd' or 'sgd', or a smaller net",
    )
    backend, xp, c = net.backend, net.backend.xp, net.reduction_factor(m)
    equations = functools.partial(_lm_sums, chunk_size=chunk_size)
    history, count, E = History(stop_reason="max_iter"), 0, None
    with _Stopped("lm") as stopped:
        for _ in range(max_iter):
            w0 = xp.asarray(net.params, copy=True)
            sums = _sums(net, X, T, equations, 1 + W + W * W, w0, timeout=timeout)
            if E is None:
                E = float(sums[0]) + damping.penalty(w0)
                if not np.isfinite(E):
                    break  # raised below, outside: not a failure of Dask
            g = backend.asarray(sums[1 : 1 + W], net.xp_dtype) + damping.penalty_gradient(w0)
            A = backend.asarray(np.reshape(sums[1 + W :], (W, W)), net.xp_dtype)

            def losses(deltas: list[Any], w0: Any = w0) -> list[float]:
                candidates = [w0 + delta for delta in deltas]
                V = np.stack([to_numpy(w) for w in candidates])
                values = _sums(net, X, T, _lm_losses, len(V), None, v=V, timeout=timeout)  # V travels once
                return [float(value) + damping.penalty(w) for value, w in zip(values, candidates)]

            # rounds of 1, 2, 4, ... trials: r rejections cost about log2(r) round trips, not r
            delta, E, _ = damping.try_steps(E, damping.parameter_solver(A, g), losses, growth=2)
            if delta is not None:
                net.params[...] = w0 + delta
                stopped.updates += 1
            loss = c * E
            history.loss.append(loss)
            history.mu.append(damping.mu)
            if delta is None:
                history.stop_reason = "mu_max"
                break
            # bpgpu.fit's (scikit-learn's) rule: no improvement by tol for more than n_iter_no_change iterations
            if tol is not None:
                count = count + 1 if loss > history.best_loss - tol else 0
            history.best_loss = min(history.best_loss, loss)
            if tol is not None and count > n_iter_no_change:
                history.stop_reason = "tol"
                break
    if not np.isfinite(E):
        raise FloatingPointError(f"the loss at the starting parameters is {E} (not finite)")
    return history
