"""scikit-learn drop-ins: MLPClassifier and MLPRegressor trained by :func:`bpgpu.fit`.

Same constructor parameters, defaults and meanings as
``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``, plus ``device``
("auto", "cpu", "gpu") and ``dtype``. The model is a :class:`bpgpu.MLP` that
lives on the chosen device; ``coefs_[i]`` is exactly its Wᵀ block (n_in, n_out)
and ``intercepts_[i]`` its bias column, read from the flat parameter vector
(on the CPU these are views of the live parameters, on the GPU host copies
made once at the end of each fit).

Matching scikit-learn's definitions:
  - initialisation: Glorot uniform ±√(6 / (fan_in + fan_out)) for weights *and*
    biases (factor 2 instead of 6 for "logistic"), drawn from the same
    RandomState in the same order, so the same random_state starts from the
    same parameters;
  - output layer: softmax + cross-entropy for multiclass, logistic + binary
    cross-entropy for binary and multilabel, identity + ½ squared error for
    regression, all with reduction="mean" (sklearn's δ = (a − y), grads / m);
  - L2 penalty alpha/(2 m_batch) Σ‖W‖² on the weights, not the biases.

``sample_weight`` (fit and partial_fit) weighs each sample's loss as scikit-learn
does: Σ s_n J_n / Σ s_n per batch, the L2 term divided by Σ s_n, the early-stopping
split and score weighted too.

As scikit-learn: ``verbose=True`` prints "Iteration N, loss = L" per epoch, the
validation score under early stopping and the stopping rule's message
(``verbose="bar"``: a tqdm bar instead); L-BFGS stopped by max_iter or max_fun
warns with scikit-learn's ConvergenceWarning (its own check of the scipy result);
a run whose loss or parameters turn NaN/Inf raises scikit-learn's ValueError
("Solver produced non-finite parameter weights. ..."), except with early
stopping, which records nan in ``validation_scores_``, stops and keeps the best
parameters; the early-stopping split is stratified on the binarized labels.

Sparse X (scipy.sparse CSR, CSC or COO, matrices or arrays) is accepted in every
method, as scikit-learn accepts it, and never densified: the net multiplies it
sparse × dense (cupyx.scipy.sparse on the GPU).

Where it differs from scikit-learn (1.9): for multi-output
regression ``loss_`` sums the half squared error over the outputs where sklearn
averages it (the gradients, hence the training, are the same); the sample order
of each epoch comes from bpgpu's generator (seeded from random_state), so the
results equal sklearn's to rounding only without shuffling (shuffle=False, or
one batch); a diverging run stops at once where scikit-learn's runs on with NaN
until max_iter; L-BFGS whose loss is NaN at the start raises the ValueError
where scikit-learn returns loss_ = nan; predictions come back in the net's dtype.

``dtype=None`` (the default) is scikit-learn's rule: float32 input is computed
in float32, everything else in float64 (the net's dtype is fixed by the first
fit). ``dtype="float32"`` or ``"float64"`` forces one precision; float32 is the
explicit choice for GPU speed (trained accuracy is the same:
tests/test_estimators.py compares with scikit-learn).
"""

from __future__ import annotations

import importlib
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

try:
    from scipy.optimize import OptimizeResult
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_random_state, column_or_1d
    from sklearn.utils._param_validation import Interval, Options, StrOptions
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
    from sklearn.utils.optimize import _check_optimize_result
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "bpgpu.MLPClassifier and bpgpu.MLPRegressor need scikit-learn, an optional dependency: "
        "pip install 'bpgpu[sklearn]'"
    ) from exc

from bpgpu import io
from bpgpu.backend import to_numpy
from bpgpu.network import MLP
from bpgpu.optim import make_optimizer
from bpgpu.training import DivergenceError, fit

# scikit-learn's hidden activation names -> bpgpu's
_HIDDEN = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
# out_activation_ (sklearn's name) -> (bpgpu output activation, loss)
_OUTPUT = {
    "identity": ("identity", "squared_error"),
    "logistic": ("sigmoid", "binary_cross_entropy"),
    "softmax": ("softmax", "cross_entropy"),
    "exp": ("exp", "poisson"),  # MLPRegressor(loss="poisson"): log link, half Poisson deviance
}
_STOCHASTIC = ("sgd", "adam")
# scikit-learn's words for a run whose parameters became NaN or Inf (BaseMultilayerPerceptron._fit)
_NON_FINITE = (
    "Solver produced non-finite parameter weights. The input data may contain large values and need to be preprocessed."
)


