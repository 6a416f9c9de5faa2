"""Optimizers: one fused update over the flat parameter vector, scikit-learn's equations.

Each stochastic optimizer owns its state vectors (velocity, moments, a scratch
buffer), allocated once, flat, on the net's device, and ``update(grad)`` is
exactly one kernel call from ``net.backend.ops`` over the whole vector w:

    "sgd"        w ← w − lr g
    "momentum"   v ← μ v − lr g ;  w ← w + v
    "nesterov"   v ← μ v − lr g ;  w ← w + μ v − lr g
    "adam"       m ← β1 m + (1 − β1) g ;  v ← β2 v + (1 − β2) g² ;
                 w ← w − lr_t m / (√v + ε),  lr_t = lr √(1 − β2^t) / (1 − β1^t)

Learning-rate schedules (sgd, momentum, nesterov), as scikit-learn's MLP:
"constant"; "invscaling": lr = lr_init / (t + 1)^power_t after each epoch, t the
number of samples seen; "adaptive": lr is divided by 5 each time the stopping
criterion fires, and training stops once lr ≤ 1e-6.

L2 penalty (alpha), on the weights only, as scikit-learn: a batch of m samples
adds (alpha / 2) ‖W‖² to the summed loss, so with reduction="mean" the batch
loss gains (alpha / 2m) ‖W‖² and the gradient alpha W / m (``l2_grad`` with a
mask that is 1 on weights, 0 on biases, in the params layout).

"lbfgs" is not a step optimizer: :func:`bpgpu.training.fit` hands the flat
vector to scipy's L-BFGS-B (see :func:`bpgpu.training._fit_lbfgs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

STOCHASTIC = ("sgd", "momentum", "nesterov", "adam")
OPTIMIZERS = STOCHASTIC + ("lbfgs",)
SCHEDULES = ("constant", "invscaling", "adaptive")
_MIN_ADAPTIVE_LR = 1e-6


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _unit_interval(value: Any, name: str, closed_left: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    low_ok = value >= 0 if closed_left else value > 0
    if not (low_ok and value < 1):
        raise ValueError(f"{name} must be in {'[' if closed_left else '('}0, 1), got {value!r}")
    return float(value)


def _non_negative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class Optimizer:
    """A stochastic optimizer bound to one net (its state lives on the net's device).

    Attributes: ``learning_rate`` (current), ``learning_rate_init``, ``alpha``,
    ``lr_schedule``, ``power_t``, ``samples_seen`` (t of the invscaling schedule);
    ``compiled_step``, once a training step has run, is the compiled step that
    :func:`bpgpu.kernels.jit.train_step_for` built for it (None: none applies).
    """

    name = "sgd"

    def __init__(
        self,
        net: Any,
        learning_rate: float = 0.1,
        *,
        alpha: float = 0.0,
        lr_schedule: str = "constant",
        power_t: float = 0.5,
    ):
        self.net = net
        self.learning_rate_init = _positive(learning_rate, "learning_rate")
        self.learning_rate = self.learning_rate_init
        self.alpha = _non_negative(alpha, "alpha")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.power_t = _non_negative(power_t, "power_t")
        self.samples_seen = 0
        self._scratch = self._zeros()
        self._mask = self._weight_mask() if self.alpha > 0 else None

    def _zeros(self) -> Any:
        net = self.net
        return net.backend.xp.zeros(net.n_params, dtype=net.xp_dtype)

    def _weight_mask(self) -> Any:
        """1 on every weight θ_jk (k ≥ 1), 0 on every bias θ_j0, in the params layout."""
        net = self.net
        return net.backend.asarray(net.layout.weight_mask(), net.xp_dtype)

    # --- one step ------------------------------------------------------------

    def penalize(self, grad: Any, c: float) -> Any:
        """Add the L2 term to ``grad`` in place; return the penalty (alpha c / 2) ‖W‖² (device scalar).

        c is the loss's reduction factor (1/m or 1). Returns 0.0 when alpha is 0.
        """
        if self.alpha == 0.0:
            return 0.0
        net = self.net
        xp, w = net.backend.xp, net.params
        net.backend.ops.l2_grad(grad, w, self._mask, self.alpha * c, self._scratch)
        # ‖W‖² layer by layer: each weight block is a contiguous 1-D view, so no temporary.
        squares = sum(xp.vecdot(block, block) for block in self._weight_blocks(w))
        return (0.5 * self.alpha * c) * squares

    def _weight_blocks(self, w: Any):
        layout = self.net.layout
        for l in range(1, layout.n_layers + 1):
            yield layout.weights(w, l)

    def update(self, grad: Any) -> None:
        """w ← w + step(grad): one fused kernel over the flat parameter vector."""
        self.net.backend.ops.sgd_update(self.net.params, grad, self.learning_rate, self._scratch)

    def reset_state(self) -> None:
        """Zero the velocity / moments (after a divergence they may hold NaN or Inf)."""

    # --- epoch boundaries (scikit-learn's iteration_ends / trigger_stopping) ---

    def iteration_ends(self, samples_seen: int) -> None:
        self.samples_seen = samples_seen
        if self.lr_schedule == "invscaling":
            self.learning_rate = self.learning_rate_init / (samples_seen + 1) ** self.power_t

    def trigger_stopping(self, msg: str = "", say: Callable[[str], Any] | None = None) -> bool:
        """The loss stopped improving: stop (True), or under "adaptive" divide lr by 5 (False).

        ``say`` (e.g. ``print``) gets ``msg`` and the outcome in scikit-learn's words.
        """
        if self.lr_schedule != "adaptive" or self.learning_rate <= _MIN_ADAPTIVE_LR:
            if say is not None:
                small = " Learning rate too small." if self.lr_schedule == "adaptive" else ""
                say(f"{msg}{small} Stopping.")
            return True
        self.learning_rate /= 5.0
        if say is not None:
            say(f"{msg} Setting learning rate to {self.learning_rate:f}")
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(learning_rate={self.learning_rate:g}, alpha={self.alpha:g})"


class SGD(Optimizer):
    """Plain gradient step w ← w − lr g (full batch, mini-batch or one sample)."""

    _layer_views: list[Any] | None = None

    def layer_scratch(self) -> list[Any]:
        """Per layer l, an (n_{l−1}, n_l) view into the flat scratch vector (index 0 unused),
        made once: the scratch of ``outer_sgd_update`` in the fused one-sample step."""
        if self._layer_views is None:
            net, xp = self.net, self.net.backend.xp
            self._layer_views = [None] + [
                xp.reshape(self._scratch[: n_in * n_out], (n_in, n_out))
                for n_in, n_out in zip(net.sizes, net.sizes[1:])
            ]
        return self._layer_views


class Momentum(Optimizer):
    """Heavy-ball momentum: v ← μ v − lr g, w ← w + v."""

    name = "momentum"

    def __init__(self, net: Any, learning_rate: float = 0.1, *, momentum: float = 0.9, **options: Any):
        super().__init__(net, learning_rate, **options)
        self.momentum = _unit_interval(momentum, "momentum")
        self.velocity = self._zeros()

    def reset_state(self) -> None:
        self.velocity[...] = 0.0

    def update(self, grad: Any) -> None:
        ops = self.net.backend.ops
        ops.momentum_update(self.net.params, grad, self.velocity, self.learning_rate, self.momentum, self._scratch)


class Nesterov(Momentum):
    """Nesterov's momentum in scikit-learn's form: w ← w + μ v_new − lr g."""

    name = "nesterov"

    def update(self, grad: Any) -> None:
        ops = self.net.backend.ops
        ops.nesterov_update(self.net.params, grad, self.velocity, self.learning_rate, self.momentum, self._scratch)


class Adam(Optimizer):
    """Adam (Kingma and Ba), bias correction folded into lr_t on the host."""

    name = "adam"

    def __init__(
        self,
        net: Any,
        learning_rate: float = 0.001,
        *,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        **options: Any,
    ):
        schedule = options.get("lr_schedule", "constant")
        if schedule != "constant":
            raise ValueError(
                f"lr_schedule={schedule!r} applies to sgd, momentum and nesterov only; "
                f"adam adapts its own step (use lr_schedule='constant')"
            )
        super().__init__(net, learning_rate, **options)
        self.beta_1 = _unit_interval(beta_1, "beta_1")
        self.beta_2 = _unit_interval(beta_2, "beta_2")
        self.epsilon = _positive(epsilon, "epsilon")
        self.t = 0
        self.m = self._zeros()
        self.v = self._zeros()

    def reset_state(self) -> None:
        self.t = 0
        self.m[...] = 0.0
        self.v[...] = 0.0

    def update(self, grad: Any) -> None:
        self.t += 1
        lr_t = self.learning_rate_init * math.sqrt(1.0 - self.beta_2**self.t) / (1.0 - self.beta_1**self.t)
        self.learning_rate = lr_t  # as scikit-learn: the step actually taken
        ops = self.net.backend.ops
        ops.adam_update(
            self.net.params, grad, self.m, self.v, lr_t, self.beta_1, self.beta_2, self.epsilon, self._scratch
        )

    def iteration_ends(self, samples_seen: int) -> None:
        self.samples_seen = samples_seen


_CLASSES = {"sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adam": Adam}


def make_optimizer(name: str, net: Any, learning_rate: float = 0.1, **options: Any) -> Optimizer:
    """The stochastic optimizer ``name`` ("sgd", "momentum", "nesterov", "adam") for ``net``.

    options: alpha, lr_schedule, power_t (all); momentum (momentum, nesterov);
    beta_1, beta_2, epsilon (adam). An option the optimizer does not take is an error.
    """
    if name == "lbfgs":
        raise ValueError("'lbfgs' is not a step optimizer; use bp.fit(net, X, T, optimizer='lbfgs')")
    if name not in _CLASSES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    try:
        return _CLASSES[name](net, learning_rate, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"optimizer {name!r} does not take the option(s) given: {exc}") from None
        raise
