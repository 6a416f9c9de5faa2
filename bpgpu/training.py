"""Training: one step (forward, backprop, fused update) and the epoch loop :func:`fit`.

Host traffic is kept to the edges (arrays stay on their device): per epoch one
host→device copy of the shuffled sample order (drawn with numpy's seeded
generator, so a seed gives the same batches on every backend) and one
device→host copy of the epoch's loss (and validation loss) for the history,
the progress bar and the stopping rules. Inside an epoch batches are gathered
on the device (``take_rows`` with an index vector into reused buffers) and each
batch loss is written into a device vector; nothing is synchronised.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bpgpu import engine, validation
from bpgpu.backend import is_sparse, to_numpy
from bpgpu.kernels import jit
from bpgpu.optim import SGD, Optimizer, make_optimizer


class DivergenceError(FloatingPointError, ValueError):
    """The loss (or a parameter) became NaN or Inf; the net holds its last finite parameters.

    A ValueError, as scikit-learn's MLP reports a run that produced non-finite
    weights (and a FloatingPointError, as before). Attributes: ``epoch`` and ``step``
    (1-based) where it was seen, ``history`` (the epochs completed before it).
    """

    def __init__(self, message: str, epoch: int, step: int, history: History):
        super().__init__(message)
        self.epoch, self.step, self.history = epoch, step, history


@dataclass
class History:
    """Per-epoch record of a :func:`fit` (also readable as ``history["loss"]``).

    loss: training loss per epoch (mean over the epoch's batches, weighted by
    batch size, L2 term included, as scikit-learn's ``loss_curve_``);
    validation_loss / validation_score: per epoch when there is a validation
    set (the score is ``validation_score(net, X_val, T_val)`` when given, else
    −validation_loss); learning_rate: the rate in force at the end of each
    epoch; mu: Levenberg–Marquardt's damping μ after each iteration;
    stop_reason: "epochs", "tol", "early_stopping", "callback",
    "interrupted", "mu_max" (Levenberg–Marquardt) or L-BFGS's message; status: L-BFGS's exit status (scipy's:
    0 converged, 1 iteration or evaluation limit reached, 2 other, 99 stopped by
    a callback), None for the stochastic optimizers.
    """

    loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    validation_score: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    mu: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_validation_score: float = -math.inf
    stop_reason: str = ""
    status: int | None = None

    @property
    def epochs(self) -> int:
        return len(self.loss)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)


# --- one step ------------------------------------------------------------------


def train_step(net: Any, X: Any, T: Any, optimizer: Optimizer, weights: tuple[Any, float] | None = None) -> Any:
    """Forward, backprop, L2 term and one fused update on a batch already on the backend.

    X (m, n0) and T (m, nL) must be backend arrays in the net's dtype (as
    ``net.check_inputs`` returns them). Returns the batch loss as a device scalar
    (no host transfer). After the first call for a batch size it allocates
    nothing on numpy: the workspace, gradient and optimizer state are reused.

    On the numpy backend with numba installed the whole step is one compiled
    call (:mod:`bpgpu.kernels.jit`, the same arithmetic; ``BPGPU_JIT=0`` turns
    it off), which removes numpy's per-call overhead on small nets.

    weights: ``(s_col, c)`` from :meth:`MLP.weighting` for sample weights; c
    also scales the L2 term, as scikit-learn divides it by Σ s.

    A sparse X (CSR, as ``check_inputs`` makes it) takes the kernel-table path,
    whose layer-1 products are sparse × dense.
    """
    compiled = jit.train_step_for(net, optimizer)
    if compiled is not None and not is_sparse(X):
        return compiled(X, T, weights)
    ws = net.workspace(X.shape[0])
    engine.forward(net, X, ws, net.params)
    loss = engine.backward(net, X, T, ws, net.params, ws.grad, weights)
    c = net.reduction_factor(X.shape[0], weights)
    loss = loss + optimizer.penalize(ws.grad, c)
    optimizer.update(ws.grad)
    return loss


def _sample_sgd_step(net: Any, X: Any, T: Any, optimizer: SGD) -> Any:
    """Plain SGD on one sample with the update fused into backprop, layer by layer.

    ∂J/∂Wᵀ(l) = a(l−1) ⊗ δ(l) is never stored: ``outer_sgd_update`` applies
    Wᵀ ← Wᵀ − lr a ⊗ δ directly. δ(l−1) = (δ(l) W(l)) ⊙ g′ is computed first,
    while W(l) still holds the weights the forward pass used, so the step is
    exactly :func:`train_step`'s (tests/test_training.py compares them).
    """
    ops, L, w, layout, xp = net.backend.ops, net.n_layers, net.params, net.layout, net.backend.xp
    ws = net.workspace(1)
    engine.forward(net, X, ws, w)
    loss = engine.output_delta(net, T, ws)  # c = 1 for one sample under either reduction
    scratch = optimizer.layer_scratch()
    for l in range(L, 0, -1):
        if l > 1:
            s = ops.matmul(ws.D[l], layout.wt(w, l, xp).T, ws.D[l - 1])
            getattr(ops, net.activations[l - 2].bwd)(s, ws.A[l - 1], s, ws.scratch[l - 1], ws.rows)
        a_prev = X[0, :] if l == 1 else ws.A[l - 1][0, :]
        ops.outer_sgd_update(
            layout.wt(w, l, xp), layout.bias(w, l), a_prev, ws.D[l][0, :], optimizer.learning_rate, scratch[l]
        )
    return loss


# --- argument checks -----------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _batch_size(batch_size: Any, m: int) -> int:
    if batch_size is None:
        return m
    if batch_size == "auto":
        return min(200, m)
    size = _positive_int(batch_size, "batch_size")
    if size > m:
        warnings.warn(f"batch_size={size} is larger than the {m} training samples; using {m}", stacklevel=3)
    return min(size, m)


PROGRESS = (True, False, "bar", "lines")


def _progress_bar(progress: bool | str, epochs: int) -> Any:
    if progress not in PROGRESS:
        raise ValueError(f"progress must be one of True, False, 'bar' or 'lines', got {progress!r}")
    if progress is False or progress == "lines":
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress=True needs tqdm, an optional dependency: pip install 'bpgpu[sklearn]' (or pass progress=False)"
        ) from None
    return tqdm(total=epochs, desc="bpgpu fit", unit="epoch", leave=True)


def _split_validation(net: Any, X: Any, T: Any, s: Any, validation_data: Any, fraction: float, rng: Any):
    """(X_train, T_train, s_train, X_val, T_val, s_val); the split draws from the fit's seeded
    generator. s: host sample weights or None (validation_data is scored unweighted)."""
    if validation_data is not None:
        if fraction:
            raise ValueError("give either validation_data or validation_fraction, not both")
        try:
            Xv, Tv = validation_data
        except (TypeError, ValueError):
            raise TypeError("validation_data must be a pair (X_val, T_val)") from None
        Xv, Tv = net.check_inputs(Xv, Tv, accept_sparse=True)
        return X, T, s, Xv, Tv, None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {fraction!r}")
    if fraction == 0:
        return X, T, s, None, None, None
    m = X.shape[0]
    n_val = math.ceil(fraction * m)  # as scikit-learn's train_test_split
    if n_val < 1 or m - n_val < 1:
        raise ValueError(f"validation_fraction={fraction} leaves no training or no validation sample out of {m}")
    perm = rng.permutation(m)
    val, train = perm[:n_val], perm[n_val:]
    if s is not None:
        for part, name in ((train, "training"), (val, "validation")):
            if not np.any(s[part] > 0):
                raise ValueError(
                    f"sample_weight is zero on every row of the {name} split "
                    f"(validation_fraction={fraction}); change the seed or the weights"
                )
        s, s_val = s[train], s[val]
    else:
        s_val = None
    xp, order = net.backend.xp, net.backend.asarray(perm, net.backend.xp.int64)
    val, train = order[:n_val], order[n_val:]
    return (_rows(xp, X, train), xp.take(T, train, axis=0), s, _rows(xp, X, val), xp.take(T, val, axis=0), s_val)


def _rows(xp: Any, X: Any, idx: Any) -> Any:
    """The rows idx of X, a dense array or a sparse matrix (which stays sparse)."""
    return X[idx] if is_sparse(X) else xp.take(X, idx, axis=0)


def _sample_weight(net: Any, sample_weight: Any, m: int) -> np.ndarray | None:
    """Validated host weights, or None when there are none or they change nothing: equal weights
    under reduction="mean" (c Σ s J_n with c = 1/Σ s is then the plain mean) or all ones. None keeps
    the unweighted path, the compiled step included."""
    if sample_weight is None:
        return None
    s = validation.sample_weight(sample_weight, m)
    if np.all(s == s[0]) and (net.reduction == "mean" or s[0] == 1.0):
        return None
    return s


# --- the epoch loop ------------------------------------------------------------


def fit(
    net: Any,
    X: Any,
    T: Any,
    optimizer: str | Optimizer = "sgd",
    learning_rate: float = 0.1,
    epochs: int = 200,
    batch_size: int | str | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    validation_data: tuple[Any, Any] | None = None,
    validation_fraction: float = 0.0,
    early_stopping: bool = False,
    callbacks: Iterable[Callable[[int, History, Any], Any]] = (),
    progress: bool | str = True,
    *,
    tol: float | None = 1e-4,
    n_iter_no_change: int = 10,
    max_fun: int = 15000,
    validation_score: Callable[[Any, Any, Any], float] | None = None,
    sample_weight: Any = None,
    **optimizer_options: Any,
) -> History:
    """Train ``net`` in place on (X, T) and return its :class:`History`.

    X may be a scipy.sparse (or, on the GPU, cupyx.scipy.sparse) matrix or array of
    any format: it stays sparse (CSR), batches are sparse row selections and layer 1's
    products X Wᵀ and Xᵀ δ are sparse × dense.

    optimizer: "sgd", "momentum", "nesterov", "adam", "lbfgs", "lm" (Levenberg–Marquardt,
        :mod:`bpgpu.levenberg_marquardt`), or an
        :class:`bpgpu.optim.Optimizer` already bound to this net (its state and
        options carry over, e.g. for scikit-learn's partial_fit; then
        learning_rate and optimizer_options are not used).

    batch_size: None (full batch: gradient descent), an int (1 is per-sample
        SGD), or "auto" = min(200, m) as scikit-learn. L-BFGS is full batch.

    epochs: passes over the data (L-BFGS and LM: their iterations, as sklearn's max_iter).

    shuffle: draw a new sample order each epoch from ``seed``'s generator.

    validation_data / validation_fraction: a held-out set scored each epoch;
        early_stopping=True stops on it and restores its best parameters.

    tol, n_iter_no_change: scikit-learn's rule: when the training loss (or,
        with early_stopping, the validation score) fails to improve by tol for
        more than n_iter_no_change epochs, stop (lr_schedule="adaptive":
        divide the learning rate by 5 instead, until it is ≤ 1e-6).
        tol=None disables the rule.

    callbacks: each called as ``cb(epoch, history, net)`` after every epoch;
        a True return value stops training.

    progress: True or "bar": a tqdm bar with the epoch, loss and validation
        figures; "lines": scikit-learn's verbose lines on stdout
        ("Iteration N, loss = L" per epoch, "Validation score: S" when there is
        a validation set, and the stopping rule's message); False: nothing.

    validation_score: ``f(net, X_val, T_val) -> float``, higher is better
        (default −validation loss).

    sample_weight: one weight ≥ 0 per row of X, as scikit-learn's: each batch's
        loss is Σ s_n J_n / Σ s_n (reduction="mean") and the L2 term is divided
        by Σ s_n; a validation_fraction split takes its rows' weights along.
        Equal weights under reduction="mean" change nothing and are dropped.

    optimizer_options: alpha (L2, weights only), lr_schedule, power_t,
        momentum, beta_1, beta_2, epsilon (see :mod:`bpgpu.optim`); for "lm":
        alpha, mu, mu_dec, mu_inc, mu_max, damping, form, chunk_size, max_memory
        (see :class:`bpgpu.levenberg_marquardt.LevenbergMarquardt`). LM is full
        batch: batch_size, shuffle and learning_rate are not used; it stops with
        stop_reason "mu_max" when no μ ≤ mu_max lowers the loss.

    Raises :class:`DivergenceError` when the loss or the parameters become
    non-finite; the net then holds the parameters from the start of that epoch
    (with early_stopping: those of the best validation score so far), and the
    optimizer's velocity or moments are zeroed. Divergence is seen
    once per epoch, from the one number transferred; numpy may also print
    overflow RuntimeWarnings on the way.
    """
    epochs = _positive_int(epochs, "epochs")
    if tol is not None and (not isinstance(tol, (int, float)) or tol < 0):
        raise ValueError(f"tol must be a number >= 0 or None, got {tol!r}")
    n_iter_no_change = _positive_int(n_iter_no_change, "n_iter_no_change")
    callbacks = tuple(callbacks)
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks must be callables cb(epoch, history, net), got {cb!r}")
    X, T = net.check_inputs(X, T, accept_sparse=True)
    s = _sample_weight(net, sample_weight, X.shape[0])
    rng = np.random.default_rng(seed)
    X, T, s, Xv, Tv, s_val = _split_validation(net, X, T, s, validation_data, validation_fraction, rng)
    weights_val = net.weighting(s_val)
    if early_stopping and Xv is None:
        raise ValueError("early_stopping=True needs validation_data or validation_fraction > 0")
    if optimizer == "lbfgs":
        alpha = optimizer_options.pop("alpha", 0.0)
        if optimizer_options:
            raise TypeError(f"optimizer 'lbfgs' does not take {', '.join(sorted(optimizer_options))}")
        return _fit_lbfgs(
            net,
            X,
            T,
            Xv,
            Tv,
            epochs,
            alpha,
            tol,
            max_fun,
            callbacks,
            progress,
            validation_score,
            net.weighting(s),
            weights_val,
        )
    if optimizer == "lm":
        return _fit_lm(
            net,
            X,
            T,
            s,
            Xv,
            Tv,
            weights_val,
            epochs,
            early_stopping,
            tol,
            n_iter_no_change,
            callbacks,
            progress,
            validation_score,
            optimizer_options,
        )
    if isinstance(optimizer, Optimizer):
        if optimizer.net is not net:
            raise ValueError("the optimizer given is bound to another net; make one with make_optimizer(name, net)")
        opt = optimizer
    else:
        opt = make_optimizer(optimizer, net, learning_rate, **optimizer_options)
    loop = _EpochLoop(net, X, T, opt, _batch_size(batch_size, X.shape[0]), shuffle, rng, s, weights_val)
    monitor = _Monitor(
        net, Xv, Tv, early_stopping, tol, n_iter_no_change, validation_score, print if progress == "lines" else None
    )

    def one_epoch(epoch: int, history: History) -> tuple[float, float | None, Any, str | None]:
        loss, val_loss = loop.run_epoch(epoch, Xv, Tv, history)
        opt.iteration_ends(opt.samples_seen + X.shape[0])
        return loss, val_loss, opt, None

    return _run_epochs(net, epochs, progress, monitor, callbacks, one_epoch, stacklevel=3)


def _run_epochs(
    net: Any,
    epochs: int,
    progress: bool | str,
    monitor: _Monitor,
    callbacks: tuple,
    one_epoch: Callable[[int, History], tuple[float, float | None, Any, str | None]],
    stacklevel: int,
) -> History:
    """The epoch loop of :func:`fit`'s gradient optimizers and of Levenberg–Marquardt (an
    "epoch" is one LM iteration): ``one_epoch(epoch, history)`` runs it and returns
    (training loss, validation loss or None, the optimizer or None, a stop reason of its
    own or None); then the stopping rule, the bar, the callbacks, in that order. A
    DivergenceError or the end restores early stopping's best parameters. ``stacklevel``
    points the interruption warning at the caller of :func:`fit`.
    """
    history = History()
    bar = _progress_bar(progress, epochs)
    try:
        for epoch in range(1, epochs + 1):
            try:
                loss, val_loss, opt, halt = one_epoch(epoch, history)
            except KeyboardInterrupt:
                warnings.warn("training interrupted by the user", stacklevel=stacklevel)
                history.stop_reason = "interrupted"
                break
            stop = monitor.epoch_done(history, loss, val_loss, opt)
            _show(bar, epoch, history)
            if _run_callbacks(callbacks, epoch, history, net):
                history.stop_reason = "callback"
                break
            if halt or stop:
                history.stop_reason = halt or stop
                break
        else:
            history.stop_reason = "epochs"
    except DivergenceError:
        monitor.restore_best(history)  # early stopping's result is its best parameters, diverged or not
        raise
    finally:
        if bar is not None:
            bar.close()
    monitor.restore_best(history)
    return history


class _EpochLoop:
    """Batches, steps and the one host transfer per epoch, with buffers made once."""

    def __init__(
        self,
        net: Any,
        X: Any,
        T: Any,
        opt: Optimizer,
        batch: int,
        shuffle: bool,
        rng: Any,
        s: Any = None,
        weights_val: Any = None,
    ):
        xp, dt = net.backend.xp, net.xp_dtype
        self.net, self.X, self.T, self.opt, self.rng = net, X, T, opt, rng
        m = X.shape[0]
        self.bounds = [(lo, min(lo + batch, m)) for lo in range(0, m, batch)]
        self.shuffle = shuffle and len(self.bounds) > 1  # a full batch's gradient ignores order
        # sample weights: the host vector (batch sums, hence c, on the host) and a device column
        self.s, self.weights_val = s, weights_val
        self.S = None if s is None else net.weighting(s)[0]
        self.sparse = is_sparse(X)  # batches of a sparse X are sparse row selections, not buffer gathers
        fused_sample = batch == 1 and type(opt) is SGD and opt.alpha == 0.0 and s is None and not self.sparse
        # the compiled step, where there is one, beats even the fused per-sample update
        self.step = _sample_sgd_step if fused_sample and jit.train_step_for(net, opt) is None else train_step
        self.step_losses = xp.zeros(len(self.bounds), dtype=dt)
        # epoch loss = Σ_b loss_b m_b / m (mean reduction) or Σ_b loss_b (sum), as sklearn's loss_curve_
        weights = [(hi - lo) / m if net.reduction == "mean" else 1.0 for lo, hi in self.bounds]
        self.weights = net.backend.asarray(weights, dt)
        self.good = xp.empty_like(net.params)  # the parameters at the start of the epoch
        if self.shuffle:
            sizes = {hi - lo for lo, hi in self.bounds}
            self.Xb = {} if self.sparse else {b: xp.empty((b, X.shape[1]), dtype=dt) for b in sizes}
            self.Tb = {b: xp.empty((b, T.shape[1]), dtype=dt) for b in sizes}
            self.Sb = {b: xp.empty((b, 1), dtype=dt) for b in sizes} if s is not None else None

    def run_epoch(self, epoch: int, Xv: Any, Tv: Any, history: History) -> tuple[float, float | None]:
        net, xp, ops = self.net, self.net.backend.xp, self.net.backend.ops
        self.good[...] = net.params
        if self.shuffle:
            perm = self.rng.permutation(self.X.shape[0])
            order = net.backend.asarray(perm, xp.int64)  # host → device
        for s, (lo, hi) in enumerate(self.bounds):
            if self.shuffle:
                rows = order[lo:hi]
                xb = self.X[rows] if self.sparse else ops.take_rows(self.X, rows, self.Xb[hi - lo])
                tb = ops.take_rows(self.T, rows, self.Tb[hi - lo])
            else:
                xb, tb = self.X[lo:hi, :], self.T[lo:hi, :]  # every axis indexed: the array API, sparse X
            weights = None
            if self.s is not None:  # the batch's weights gathered on the device, their sum on the host
                sb = ops.take_rows(self.S, rows, self.Sb[hi - lo]) if self.shuffle else self.S[lo:hi, ...]
                total = float(np.sum(self.s[perm[lo:hi]] if self.shuffle else self.s[lo:hi]))
                weights = (sb, net.weighted_factor(total))
            try:
                self.step_losses[s] = (
                    self.step(net, xb, tb, self.opt) if weights is None else train_step(net, xb, tb, self.opt, weights)
                )
            except (ArithmeticError, RuntimeWarning) as exc:  # np.seterr(...="raise") or -W error: caught at once
                self._diverged(epoch, history, s + 1, exc)
        # 0 · Σw is NaN when any parameter is non-finite, so one number checks loss and parameters.
        figures = [xp.sum(self.step_losses * self.weights) + 0.0 * xp.sum(net.params)]
        if Xv is not None:
            figures.append(engine.loss(net, Xv, Tv, net.workspace(Xv.shape[0]), net.params, self.weights_val))
        host = to_numpy(xp.stack(figures))  # the one device → host transfer of the epoch
        loss = float(host[0])
        if not math.isfinite(loss):
            losses = to_numpy(self.step_losses)  # only now: find the first non-finite step
            bad = np.flatnonzero(~np.isfinite(losses))
            self._diverged(epoch, history, int(bad[0]) + 1 if bad.size else len(self.bounds), None)
        return loss, (float(host[1]) if Xv is not None else None)

    def _diverged(self, epoch: int, history: History, step: int, cause: BaseException | None) -> None:
        """Restore the epoch-start parameters and raise. step: the first bad one (the last step when
        every batch loss was finite and only the final update broke w)."""
        self.net.params[...] = self.good
        self.opt.reset_state()  # its velocity or moments are poisoned too; the rest of its state is kept
        history.stop_reason = "diverged"
        raise DivergenceError(
            f"training diverged at epoch {epoch}, step {step} of {len(self.bounds)}: the loss or the "
            f"parameters became NaN or Inf{f' ({cause})' if cause else ''} (learning_rate={self.opt.learning_rate:g}, "
            f"optimizer={self.opt.name!r}). The net holds its parameters from the start of epoch {epoch}, "
            f"all finite, and the optimizer's velocity/moments were zeroed; try a smaller learning rate.",
            epoch,
            step,
            history,
        ) from cause


class _Monitor:
    """scikit-learn's _update_no_improvement_count, early stopping and the best parameters."""

    def __init__(
        self,
        net: Any,
        Xv: Any,
        Tv: Any,
        early_stopping: bool,
        tol: float | None,
        n_iter_no_change: int,
        score: Callable | None,
        say: Callable[[str], Any] | None = None,
    ):
        self.net, self.Xv, self.Tv = net, Xv, Tv
        self.early_stopping, self.tol, self.patience, self.score = early_stopping, tol, n_iter_no_change, score
        self.say = say  # progress="lines": scikit-learn's verbose output
        self.count = 0
        self.best = net.backend.xp.asarray(net.params, copy=True) if early_stopping else None

    def epoch_done(self, history: History, loss: float, val_loss: float | None, opt: Any) -> str:
        history.loss.append(loss)
        if self.say is not None:
            self.say(f"Iteration {history.epochs}, loss = {loss:.8f}")
        if opt is not None:  # L-BFGS has no learning rate
            history.learning_rate.append(opt.learning_rate)
        if val_loss is not None:
            history.validation_loss.append(val_loss)
            score = float(self.score(self.net, self.Xv, self.Tv)) if self.score else -val_loss
            history.validation_score.append(score)
            if self.say is not None:
                self.say(f"Validation score: {score:f}")
        if self.early_stopping:
            if score < history.best_validation_score + (self.tol or 0.0):
                self.count += 1
            else:
                self.count = 0
            if score > history.best_validation_score:
                history.best_validation_score = score
                self.best[...] = self.net.params
        elif self.tol is not None:
            self.count = self.count + 1 if loss > history.best_loss - self.tol else 0
        history.best_loss = min(history.best_loss, loss)
        if (self.tol is None and not self.early_stopping) or self.count <= self.patience:
            return ""
        what = "Validation score" if self.early_stopping else "Training loss"
        msg = f"{what} did not improve more than tol={self.tol or 0.0:f} for {self.patience} consecutive epochs."
        if opt is None:  # no optimizer object (LM): stop at once
            if self.say is not None:
                self.say(msg + " Stopping.")
            return "early_stopping" if self.early_stopping else "tol"
        if opt.trigger_stopping(msg, self.say):
            return "early_stopping" if self.early_stopping else "tol"
        self.count = 0
        return ""

    def restore_best(self, history: History) -> None:
        """With early stopping, put back the parameters of the best validation score."""
        if self.best is not None and history.best_validation_score > -math.inf:
            self.net.params[...] = self.best


