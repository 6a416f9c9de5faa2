"""The multilayer perceptron: configuration, flat parameters, input checks and the public API.

The passes themselves are :mod:`bpgpu.engine`'s, the flat layout :mod:`bpgpu.layout`'s.

Notation (docs/guide/feedforward.rst): layer l maps a(l−1) to a(l) = g(z(l)), z(l) = Θ(l) a(l−1)
with a_0 = 1. Θ(l) is (n_l, n_{l−1} + 1) with the bias in column 0. All Θ(l)
live in one flat vector w, each stored column-major: the bias column comes
first, then the weight block, whose transpose Wᵀ (n_{l−1}, n_l) is an ordinary
C-contiguous matrix that BLAS takes with no copy. A batch is row-major, so
Z = A_prev @ Wᵀ + b.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from bpgpu import activations, engine, losses, validation
from bpgpu.backend import Backend, is_sparse, resolve
from bpgpu.layout import Layout

INITS = ("uniform", "glorot", "he")
REDUCTIONS = ("mean", "sum")


class MLP:
    """A multilayer perceptron trained by backpropagation on numpy or CuPy.

    Parameters
    ----------
    layer_sizes : [n0, n1, ..., nL], input width first.
    hidden, output : activation name, or one per hidden layer.
    loss : "squared_error", "binary_cross_entropy" or "cross_entropy".
    reduction : "mean" (sum over samples / m) or "sum".
    dtype : "float32" or "float64"; every computation stays in it.
    backend : "auto", "numpy", "cupy" or an array-API namespace.
    init : "uniform" (U[−epsilon, epsilon], docs/guide/training.rst), "glorot" or "he".
    seed : int for reproducible initial parameters (drawn on the host in
        float64, so the same seed gives the same net on every backend).
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        hidden: str | Sequence[str] = "sigmoid",
        output: str = "sigmoid",
        loss: str = "squared_error",
        reduction: str = "mean",
        dtype: str = "float32",
        backend: Any = "auto",
        init: str = "uniform",
        epsilon: float = 0.12,
        seed: int | None = None,
    ) -> None:
        self.sizes = validation.layer_sizes(layer_sizes)
        L = self.n_layers = len(self.sizes) - 1
        hidden_names = validation.per_layer(hidden, L - 1, "hidden")
        if isinstance(hidden, str) and not hidden_names:
            activations.get(hidden, None, is_output=False)
        self.activations = [
            activations.get(name, l, is_output=False) for l, name in enumerate(hidden_names, start=1)
        ] + [activations.get(output, L, is_output=True)]
        if self.activations[-1].name == "softmax" and self.sizes[-1] < 2:
            raise ValueError(
                f"output='softmax' needs at least 2 units in layer {L} (it is constant 1 on one unit), "
                f"got layer_sizes={list(self.sizes)}"
            )
        self.loss_function = losses.get(loss, self.activations[-1], L)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self.dtype = validation.dtype_name(dtype)
        self.backend: Backend = resolve(backend)
        self.xp_dtype = self.backend.dtype(self.dtype)  # the dtype object of the backend's namespace
        self.layout = Layout(self.sizes)  # offsets and views of the flat vector w
        self.n_params = self.layout.n_params
        self.params = self.backend.xp.zeros(self.n_params, dtype=self.xp_dtype)
        self._workspaces: OrderedDict[int, engine.Workspace] = OrderedDict()
        self.init, self.epsilon, self.seed = init, epsilon, seed
        self.initialize(init, epsilon, seed)

    # --- configuration -----------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this net (except the parameters)."""
        return {
            "layer_sizes": list(self.sizes),
            "hidden": [g.name for g in self.activations[:-1]],
            "output": self.activations[-1].name,
            "loss": self.loss_function.name,
            "reduction": self.reduction,
            "dtype": self.dtype,
        }

    def __repr__(self) -> str:
        c = self.config
        return (
            f"MLP({c['layer_sizes']}, hidden={c['hidden']}, output={c['output']!r}, "
            f"loss={c['loss']!r}, dtype={c['dtype']!r}, backend={self.backend.name!r})"
        )

    # --- parameters --------------------------------------------------------

    def initialize(self, init: str = "uniform", epsilon: float = 0.12, seed: int | None = None) -> None:
        """Draw new parameters in place (random, to break the symmetry between units: docs/guide/training.rst)."""
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        rng = np.random.default_rng(seed)
        host = np.zeros(self.n_params)
        for l in range(1, self.n_layers + 1):
            n_in, n_out = self.sizes[l - 1], self.sizes[l]
            theta = self.layout.theta(host, l)
            if init == "uniform":
                theta[...] = rng.uniform(-epsilon, epsilon, size=theta.shape)
            elif init == "glorot":
                bound = np.sqrt(6.0 / (n_in + n_out))
                theta[:, 1:] = rng.uniform(-bound, bound, size=(n_out, n_in))
            else:
                theta[:, 1:] = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_out, n_in))
        self.set_params(host)

    def theta(self, l: int, vec: Any = None) -> Any:
        """View of Θ(l), shape (n_l, n_{l−1} + 1), column 0 the bias, l = 1..L.

        With ``vec`` (any flat vector in the params layout, e.g. a gradient) the
        same block of that vector. Always a view: writing into it writes into
        the flat vector.
        """
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not 1 <= l <= self.n_layers:
            raise ValueError(f"layer l must be an int in 1..{self.n_layers}, got {l!r}")
        vec = self.params if vec is None else vec
        if tuple(vec.shape) != (self.n_params,):
            raise ValueError(
                f"vec must be a flat vector of length n_params={self.n_params}, got shape {tuple(vec.shape)}"
            )
        return self.layout.theta(vec, l)

    def flat_vector(self, v: Any, argument: str) -> Any:
        """``v`` checked and moved to the backend as a finite flat vector in the params layout."""
        if self._ready(v) and v.shape == (self.n_params,) and validation.all_finite(v, np):
            return v  # already a finite flat numpy vector in the net's dtype: nothing to convert
        validation.numeric_kind(v, argument)
        v = self.backend.asarray(v, self.xp_dtype)
        if tuple(v.shape) != (self.n_params,):
            raise ValueError(
                f"{argument} must be a flat vector of length n_params={self.n_params} for MLP "
                f"{list(self.sizes)}, got shape {tuple(v.shape)}"
            )
        if not bool(self.backend.xp.all(self.backend.xp.isfinite(v))):
            raise ValueError(f"{argument} contains NaN or Inf")
        return v

    def set_params(self, w: Any) -> None:
        """Copy ``w`` into the parameters in place (existing views stay valid)."""
        self.params[...] = self.flat_vector(w, "w")

    def copy(self) -> MLP:
        """An independent net with the same configuration and a copy of the parameters."""
        twin = MLP.__new__(MLP)
        # the same configuration (layout, backend, activations are immutable and shared),
        # its own parameters and its own buffers
        twin.__dict__.update(
            self.__dict__, params=self.backend.xp.asarray(self.params, copy=True), _workspaces=OrderedDict()
        )
        return twin

    # --- inputs ------------------------------------------------------------

    def check_inputs(self, X: Any, T: Any = None, accept_sparse: bool = False) -> tuple[Any, Any]:
        """X (and T) moved to the backend in the net's dtype and checked, as every pass expects them.

        Parameters
        ----------
        X : array-like (m, n_0); with ``accept_sparse`` also a scipy.sparse or cupyx.scipy.sparse
            matrix or array (any format), which becomes a CSR matrix on the backend, never dense.
        T : array-like (m, n_L), or (m,) when n_L = 1; or None.
        accept_sparse : whether the caller's passes take a sparse X: the engine's forward and
            backward passes do (layer 1's products X Wᵀ and Xᵀ δ are sparse × dense); the
            derivative tools, which stack X into batched products, do not.

        Returns
        -------
        (X, T) : backend arrays (T None when not given). Raises ValueError naming the argument,
        the layer and the shapes when they do not fit the net, or when T does not fit the loss.
        """
        if self._ready_batch(X, self.sizes[0]) and (
            T is None or (self._ready_batch(T, self.sizes[-1]) and T.shape[0] == X.shape[0])
        ):  # already finite numpy batches in the net's dtype and widths: nothing to convert
            if T is not None:
                self.loss_function.check_targets(self.activations[-1], T, np)
            return X, T
        validation.numeric_kind(X, "X")
        if is_sparse(X):
            if not accept_sparse:
                raise TypeError(
                    f"X is a sparse {type(X).__name__} of shape {tuple(X.shape)}, but this function needs a "
                    "dense X (net.forward, net.loss, net.gradient, net.loss_and_gradient and bp.fit, but for "
                    "optimizer='lm', take sparse X); pass X.toarray()"
                )
            X = self.backend.as_sparse(X, self.xp_dtype)
        else:
            X = self.backend.asarray(X, self.xp_dtype)
        validation.batch(X, self.backend.xp, "X", self.sizes[0], "layer 0 (input)", self.sizes)
        if T is None:
            return X, None
        validation.numeric_kind(T, "T")
        T = self.backend.asarray(T, self.xp_dtype)
        if T.ndim == 1 and self.sizes[-1] == 1:
            T = self.backend.xp.reshape(T, (-1, 1))
        validation.batch(T, self.backend.xp, "T", self.sizes[-1], f"layer {self.n_layers} (output)", self.sizes)
        if T.shape[0] != X.shape[0]:
            raise ValueError(
                f"X and T must have the same number of rows: X.shape={tuple(X.shape)}, T.shape={tuple(T.shape)}"
            )
        self.loss_function.check_targets(self.activations[-1], T, self.backend.xp)
        return X, T

    def _ready(self, x: Any) -> bool:
        """Whether x is a numpy array of the net's dtype on the numpy backend (the fast path of the
        input checks: no conversion; anything else takes the full checks, with their errors)."""
        return type(x) is np.ndarray and x.dtype == self.xp_dtype and self.backend.name == "numpy"

    def _ready_batch(self, x: Any, width: int) -> bool:
        """:meth:`_ready`, 2-D, non-empty, ``width`` columns and finite: what :meth:`check_inputs` accepts as is."""
        return (
            self._ready(x) and x.ndim == 2 and x.shape[0] > 0 and x.shape[1] == width and validation.all_finite(x, np)
        )

    def workspace(self, m: int) -> engine.Workspace:
        """The engine's buffers for batch size m (a few sizes are kept, least recently used dropped)."""
        ws = self._workspaces.get(m)
        if ws is None:
            ws = self._workspaces[m] = engine.Workspace(self, m)
            while len(self._workspaces) > 4:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(m)
        return ws

    # --- weighting ---------------------------------------------------------------

    def reduction_factor(self, m: int, weights: tuple[Any, float] | None = None) -> float:
        """c in J = c Σ_n J_n: 1/m for reduction="mean", 1 for "sum"; with ``weights``
        (:meth:`weighting`'s pair) their c, for J = c Σ_n s_n J_n."""
        if weights is not None:
            return weights[1]
        return 1.0 / m if self.reduction == "mean" else 1.0

    def weighting(self, sample_weight: Any, rows: Any = None) -> tuple[Any, float] | None:
        """Sample weights s as ``(s_col, c)`` for the weighted passes, or None for None.

        J = c Σ_n s_n J_n with c = 1 / Σ_n s_n (reduction="mean", scikit-learn's
        weighted average) or 1 ("sum"); s_col is s as an (m, 1) column on the
        backend. ``rows`` (host indices) picks a batch out of a validated host vector.
        """
        if sample_weight is None:
            return None
        s = sample_weight if rows is None else sample_weight[rows]
        return self.backend.asarray(np.reshape(s, (-1, 1)), self.xp_dtype), self.weighted_factor(float(np.sum(s)))

    def weighted_factor(self, total_weight: float) -> float:
        """c for weights summing to total_weight: 1/Σ s (0 for a batch of zero weights: it
        contributes nothing) for reduction="mean", 1 for "sum"."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / total_weight if total_weight > 0 else 0.0

    def _weights_for(self, sample_weight: Any, m: int) -> tuple[Any, float] | None:
        """Validate ``sample_weight`` against m rows and return :meth:`weighting`'s pair."""
        return None if sample_weight is None else self.weighting(validation.sample_weight(sample_weight, m))

    # --- public API ----------------------------------------------------------

    def forward(self, X: Any) -> Any:
        """a(L) for a batch X of shape (m, n0) (dense or sparse): a new array of shape (m, nL)."""
        X, _ = self.check_inputs(X, accept_sparse=True)
        a = engine.forward(self, X, self.workspace(X.shape[0]), self.params)
        return self.backend.xp.asarray(a, copy=True)

    predict = forward

    def loss(self, X: Any, T: Any, sample_weight: Any = None) -> float:
        """The cost J as a Python float; with ``sample_weight`` (one weight ≥ 0 per row) the
        weighted cost c Σ_n s_n J_n, c = 1/Σ_n s_n for reduction="mean". X may be sparse."""
        X, T = self.check_inputs(X, T, accept_sparse=True)
        weights = self._weights_for(sample_weight, X.shape[0])
        return float(engine.loss(self, X, T, self.workspace(X.shape[0]), self.params, weights))

    def loss_and_gradient(self, X: Any, T: Any, sample_weight: Any = None) -> tuple[float, Any]:
        """(J, dJ/dw): the loss and a new flat gradient in the params layout (weighted as :meth:`loss`;
        X may be sparse)."""
        X, T = self.check_inputs(X, T, accept_sparse=True)
        weights = self._weights_for(sample_weight, X.shape[0])
        grad = self.backend.xp.empty(self.n_params, dtype=self.xp_dtype)
        J = engine.loss_and_gradient(self, X, T, grad, weights)
        return float(J), grad

    def gradient(self, X: Any, T: Any, sample_weight: Any = None) -> Any:
        """dJ/dw by backpropagation: a new flat vector in the params layout (weighted as :meth:`loss`)."""
        return self.loss_and_gradient(X, T, sample_weight)[1]
