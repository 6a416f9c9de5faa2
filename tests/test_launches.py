"""Kernel launches of one GPU training step, counted without a GPU (benchmarks/NOTES.md, N4).

network.py and training.py call ``backend.ops`` and never branch on the
backend, so the numpy path runs the same sequence of ops as the CuPy path. On
CuPy each op launches the kernels ``cuda.OP_KERNELS`` lists for it, and
``matmul`` is one cuBLAS GEMM. Recording the ops of a step on numpy therefore
counts what a CuPy step launches; a profiler on a GPU box (scripts/gpu-check.sh)
would see the same numbers.
"""

import collections
import dataclasses
import types

import numpy as np
import pytest

import bpgpu as bp
from bpgpu import optim
from bpgpu.kernels import OPS, cpu
from bpgpu.training import train_step

GEMM = "matmul"


def recording(net):
    """Route ``net``'s ops through a recorder; returns the list the calls are appended to."""
    calls = []

    def wrap(name):
        def op(*args, **kwargs):
            calls.append(name)
            return getattr(cpu, name)(*args, **kwargs)

        return op

    net.backend = dataclasses.replace(net.backend, ops=types.SimpleNamespace(**{name: wrap(name) for name in OPS}))
    return calls


@pytest.mark.parametrize("sizes", [[8, 6, 5, 3], [4, 7, 2], [5, 3]])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_one_step_launches_per_layer_3_gemms_2_fused_kernels_1_column_sum(sizes, optimizer, numpy_path):
    net = bp.MLP(sizes, hidden="relu", output="identity", loss="squared_error", backend="numpy", seed=0)
    opt = optim.make_optimizer(optimizer, net, 0.1)
    rng = np.random.default_rng(0)
    X, T = net.check_inputs(rng.standard_normal((16, sizes[0])), rng.standard_normal((16, sizes[-1])))
    train_step(net, X, T, opt)  # workspaces and optimizer state exist before counting
    calls = recording(net)
    train_step(net, X, T, opt)

    L = net.n_layers
    counts = collections.Counter(calls)
    fwd = sum(n for op, n in counts.items() if op.endswith("_fwd"))
    bwd = sum(n for op, n in counts.items() if op.endswith("_bwd"))
    # per layer: forward GEMM, weight-gradient GEMM, and (above layer 1) the GEMM sending δ down
    assert counts[GEMM] == 3 * L - 1
    assert fwd == L and bwd == L - 1  # one fused bias + activation kernel forward, one s ⊙ g′ backward
    assert counts["colsum"] == L  # the bias gradient Σ_n δ_n: a column-sum reduction per layer
    assert counts["canonical_value_and_delta"] == 1  # loss and δ(L) in one kernel for the canonical pair
    assert counts[f"{optimizer}_update"] == 1  # one optimizer kernel over the flat parameter vector
    assert len(calls) == (3 * L - 1) + (2 * L - 1) + L + 2


def test_every_recorded_op_launches_what_the_cuda_table_says():
    """The count above is in ops; each op here is one CUDA launch (or one cuBLAS call)."""
    from bpgpu.kernels import cuda

    for op in ("relu_fwd", "identity_fwd", "relu_bwd", "colsum", "sgd_update", "momentum_update", "adam_update"):
        assert len(cuda.OP_KERNELS[op]) == 1, op
    assert cuda.OP_KERNELS[GEMM] == ()  # cuBLAS, not one of ours
    # canonical_value_and_delta launches the one kernel of its pair (softmax's adds two row reductions)
    assert "squared_error_value_and_delta" in cuda.OP_KERNELS["canonical_value_and_delta"]
