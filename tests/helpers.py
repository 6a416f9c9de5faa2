"""Test helpers written independently of the library's own derivative code."""

import numpy as np

import bpgpu as bp
from bpgpu.activations import HIDDEN, OUTPUT

# Every (output activation, loss) pair the library accepts: squared error with
# any output; the cross-entropies with the probabilistic outputs; poisson with its
# canonical exp and with softplus (positive outputs: sigmoid/softmax are accepted too).
OUTPUT_LOSS_PAIRS = (
    [(g, "squared_error") for g in OUTPUT]
    + [(g, loss) for g in ("sigmoid", "softmax") for loss in ("binary_cross_entropy", "cross_entropy")]
    + [(g, "poisson") for g in ("exp", "softplus")]
)


def central_difference_gradient(net, X, T, h=1e-3):
    """dJ/dw_i by the fourth-order central stencil, one parameter at a time (float64):

    (−J(w + 2h e_i) + 8 J(w + h e_i) − 8 J(w − h e_i) + J(w − 2h e_i)) / 12h

    Its truncation error is O(h⁴), so a step large enough to keep rounding
    error near 1e-12 still resolves a 1e-6 relative check.
    """
    w0 = np.array(net.params, dtype=np.float64, copy=True)
    grad = np.empty_like(w0)

    def loss_at(i, step):
        w = w0.copy()
        w[i] += step
        net.set_params(w)
        return net.loss(X, T)

    for i in range(w0.size):
        grad[i] = (-loss_at(i, 2 * h) + 8 * loss_at(i, h) - 8 * loss_at(i, -h) + loss_at(i, -2 * h)) / (12 * h)
    net.set_params(w0)
    return grad


def targets_for(loss, output, m, n, rng):
    """Targets in the loss's domain: one-hot rows for softmax cross-entropy, counts for poisson,
    (0, 1) otherwise."""
    if loss == "squared_error":
        return rng.normal(size=(m, n))
    if loss == "poisson":
        return rng.poisson(1.5, size=(m, n)).astype(float)
    if loss == "cross_entropy" and output == "softmax":
        return np.eye(n)[rng.integers(0, n, size=m)]
    return rng.uniform(0.05, 0.95, size=(m, n))


def random_problem(sizes, hidden="tanh", output="identity", loss="squared_error", reduction="mean", seed=0, m=8):
    """(net, X, T, rng): a float64 numpy net with parameters in U[−1, 1] (large enough that every
    activation's curvature shows), m random inputs and targets in the loss's domain; a softmax
    output gets at least 2 units (it is constant on one)."""
    if output == "softmax" and sizes[-1] == 1:
        sizes = list(sizes[:-1]) + [2]
    net = bp.MLP(
        sizes,
        hidden=hidden,
        output=output,
        loss=loss,
        reduction=reduction,
        dtype="float64",
        backend="numpy",
        init="uniform",
        epsilon=1.0,
        seed=seed,
    )
    rng = np.random.default_rng(seed + 1)
    X = rng.normal(size=(m, sizes[0]))
    return net, X, targets_for(loss, output, m, net.sizes[-1], rng), rng


__all__ = ["HIDDEN", "OUTPUT_LOSS_PAIRS", "central_difference_gradient", "random_problem", "targets_for"]


KINKED = ("relu", "leaky_relu")  # a difference step must not cross the kink at z = 0


def kink_margin(net, X):
    """min |z| over the units with a kinked activation, by an independent numpy forward pass."""
    g = {
        "identity": lambda z: z,
        "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
        "tanh": np.tanh,
        "relu": lambda z: np.maximum(z, 0),
        "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
        "softplus": lambda z: np.logaddexp(z, 0),
        "exp": np.exp,
        "softmax": lambda z: (
            np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
        ),
    }
    a, margin = np.asarray(X, dtype=np.float64), np.inf
    for l, act in enumerate(net.activations, start=1):
        theta = np.asarray(net.theta(l), dtype=np.float64)
        z = a @ theta[:, 1:].T + theta[:, 0]
        if act.name in KINKED:
            margin = min(margin, float(np.abs(z).min()))
        a = g[act.name](z)
    return margin
