"""Cost functions J and the output delta δ(L) = ∂J/∂z(L).

Per sample n (the seeds' forms; ``reduction="mean"`` divides the sum by m):

    squared_error          J_n = ½ ‖a − t‖²                        canonical output: identity
    binary_cross_entropy   J_n = −Σ_k t_k log a_k + (1 − t_k) log(1 − a_k)   canonical: sigmoid
    cross_entropy          J_n = −Σ_k t_k log a_k                    canonical: softmax
    poisson                J_n = Σ_k t_k log(t_k / a_k) − t_k + a_k  canonical: exp (log link)
                           (half the Poisson deviance, scikit-learn's; 0 log 0 = 0; t ≥ 0)

For a canonical pair the link cancels and δ(L) = c (a − t) with c = 1/m or 1
(for exp + poisson: ∂J/∂z = e^z − t); the loss is then computed from the logits z,
so saturated outputs give exact, finite values. Every other pair uses
δ(L) = c ∂J/∂a ⊙ g′, with a clipped away from 0 and 1 inside the logarithms
(poisson: away from 0; ∂J/∂a = 1 − t/a).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bpgpu.activations import Activation
from bpgpu.kernels import LOSSES, generic

_CANONICAL = {
    "squared_error": "identity",
    "binary_cross_entropy": "sigmoid",
    "cross_entropy": "softmax",
    "poisson": "exp",
}


@dataclass(frozen=True)
class Loss:
    name: str

    @property
    def canonical_output(self) -> str:
        return _CANONICAL[self.name]

    @property
    def needs_probabilities(self) -> bool:
        return self.name in ("binary_cross_entropy", "cross_entropy")

    @property
    def needs_positive(self) -> bool:
        """The loss takes log a of a mean a > 0 (poisson)."""
        return self.name == "poisson"

    def is_canonical(self, output: Activation) -> bool:
        return output.name == self.canonical_output

    def check_targets(self, output: Activation, t: Any, xp: Any) -> None:
        """softmax + cross_entropy: δ(L) = a − t is the gradient of −Σ t log a only when
        every target row is a distribution (t ≥ 0, Σ_k t_k = 1); reject anything else
        rather than train on a gradient that does not belong to the loss. poisson: counts
        (or rates) t ≥ 0, as log t and the deviance are defined only there."""
        if self.name == "poisson":
            if bool(xp.any(t < 0)):
                raise ValueError(
                    f"T must be >= 0 for loss='poisson' (counts or rates), got a minimum of {float(xp.min(t)):g} "
                    f"(T.shape={tuple(t.shape)})"
                )
            return
        if not (self.name == "cross_entropy" and output.name == "softmax"):
            return
        tol = 1e-3 if t.dtype == xp.float32 else 1e-9
        sums = xp.sum(t, axis=1)
        bad = xp.logical_or(xp.abs(sums - 1.0) > tol, xp.any(t < 0, axis=1))
        if bool(xp.any(bad)):
            row = int(xp.argmax(xp.astype(bad, xp.int8)))
            raise ValueError(
                f"T must hold probability distributions (rows >= 0 that sum to 1) for loss='cross_entropy' "
                f"with a softmax output; row {row} sums to {float(sums[row]):.6g} (T.shape={tuple(t.shape)})"
            )

    def value_and_delta(self, ops: Any, output: Activation, z, a, t, c, delta, scratch, rows):
        """Return Σ_n J_n (unscaled, on the device) and write δ(L) into ``delta``."""
        if self.is_canonical(output):
            # the loss from the logits z and δ = c (a − t), fused into one pass where the backend can
            return ops.canonical_value_and_delta(self.name, z, a, t, c, delta, scratch, rows)
        total = getattr(ops, f"{self.name}_fwd")(a, t, scratch, rows)
        getattr(ops, f"{self.name}_bwd")(a, t, c, delta, scratch)  # c ∂J/∂a
        getattr(ops, output.bwd)(delta, a, delta, scratch, rows)  # ⊙ g′
        return total

    def row_values(self, output: Activation, z, a, t):
        """J_n for every sample n (a new array of shape (m,)), in the array API: the per-sample
        losses that weighted training sums as Σ_n s_n J_n. From the logits for a canonical pair,
        from the clipped probabilities otherwise, as :meth:`value_and_delta` computes their sum."""
        if self.is_canonical(output):
            return generic.ROWS_FROM_LOGITS[self.name](z, t)
        return getattr(generic, f"{self.name}_rows")(a, t)


def get(name: object, output: Activation, n_layers: int) -> Loss:
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    loss = Loss(name)
    if loss.needs_probabilities and not output.probabilistic:
        raise ValueError(
            f"loss={name!r} needs outputs in (0, 1), but the output activation of layer "
            f"{n_layers} is {output.name!r}; use 'sigmoid' or 'softmax' there"
        )
    if loss.needs_positive and not output.positive:
        raise ValueError(
            f"loss={name!r} needs outputs > 0 (its log a), but the output activation of layer {n_layers} "
            f"is {output.name!r}; use 'exp' (the canonical log link) or 'softplus' there"
        )
    return loss
