"""Activation functions g and their derivatives g′, by name.

Each entry names the fused kernels that apply it (``<name>_fwd`` computes
a = g(z + b) in one pass over the GEMM output; ``<name>_bwd`` computes the
delta-rule step δ(l) = (δ(l+1) Θ(l+1)) ⊙ g′(z(l)), with g′ written through the
stored output a, as scikit-learn does):

    identity    g = z                      g′ = 1
    sigmoid     g = 1 / (1 + e^{−z})       g′ = a (1 − a)
    tanh        g = tanh z                 g′ = 1 − a²
    relu        g = max(z, 0)              g′ = [a > 0]
    leaky_relu  g = max(z, 0.01 z)         g′ = 1 if a > 0 else 0.01
    softplus    g = log(1 + e^z)           g′ = σ(z) = 1 − e^{−a}
    softmax     a_k = e^{z_k} / Σ e^{z_j}  δ = a ⊙ (s − Σ_k s_k a_k)   (output layer only)
    exp         g = e^z                    g′ = a                  (output layer only: the log link
                                                                    of a Poisson regression)
"""

from __future__ import annotations

from dataclasses import dataclass

from bpgpu.kernels import ACTIVATIONS

HIDDEN = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softplus")
OUTPUT = ACTIVATIONS  # any hidden activation, plus softmax and exp
UNIT_INTERVAL = ("sigmoid", "softmax")  # outputs that are probabilities
POSITIVE = ("exp", "softplus", *UNIT_INTERVAL)  # outputs > 0: the means of a Poisson loss


@dataclass(frozen=True)
class Activation:
    name: str

    @property
    def fwd(self) -> str:
        return f"{self.name}_fwd"

    @property
    def bwd(self) -> str:
        return f"{self.name}_bwd"

    @property
    def probabilistic(self) -> bool:
        return self.name in UNIT_INTERVAL

    @property
    def positive(self) -> bool:
        return self.name in POSITIVE


def get(name: object, layer: int | None, is_output: bool) -> Activation:
    """Look up an activation for layer ``layer``, with an error naming both.

    layer=None checks a name that no layer uses (``hidden`` of a net without hidden
    layers): a misspelt name is an error all the same."""
    allowed = OUTPUT if is_output else HIDDEN
    if not isinstance(name, str) or name not in allowed:
        where = "output" if is_output else "hidden"
        for_layer = f"for layer {layer}" if layer is not None else "(given, though the net has no hidden layer)"
        raise ValueError(f"unknown {where} activation {name!r} {for_layer}; choose one of {', '.join(allowed)}")
    return Activation(name)
