"""The flat layout of w (bpgpu.layout): offsets, views, stacks and flat indices."""

import array_api_strict
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpgpu as bp
from bpgpu.layout import Layout

sizes_strategy = st.lists(st.integers(1, 5), min_size=2, max_size=5)


@settings(max_examples=40, deadline=None)
@given(sizes_strategy)
def test_blocks_tile_w_in_order_with_theta_column_major(sizes):
    layout = Layout(sizes)
    w = np.arange(layout.n_params, dtype=np.float64)
    assert layout.offsets[0] == 0 and layout.offsets[-1] == layout.n_params
    for l in range(1, len(sizes)):
        n_in, n_out = sizes[l - 1], sizes[l]
        theta = layout.theta(w, l)
        assert theta.shape == (n_out, n_in + 1)
        # column-major: element (j, k) sits at offset + k n_l + j
        j, k = np.meshgrid(np.arange(n_out), np.arange(n_in + 1), indexing="ij")
        np.testing.assert_array_equal(theta, layout.offsets[l - 1] + k * n_out + j)
        np.testing.assert_array_equal(layout.bias(w, l), theta[:, 0])
        np.testing.assert_array_equal(layout.wt(w, l), theta[:, 1:].T)
        assert layout.wt(w, l).flags.c_contiguous
        np.testing.assert_array_equal(layout.weights(w, l), layout.wt(w, l).ravel())


@settings(max_examples=40, deadline=None)
@given(sizes_strategy)
def test_index_inverts_theta_for_every_parameter(sizes):
    layout = Layout(sizes)
    w = np.arange(layout.n_params, dtype=np.float64)
    for i in range(layout.n_params):
        l, j, k = layout.index(i)
        assert layout.theta(w, l)[j, k] == i
    for bad in (-1, layout.n_params):
        with pytest.raises(IndexError, match="out of range"):
            layout.index(bad)


@settings(max_examples=40, deadline=None)
@given(sizes_strategy, st.integers(1, 3))
def test_split_and_join_are_inverse_on_stacks(sizes, k):
    layout = Layout(sizes)
    V = np.random.default_rng(0).normal(size=(k, layout.n_params))
    parts = [layout.split(V, l) for l in range(1, len(sizes))]
    for l, (b, wt) in enumerate(parts, start=1):
        for r in range(k):
            np.testing.assert_array_equal(b[r], layout.bias(V[r], l))
            np.testing.assert_array_equal(wt[r], layout.wt(V[r], l))
    np.testing.assert_array_equal(layout.join(parts, np), V)


def test_views_write_through_on_numpy_and_array_api_strict():
    for xp in (np, array_api_strict):
        layout = Layout([2, 3, 1])
        w = xp.zeros(layout.n_params, dtype=xp.float64)
        layout.wt(w, 2)[1, 0] = 5.0
        layout.bias(w, 1)[...] = 1.0
        assert float(layout.theta(w, 2)[0, 2]) == 5.0
        assert float(xp.sum(w)) == 5.0 + 3.0


def test_weight_mask_is_zero_on_biases_only():
    layout = Layout([3, 4, 2])
    mask = layout.weight_mask()
    for l in (1, 2):
        assert np.all(layout.theta(mask, l)[:, 0] == 0.0)
        assert np.all(layout.theta(mask, l)[:, 1:] == 1.0)


def test_the_net_uses_its_layout():
    net = bp.MLP([3, 4, 2], backend="numpy", seed=0)
    assert net.n_params == net.layout.n_params
    np.testing.assert_array_equal(net.theta(2), net.layout.theta(net.params, 2))
    assert np.shares_memory(net.theta(1), net.params)