def _run_callbacks(callbacks: tuple, epoch: int, history: History, net: Any) -> bool:
    """Call every callback (none is skipped because an earlier one asked to stop); True to stop."""
    answers = [bool(cb(epoch, history, net)) for cb in callbacks]
    return any(answers)


def _show(bar: Any, epoch: int, history: History) -> None:
    if bar is None:
        return
    figures = {"loss": f"{history.loss[-1]:.4g}"}
    if history.validation_score:
        figures["val_score"] = f"{history.validation_score[-1]:.4g}"
    bar.set_postfix(figures, refresh=False)
    bar.update(1)


# --- L-BFGS ----------------------------------------------------------------------


def _fit_lbfgs(
    net: Any,
    X: Any,
    T: Any,
    Xv: Any,
    Tv: Any,
    epochs: int,
    alpha: float,
    tol: float | None,
    max_fun: int,
    callbacks: tuple,
    progress: bool | str,
    validation_score: Callable | None,
    weights: Any = None,
    weights_val: Any = None,
) -> History:
    """scipy's L-BFGS-B on the flat parameter vector, full batch, as scikit-learn's solver="lbfgs".

    scipy works on host float64 vectors, so each evaluation makes two explicit
    transfers: x → device (``backend.asarray``) and J, ∂J/∂w → host
    (``to_numpy``). An "epoch" is one L-BFGS iteration; maxiter=epochs,
    maxfun=max_fun, gtol=tol.
    """
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise ImportError(
            "optimizer='lbfgs' needs scipy, an optional dependency: pip install 'bpgpu[sklearn]'"
        ) from None
    max_fun = _positive_int(max_fun, "max_fun")
    backend, dt = net.backend, net.xp_dtype
    ws = net.workspace(X.shape[0])
    l2 = SGD(net, 1.0, alpha=alpha)  # only its L2 term (mask and scratch) is used
    c = net.reduction_factor(X.shape[0], weights)

    def loss_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        net.params[...] = backend.asarray(x, dt)  # host → device
        J = engine.loss_and_gradient(net, X, T, ws.grad, weights) + l2.penalize(ws.grad, c)
        return float(J), to_numpy(ws.grad).astype(np.float64)  # device → host

    history = History()
    bar = _progress_bar(progress, epochs)
    monitor = _Monitor(net, Xv, Tv, False, None, 1, validation_score, print if progress == "lines" else None)
    epoch = 0

    def iteration(intermediate_result: Any) -> None:
        nonlocal epoch
        epoch += 1
        val_loss = None
        if Xv is not None:
            net.params[...] = backend.asarray(intermediate_result.x, dt)
            val_loss = float(engine.loss(net, Xv, Tv, net.workspace(Xv.shape[0]), net.params, weights_val))
        monitor.epoch_done(history, float(intermediate_result.fun), val_loss, None)
        _show(bar, epoch, history)
        if _run_callbacks(callbacks, epoch, history, net):
            history.stop_reason = "callback"
            raise StopIteration

    try:
        options = {"maxiter": epochs, "maxfun": max_fun}
        if tol is not None:
            options["gtol"] = tol
        x0 = to_numpy(net.params).astype(np.float64)  # device → host, also kept to restore on divergence
        result = minimize(loss_and_grad, x0, jac=True, method="L-BFGS-B", options=options, callback=iteration)
    finally:
        if bar is not None:
            bar.close()
    history.status = int(result.status)
    if not (np.all(np.isfinite(result.x)) and np.isfinite(result.fun)):
        net.params[...] = backend.asarray(x0, dt)
        history.stop_reason = "diverged"
        raise DivergenceError(
            f"L-BFGS diverged at iteration {epoch + 1}, step 1: the loss or the parameters became NaN or Inf. "
            f"The net holds its parameters from before the fit, all finite.",
            epoch + 1,
            1,
            history,
        )
    net.params[...] = backend.asarray(result.x, dt)
    history.stop_reason = history.stop_reason or str(result.message)
    return history