class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: parameters, net, fit loop glue."""

    # scikit-learn's constraints of MLPClassifier, as scikit-learn 1.9 declares them, with
    # bpgpu's "lm" solver, verbose="bar", device and dtype. Declared here rather than read from
    # sklearn.neural_network, whose import brings sklearn.metrics and sklearn.model_selection:
    # 0.09 s of a new process's first fit (benchmarks/NOTES.md, E6). tests/test_estimators.py
    # holds them equal to the installed scikit-learn's, so a change on either side fails there.
    # _parameter_constraints is scikit-learn's (private) protocol for parameter validation.
    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions({"identity", "logistic", "tanh", "relu"})],
        "solver": [StrOptions({"lbfgs", "sgd", "adam", "lm"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "power_t": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose", StrOptions({"bar"})],
        "warm_start": ["boolean"],
        "momentum": [Interval(Real, 0, 1, closed="both")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "beta_1": [Interval(Real, 0, 1, closed="left")],
        "beta_2": [Interval(Real, 0, 1, closed="left")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"), Options(Real, {np.inf})],
        "max_fun": [Interval(Integral, 1, None, closed="left")],
        "device": [StrOptions({"auto", "cpu", "gpu"})],
        "dtype": [StrOptions({"float32", "float64"}), None],
    }

    def __init__(
        self,
        hidden_layer_sizes: int | tuple[int, ...] | list[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool | str = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        max_fun: int = 15000,
        device: str = "auto",
        dtype: str | None = None,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.device = device
        self.dtype = dtype

    # --- the net -----------------------------------------------------------

    def _layer_units(self, n_features: int, n_outputs: int) -> list[int]:
        hidden = self.hidden_layer_sizes
        hidden = list(hidden) if hasattr(hidden, "__iter__") else [hidden]
        if any(n <= 0 for n in hidden):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {hidden}.")
        return [n_features, *hidden, n_outputs]

    def _build_net(self, layer_units: list[int], dtype: str, backend: Any = None) -> MLP:
        """The net for out_activation_ in ``dtype``, on ``backend`` (default: this estimator's device)."""
        output, loss = _OUTPUT[self.out_activation_]
        return MLP(
            layer_units,
            hidden=_HIDDEN[self.activation],
            output=output,
            loss=loss,
            reduction="mean",
            dtype=dtype,
            backend=self.device if backend is None else backend,
        )

    def _initialize(
        self, n_features: int, n_outputs: int, random_state: np.random.RandomState, input_dtype: np.dtype
    ) -> None:
        """First fit: fitted attributes, a new net, and sklearn's Glorot draw.

        The net computes in ``dtype``, or with dtype=None in scikit-learn's precision:
        that of the validated input (float32 stays float32, anything else is float64)."""
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = n_outputs
        units = self._layer_units(n_features, n_outputs)
        self.n_layers_ = len(units)
        self.out_activation_ = self._out_activation()
        self._net = self._build_net(units, self.dtype or np.dtype(input_dtype).name)
        # sklearn's _init_coef, in its order (coef then intercept, layer by layer),
        # packed into the flat layout: per layer [bias (n_out), Wᵀ (n_in, n_out) row-major].
        factor = 2.0 if self.activation == "logistic" else 6.0
        blocks = []
        for fan_in, fan_out in zip(units, units[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            coef = random_state.uniform(-bound, bound, (fan_in, fan_out))
            intercept = random_state.uniform(-bound, bound, fan_out)
            blocks += [intercept, coef.ravel()]
        self._net.set_params(np.concatenate(blocks))
        self._optimizer = None
        self.loss_curve_ = []
        if self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.validation_scores_ = None
            self.best_validation_score_ = None
            self.best_loss_ = np.inf
        self._publish()

    def _publish(self) -> None:
        """coefs_ and intercepts_ in sklearn's shapes, from the flat parameters.

        to_numpy is the explicit device -> host transfer (on the CPU it returns
        the parameters themselves, so these are live views)."""
        host, layout = to_numpy(self._net.params), self._net.layout
        layers = range(1, layout.n_layers + 1)
        self.coefs_ = [layout.wt(host, l) for l in layers]  # sklearn's coefs_[l−1] is Wᵀ(l), (n_{l−1}, n_l)
        self.intercepts_ = [layout.bias(host, l) for l in layers]

    def _check_warm_shapes(self, n_features: int, n_outputs: int) -> None:
        units = self._layer_units(n_features, n_outputs)
        if list(self._net.sizes) != units:
            raise ValueError(
                f"warm_start/partial_fit needs the same layer sizes as the fitted net: it has "
                f"{list(self._net.sizes)}, the current parameters and data give {units}"
            )

    # --- fitting -----------------------------------------------------------

    def fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> _BaseMLP:
        """Fit the model to data matrix X and target(s) y (sklearn's meaning), each sample
        weighted by ``sample_weight`` when given."""
        self._validate_params()
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def _fit(self, X, y, incremental: bool, sample_weight=None):
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, Y = self._validate_input(X, y, incremental, reset=first_pass)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        if Y.ndim == 1:
            Y = Y.reshape(-1, 1)
        random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(X.shape[1], Y.shape[1], random_state, X.dtype)
        else:
            self._check_warm_shapes(X.shape[1], Y.shape[1])
        try:
            if self.solver in _STOCHASTIC:
                self._fit_stochastic(X, Y, random_state, incremental, sample_weight)
            elif self.solver == "lm":
                self._fit_lm(X, Y, random_state, sample_weight)
            else:
                self._fit_lbfgs(X, Y, sample_weight)
        finally:
            self._publish()  # also after a divergence: the net holds its last finite parameters
        return self

    def _progress(self, lines: bool) -> bool | str:
        """bp.fit's progress for verbose: "bar" -> the tqdm bar; True / >= 1 -> scikit-learn's
        lines where scikit-learn prints them (``lines``: the stochastic solvers)."""
        if self.verbose == "bar":
            return "bar"
        return "lines" if lines and self.verbose else False

    def _make_optimizer(self):
        """sklearn's solver and its options as a bpgpu optimizer bound to the net."""
        if self.solver == "adam":
            return make_optimizer(
                "adam",
                self._net,
                self.learning_rate_init,
                alpha=self.alpha,
                beta_1=self.beta_1,
                beta_2=self.beta_2,
                epsilon=self.epsilon,
            )
        name = "sgd"
        if self.momentum > 0:  # sklearn's velocity update with momentum 0 is plain SGD
            name = "nesterov" if self.nesterovs_momentum else "momentum"
        options = dict(momentum=self.momentum) if name != "sgd" else {}
        optimizer = make_optimizer(
            name,
            self._net,
            self.learning_rate_init,
            alpha=self.alpha,
            lr_schedule=self.learning_rate,
            power_t=self.power_t,
            **options,
        )
        optimizer.samples_seen = self.t_  # the invscaling schedule counts every sample seen
        return optimizer

    def _fit_stochastic(self, X, Y, random_state, incremental: bool, sample_weight) -> None:
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        if not incremental or self._optimizer is None:
            self._optimizer = self._make_optimizer()
        X, Y, sample_weight, validation = self._early_stopping_data(X, Y, sample_weight, random_state)
        patience = self._patience()
        try:
            history = fit(
                self._net,
                X,
                Y,
                optimizer=self._optimizer,
                epochs=1 if incremental else self.max_iter,
                batch_size=self.batch_size,
                shuffle=self.shuffle,
                seed=int(random_state.randint(np.iinfo(np.int32).max)),
                early_stopping=self.early_stopping,
                progress=self._progress(lines=True),
                tol=self.tol,
                n_iter_no_change=patience,
                sample_weight=sample_weight,
                **validation,
            )
        except DivergenceError as exc:
            # scikit-learn: with early stopping a NaN loss scores nan and the best parameters are
            # kept (bp.fit restored them); without, the fit fails with its ValueError.
            if not self.early_stopping:
                raise ValueError(_NON_FINITE) from exc
            history = exc.history
            history.loss.append(float("nan"))
            history.validation_score.append(float("nan"))
        self.n_iter_ = history.epochs  # sklearn counts the epochs of the last call
        self.t_ = self._optimizer.samples_seen
        self.loss_curve_ += history.loss
        self.loss_ = history.loss[-1]
        if self.early_stopping:
            self.validation_scores_ += history.validation_score
            self.best_validation_score_ = max(self.best_validation_score_, history.best_validation_score)
        else:
            self.best_loss_ = min(self.best_loss_, history.best_loss)
        if history.stop_reason == "epochs" and not incremental:
            warnings.warn(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the optimization "
                "hasn't converged yet.",
                ConvergenceWarning,
                stacklevel=2,
            )

    def _early_stopping_data(self, X, Y, sample_weight, random_state):
        """With early_stopping: the training part of the split and bp.fit's validation options
        (the held-out set, scored by the estimator's own score); else everything and no options."""
        if not self.early_stopping:
            return X, Y, sample_weight, {}
        X, X_val, Y, Y_val, sample_weight, weight_val = self._validation_split(X, Y, sample_weight, random_state)
        y_val = self._validation_targets(Y_val)
        return (
            X,
            Y,
            sample_weight,
            dict(
                validation_data=(X_val, Y_val),
                validation_score=lambda net, Xv, Tv: self._validation_score(Xv, y_val, weight_val),
            ),
        )

    def _patience(self) -> int:
        return self.max_iter if np.isinf(self.n_iter_no_change) else int(self.n_iter_no_change)

    def _fit_lm(self, X, Y, random_state, sample_weight) -> None:
        """solver="lm": bpgpu's Levenberg–Marquardt (full batch, :mod:`bpgpu.levenberg_marquardt`),
        max_iter iterations, with tol / n_iter_no_change / early_stopping as the other solvers."""
        self._optimizer = None
        X, Y, sample_weight, validation = self._early_stopping_data(X, Y, sample_weight, random_state)
        history = fit(
            self._net,
            X,
            Y,
            optimizer="lm",
            epochs=self.max_iter,
            alpha=self.alpha,
            tol=self.tol,
            n_iter_no_change=self._patience(),
            early_stopping=self.early_stopping,
            progress=self._progress(lines=True),
            sample_weight=sample_weight,
            **validation,
        )
        self.n_iter_ = history.epochs
        self.loss_curve_ += history.loss
        self.loss_ = history.loss[-1]
        if self.early_stopping:
            self.validation_scores_ += history.validation_score
            self.best_validation_score_ = max(self.best_validation_score_, history.best_validation_score)
        else:
            self.best_loss_ = min(self.best_loss_, history.best_loss)
        if history.stop_reason == "epochs":
            warnings.warn(
                f"Levenberg–Marquardt: Maximum iterations ({self.max_iter}) reached and the "
                "optimization hasn't converged yet.",
                ConvergenceWarning,
                stacklevel=2,
            )

    def _fit_lbfgs(self, X, Y, sample_weight) -> None:
        self._optimizer = None
        try:
            history = fit(
                self._net,
                X,
                Y,
                optimizer="lbfgs",
                epochs=self.max_iter,
                alpha=self.alpha,
                tol=self.tol,
                max_fun=self.max_fun,
                progress=self._progress(lines=False),
                sample_weight=sample_weight,
            )
        except DivergenceError as exc:
            raise ValueError(_NON_FINITE) from exc
        # scikit-learn's own check of the scipy result: the same ConvergenceWarning whenever L-BFGS
        # did not converge (max_iter or max_fun reached, or an abnormal line search), the same n_iter_
        result = OptimizeResult(nit=history.epochs, status=history.status, message=history.stop_reason)
        self.n_iter_ = _check_optimize_result("lbfgs", result, self.max_iter)
        self.loss_curve_ += history.loss
        # 0 iterations: the loss at the start
        self.loss_ = history.loss[-1] if history.loss else self._penalized_loss(X, Y, sample_weight)
        self.best_loss_ = min(self.best_loss_, history.best_loss)

    def _penalized_loss(self, X, Y, sample_weight) -> float:
        """sklearn's loss_: mean loss + alpha/(2 Σ s) Σ‖W‖² (weights only; Σ s = m without sample_weight)."""
        self._publish()
        squares = sum(float(np.dot(c.ravel(), c.ravel())) for c in self.coefs_)
        total = X.shape[0] if sample_weight is None else float(np.sum(sample_weight))
        return self._net.loss(X, Y, sample_weight) + 0.5 * self.alpha * squares / total

    def _validation_split(self, X, Y, sample_weight, random_state):
        """sklearn's held-out split for early stopping; the weights, when given, split with their
        rows. Returns X, X_val, Y, Y_val, s, s_val.

        As scikit-learn: stratified for a single output column (binary classes) on the binarized
        labels as booleans, so the same data splits the same way and a class too small for the
        split is named as scikit-learn names it ('True' / 'False')."""
        from sklearn.model_selection import train_test_split  # here, not at the top: see _parameter_constraints

        single = isinstance(self, ClassifierMixin) and self.n_outputs_ == 1
        stratify = Y.astype(bool) if single else None
        arrays = (X, Y) if sample_weight is None else (X, Y, sample_weight)
        parts = train_test_split(
            *arrays, random_state=random_state, test_size=self.validation_fraction, stratify=stratify
        )
        if parts[1].shape[0] < 2:
            raise ValueError(
                "The validation set is too small. Increase 'validation_fraction' or the size of your dataset."
            )
        return tuple(parts) if sample_weight is not None else (*parts, None, None)

    # --- prediction --------------------------------------------------------

    def _forward_host(self, X) -> np.ndarray:
        """a(L) for X as a numpy array on the host (one explicit transfer)."""
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False, dtype=(np.float64, np.float32))
        return to_numpy(self._net.forward(X))

    def _validation_score(self, X_val: np.ndarray, y_val: np.ndarray, sample_weight=None) -> float:
        out = to_numpy(self._net.forward(X_val))
        prediction = self._decode(out)
        if np.issubdtype(prediction.dtype, np.floating) and not np.isfinite(prediction).all():
            return float("nan")
        score = getattr(importlib.import_module("sklearn.metrics"), self._score_name)
        return float(score(y_val, prediction, sample_weight=sample_weight))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # as scikit-learn's MLP: CSR / CSC (COO converted) in every method
        return tags

    # --- pickling and bp.save ------------------------------------------------
    # The net and the optimizer hold modules (the backend namespace and kernel
    # table), which do not pickle. What is stored instead is host data: the flat
    # parameter vector and the optimizer's state vectors; unpickling rebuilds
    # both on this estimator's device, so partial_fit goes on where it stopped.

    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ returns __dict__ itself
        net = state.pop("_net", None)
        if net is not None:
            state.pop("coefs_", None)
            state.pop("intercepts_", None)
            state["_params_host"] = np.array(to_numpy(net.params), copy=True)
            state["_layer_units"] = list(net.sizes)
            state["_net_dtype"] = net.dtype
        optimizer = state.pop("_optimizer", None)
        if optimizer is not None:
            fields = {k: v for k, v in vars(optimizer).items() if k not in ("net", "_outer_views")}
            state["_optimizer_host"] = (
                type(optimizer),
                {  # its state vectors to the host, scalars as they are
                    k: np.array(to_numpy(v), copy=True) if getattr(v, "ndim", 0) else v for k, v in fields.items()
                },
            )
        return state

    def __setstate__(self, state):
        params = state.pop("_params_host", None)
        units = state.pop("_layer_units", None)
        dtype = state.pop("_net_dtype", None)
        optimizer = state.pop("_optimizer_host", None)
        super().__setstate__(state)
        if params is not None:
            self._net = self._build_net(units, dtype)
            self._net.set_params(params)
            self._publish()
        self._optimizer = None
        if optimizer is not None:
            cls, fields = optimizer
            self._optimizer = cls.__new__(cls)
            backend, dtype = self._net.backend, self._net.xp_dtype
            vars(self._optimizer).update(
                {k: backend.asarray(v, dtype) if isinstance(v, np.ndarray) else v for k, v in fields.items()}
            )
            self._optimizer.net = self._net

    # bp.save / bp.load (bpgpu/io.py's protocol): JSON metadata plus host arrays. The
    # optimizer state is not part of a model file: partial_fit after bp.load starts a
    # fresh optimizer (pickle keeps it).

    _FITTED = (
        "n_features_in_",
        "n_outputs_",
        "n_layers_",
        "out_activation_",
        "loss_",
        "loss_curve_",
        "best_loss_",
        "n_iter_",
        "t_",
        "validation_scores_",
        "best_validation_score_",
    )

    def __bpgpu_state__(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        check_is_fitted(self)
        params = self.get_params()
        if not isinstance(params["random_state"], (int, type(None))):
            params["random_state"] = None  # a RandomState object has no JSON form; refits draw afresh
        if not np.isfinite(params["n_iter_no_change"]):
            params["n_iter_no_change"] = "inf"
        hidden = params["hidden_layer_sizes"]
        params["hidden_layer_sizes"] = [int(n) for n in hidden] if hasattr(hidden, "__iter__") else int(hidden)
        fitted = {name: _json_value(getattr(self, name)) for name in self._FITTED}
        state = {"params": params, "fitted": fitted, "layer_units": list(self._net.sizes), "dtype": self._net.dtype}
        arrays = {"params": np.array(to_numpy(self._net.params), copy=True)}  # device -> host, explicit
        if hasattr(self, "feature_names_in_"):
            arrays["feature_names_in_"] = self.feature_names_in_.astype(str)
        state.update(self._label_state(arrays))
        return state, arrays

    @classmethod
    def __bpgpu_from_state__(cls, state: dict[str, Any], arrays: dict[str, np.ndarray], backend: Any = "auto"):
        """Rebuild a fitted estimator; its net goes on ``backend`` (its ``device`` parameter is kept)."""
        params = dict(state["params"])
        if params["n_iter_no_change"] == "inf":
            params["n_iter_no_change"] = np.inf
        if isinstance(params["hidden_layer_sizes"], list):
            params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
        est = cls(**params)
        est._validate_params()
        for name in cls._FITTED:
            setattr(est, name, state["fitted"][name])
        if "feature_names_in_" in arrays:
            est.feature_names_in_ = arrays["feature_names_in_"].astype(object)
        est._restore_labels(state, arrays)
        est._net = est._build_net(state["layer_units"], state["dtype"], backend)
        est._net.set_params(arrays["params"])  # checks the length against the architecture
        est._optimizer = None
        est._publish()
        return est


def _json_value(value: Any) -> Any:
    """Fitted attributes as plain JSON (numpy scalars to Python, ±inf to None as sklearn's "not set")."""
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _stochastic_solver(estimator) -> bool:
    """partial_fit exists only for the stochastic solvers, as in scikit-learn."""
    if estimator.solver not in _STOCHASTIC:
        raise AttributeError(
            f"partial_fit is only available for stochastic optimizers. {estimator.solver} is not stochastic."
        )
    return True


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier: scikit-learn's MLPClassifier, trained by bpgpu.

    Parameters are scikit-learn's (same names, defaults and meanings), plus
    ``device`` ("auto", "cpu" or "gpu": where the net lives and trains) and
    ``dtype`` (None: scikit-learn's rule, float32 for float32 input and float64
    otherwise; "float32" or "float64": that precision for every computation).
    ``verbose=True`` prints scikit-learn's lines; ``verbose="bar"`` shows a progress bar.
    ``solver="lm"`` (bpgpu's, not scikit-learn's): Levenberg–Marquardt on the matching
    Gauss–Newton matrix of the cross-entropy, full batch, ``max_iter`` iterations (see
    :class:`MLPRegressor`).
    """

    # the validation score under early stopping: a function of sklearn.metrics, imported when used
    _score_name = "accuracy_score"

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(
            self, X, y, accept_sparse=["csr", "csc"], multi_output=True, dtype=(np.float64, np.float32), reset=reset
        )
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        # sklearn's rules: a fresh fit redefines the classes; warm_start must see the
        # same classes; partial_fit must see only known classes.
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer().fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the previous "
                        f"call to fit. Previously got {self.classes_}, `y` has {classes}"
                    )
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(
                    f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. 'y' has {classes}."
                )
        return X, self._label_binarizer.transform(y).astype(X.dtype)

    def _out_activation(self) -> str:
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _decode(self, out: np.ndarray) -> np.ndarray:
        if self.n_outputs_ == 1:
            out = out.ravel()
        return self._label_binarizer.inverse_transform(out)

    def _validation_targets(self, Y_val: np.ndarray) -> np.ndarray:
        return self._label_binarizer.inverse_transform(Y_val.ravel() if self.n_outputs_ == 1 else Y_val)

    def _label_state(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        classes = self.classes_
        arrays["classes_"] = classes.astype(str) if classes.dtype.hasobject else classes
        return {"y_type": self._label_binarizer.y_type_}

    def _restore_labels(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        y_type, classes = state["y_type"], arrays["classes_"]
        # LabelBinarizer refitted on what it learnt: the classes, or an indicator matrix.
        self._label_binarizer = LabelBinarizer().fit(
            np.eye(len(classes), dtype=int) if y_type == "multilabel-indicator" else classes
        )
        if self._label_binarizer.y_type_ != y_type:
            raise ValueError(f"classes_ {classes.tolist()} do not make a {y_type!r} target")
        self.classes_ = self._label_binarizer.classes_

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The predicted classes (numpy, on the host)."""
        return self._decode(self._forward_host(X))

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Probability of each class, columns ordered as ``classes_`` (numpy, on the host)."""
        out = self._forward_host(X)
        if self.n_outputs_ == 1:
            return np.hstack([1 - out, out])
        return out

    def predict_log_proba(self, X: ArrayLike) -> np.ndarray:
        """log(predict_proba(X))."""
        proba = self.predict_proba(X)
        return np.log(proba, out=proba)

    @available_if(_stochastic_solver)
    def partial_fit(
        self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None, classes: ArrayLike | None = None
    ) -> MLPClassifier:
        """One epoch over (X, y), continuing from the current parameters and optimizer state.

        ``classes`` (all the labels there will ever be) is required on the first call.
        """
        self._validate_params()
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor: scikit-learn's MLPRegressor, trained by bpgpu.

    Parameters are scikit-learn's (same names, order, defaults and meanings), plus
    ``device`` ("auto", "cpu" or "gpu") and ``dtype`` (None, "float32" or "float64").
    ``loss``: "squared_error" (identity output, ½ squared error) or "poisson" (as
    scikit-learn ≥ 1.7: exp output, the log link, and half the Poisson deviance
    Σ t log(t/a) − t + a, averaged over samples and summed over outputs; y ≥ 0).

    ``solver="lm"`` (bpgpu's, not scikit-learn's): Levenberg–Marquardt, MATLAB's default MLP
    trainer. Each of the ``max_iter`` iterations solves (JᵀJ + α P + μ I) δ = −∇E by Cholesky
    on the whole training set (J the Jacobian of the residuals, by backprop), μ = 1e-3, ×0.1
    after a step that lowers the loss, ×10 after one that does not, stopping once μ > 1e10;
    ``alpha``, ``tol``, ``n_iter_no_change``, ``early_stopping``, ``validation_fraction``,
    ``sample_weight`` and ``verbose`` mean what they mean for the other solvers (batch_size,
    learning_rate* and the Adam/SGD options are not used). It needs a W × W (or, with fewer
    residuals m·n_outputs than parameters W, an N × N) matrix: for small nets, where it
    reaches a far lower loss in tens of iterations than Adam or L-BFGS in thousands.
    """

    _parameter_constraints: dict = {
        **_BaseMLP._parameter_constraints,  # noqa: SLF001 - the class's own base
        "loss": [StrOptions({"squared_error", "poisson"})],
    }
    _score_name = "r2_score"

    # scikit-learn's signature (loss first, then the shared parameters); explicit, because
    # scikit-learn's get_params reads the parameter names from __init__'s signature.
    def __init__(
        self,
        loss: str = "squared_error",
        hidden_layer_sizes: int | tuple[int, ...] | list[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool | str = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        max_fun: int = 15000,
        device: str = "auto",
        dtype: str | None = None,
    ) -> None:
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes,
            activation=activation,
            solver=solver,
            alpha=alpha,
            batch_size=batch_size,
            learning_rate=learning_rate,
            learning_rate_init=learning_rate_init,
            power_t=power_t,
            max_iter=max_iter,
            shuffle=shuffle,
            random_state=random_state,
            tol=tol,
            verbose=verbose,
            warm_start=warm_start,
            momentum=momentum,
            nesterovs_momentum=nesterovs_momentum,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            n_iter_no_change=n_iter_no_change,
            max_fun=max_fun,
            device=device,
            dtype=dtype,
        )
        self.loss = loss

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(
            self,
            X,
            y,
            accept_sparse=["csr", "csc"],
            multi_output=True,
            y_numeric=True,
            dtype=(np.float64, np.float32),
            reset=reset,
        )
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y.astype(X.dtype, copy=False)

    def _out_activation(self) -> str:
        return "exp" if self.loss == "poisson" else "identity"

    def _decode(self, out: np.ndarray) -> np.ndarray:
        return out.ravel() if out.shape[1] == 1 else out

    def _validation_targets(self, Y_val: np.ndarray) -> np.ndarray:
        return self._decode(Y_val)

    def _label_state(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {}

    def _restore_labels(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """A regressor has no labels."""

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The predicted values (numpy, on the host)."""
        return self._decode(self._forward_host(X))

    @available_if(_stochastic_solver)
    def partial_fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> MLPRegressor:
        """One epoch over (X, y), continuing from the current parameters and optimizer state."""
        self._validate_params()
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)


io.register("MLPClassifier", MLPClassifier)
io.register("MLPRegressor", MLPRegressor)
