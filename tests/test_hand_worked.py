"""A 2-2-1 sigmoid network worked by hand (scalar arithmetic, the equations of
docs/guide/feedforward.rst and backprop.rst).

x = (0.05, 0.10), t = 0.01, squared error ½(a − t)², reduction "sum" (m = 1).
Θ(1) = [[0.35, 0.15, 0.20], [0.35, 0.25, 0.30]], Θ(2) = [[0.60, 0.40, 0.45]] (column 0: bias).
"""

import numpy as np
import pytest

import bpgpu as bp
from bpgpu import engine

X = np.array([[0.05, 0.10]])
T = np.array([[0.01]])

# z(2) = Θ(2)·(1, a(1)): 0.35 + 0.15·0.05 + 0.20·0.10, ...
Z1 = [0.3775, 0.3925]
A1 = [0.5932699921071872, 0.596884378259767]  # σ(z)
Z2 = 1.1059059670597702  # 0.60 + 0.40·a1 + 0.45·a2
A2 = 0.7513650695523157
J = 0.274811083176155  # ½(0.75136507 − 0.01)²
D2 = 0.13849856162855695  # (a − t)·a(1 − a)
D1 = [0.013367920422887458, 0.014996075488896851]  # θ(2)_j·δ(2)·a_j(1 − a_j)
G2 = [[0.13849856162855695, 0.08216704056423077, 0.08266762784753325]]  # δ(2)·(1, a(1))
G1 = [
    [0.013367920422887458, 0.000668396021144373, 0.001336792042288746],
    [0.014996075488896851, 0.0007498037744448426, 0.0014996075488896852],
]


@pytest.fixture
def net():
    net = bp.MLP(
        [2, 2, 1],
        hidden="sigmoid",
        output="sigmoid",
        loss="squared_error",
        reduction="sum",
        dtype="float64",
        backend="numpy",
    )
    net.theta(1)[...] = [[0.35, 0.15, 0.20], [0.35, 0.25, 0.30]]
    net.theta(2)[...] = [[0.60, 0.40, 0.45]]
    return net


def test_every_intermediate(net):
    ws = net.workspace(1)
    # Forward afresh, then backward, reading every buffer the passes filled.
    engine.forward(net, X, ws, net.params)
    np.testing.assert_allclose(ws.A[1], [A1], rtol=1e-14)
    np.testing.assert_allclose(ws.Z, [[Z2]], rtol=1e-14)
    np.testing.assert_allclose(ws.A[2], [[A2]], rtol=1e-14)
    assert float(engine.backward(net, X, T, ws, net.params, ws.grad)) == pytest.approx(J, rel=1e-14)
    np.testing.assert_allclose(ws.D[2], [[D2]], rtol=1e-13)
    np.testing.assert_allclose(ws.D[1], [D1], rtol=1e-13)
    np.testing.assert_allclose(net.theta(2, ws.grad), G2, rtol=1e-13)
    np.testing.assert_allclose(net.theta(1, ws.grad), G1, rtol=1e-13)


def test_public_api_gives_the_same_numbers(net):
    np.testing.assert_allclose(net.forward(X), [[A2]], rtol=1e-14)
    assert net.loss(X, T) == pytest.approx(J, rel=1e-14)
    J_, g = net.loss_and_gradient(X, T)
    assert J_ == pytest.approx(J, rel=1e-14)
    np.testing.assert_allclose(net.theta(1, g), G1, rtol=1e-13)
    np.testing.assert_allclose(net.theta(2, g), G2, rtol=1e-13)
    # the pre-activations of layer 1, from the parameters directly
    np.testing.assert_allclose(X @ net.theta(1)[:, 1:].T + net.theta(1)[:, 0], [Z1], rtol=1e-14)