# --- Levenberg–Marquardt -----------------------------------------------------------


def _fit_lm(
    net: Any,
    X: Any,
    T: Any,
    s: Any,
    Xv: Any,
    Tv: Any,
    weights_val: Any,
    epochs: int,
    early_stopping: bool,
    tol: float | None,
    n_iter_no_change: int,
    callbacks: tuple,
    progress: bool,
    validation_score: Callable | None,
    options: dict,
) -> History:
    """Levenberg–Marquardt iterations (:class:`bpgpu.levenberg_marquardt.LevenbergMarquardt`), full
    batch, one "epoch" per iteration, with the stopping rules, validation and history of :func:`fit`.

    A step is taken only when it lowers the training loss, so the parameters never go
    non-finite; training stops ("mu_max") when no μ up to mu_max does.
    """
    from bpgpu.levenberg_marquardt import LevenbergMarquardt

    allowed = {"alpha", "mu", "mu_dec", "mu_inc", "mu_max", "damping", "form", "chunk_size", "max_memory"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"optimizer 'lm' does not take {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")
    solver = LevenbergMarquardt(net, X, T, s, **options)
    monitor = _Monitor(
        net, Xv, Tv, early_stopping, tol, n_iter_no_change, validation_score, print if progress == "lines" else None
    )

    def one_iteration(epoch: int, history: History) -> tuple[float, float | None, Any, str | None]:
        result = solver.step()
        val_loss = None
        if Xv is not None:
            val_loss = float(engine.loss(net, Xv, Tv, net.workspace(Xv.shape[0]), net.params, weights_val))
        history.mu.append(result.mu)
        return result.loss, val_loss, None, None if result.accepted else "mu_max"

    return _run_epochs(net, epochs, progress, monitor, callbacks, one_iteration, stacklevel=4)
