"""The compiled passes of bpgpu/kernels/compiled.py (the forward pass, seeded backprop) against
the engine's array path, float64 to 1e-12 relative, on random architectures and activations."""

import numpy as np
import pytest
from helpers import HIDDEN, OUTPUT
from hypothesis import given, settings
from hypothesis import strategies as st

import bpgpu as bp
from bpgpu import engine
from bpgpu.kernels import jit

compiled = pytest.importorskip("bpgpu.kernels.compiled", reason="numba is not installed: no compiled table")

architectures = st.tuples(
    st.lists(st.integers(1, 6), min_size=2, max_size=5),  # depth 1-4
    st.integers(1, 7),  # batch
    st.integers(1, 4),  # seeds
    st.integers(0, 2**31 - 1),
)


def relative(actual, expected):
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


@settings(max_examples=40, deadline=None)
@given(arch=architectures, data=st.data())
def test_forward_pass_and_seeded_backprop_match_the_engine(arch, data):
    sizes, m, K, seed = arch
    hidden = [data.draw(st.sampled_from(HIDDEN)) for _ in sizes[2:]]
    output = data.draw(st.sampled_from(OUTPUT))
    if output == "softmax":
        sizes = sizes[:-1] + [max(2, sizes[-1])]
    net = bp.MLP(sizes, hidden=hidden, output=output, dtype="float64", backend="numpy", epsilon=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, sizes[0]))
    plan = jit.plan(net, compiled)
    acts, slots = np.empty(compiled.activations_size(plan, m)), np.empty(2)
    z = acts[compiled.layer_start(plan, net.n_layers + 1, m) :].reshape(m, sizes[-1])
    a = compiled.forward_pass(X, net.params, plan, acts, z, slots)
    ws = net.workspace(m)
    expected = engine.forward(net, X, ws, net.params)
    assert relative(a, expected) <= 1e-12
    assert relative(z, ws.Z) <= 1e-12
    seeds = rng.normal(size=(K, m, sizes[-1]))
    rows, L = K * m, net.n_layers
    for sample_major in (False, True):
        deltas = np.full(compiled.layer_start(plan, L + 1, rows), np.nan)
        top = compiled.layer_start(plan, L, rows)
        deltas[top:] = (seeds.transpose(1, 0, 2) if sample_major else seeds).ravel()
        compiled.seeded_backprop(net.params, plan, acts, deltas, m, K, sample_major, slots)
        for l, D in engine.seeded_deltas(net, engine.layer_outputs(X, ws), seeds):
            start = compiled.layer_start(plan, l, rows)
            got = deltas[start : start + rows * sizes[l]]
            got = got.reshape(m, K, -1).transpose(1, 0, 2) if sample_major else got.reshape(K, m, -1)
            assert relative(got, D) <= 1e-12, (l, sample_major)
