"""Per-sample gradients (docs/guide/second_order.rst): bpgpu.per_sample_gradients against torch.func's
vmap(grad) and JAX's jit(vmap(grad)) on the nets of the engine issue (tanh hidden,
identity output, ½‖y − t‖² per sample), CPU float64 and float32, one BLAS / intra-op thread
each, after checking that the three agree (float64 1e-9, float32 1e-4 relative to the largest entry).

    python -m pytest benchmarks/test_per_sample_gradients.py -q

The session summary prints each peer's time over bpgpu's.
"""

import numpy as np
import pytest

import bpgpu as bp
from bpgpu.bench import levenberg_marquardt as lm_cases

torch = pytest.importorskip("torch", reason="torch (extra 'peers') is a peer")
jax = pytest.importorskip("jax", reason="jax (extra 'peers') is a peer")

NETS = {"W161": ([8, 16, 1], 64), "W6532": ([32, 64, 64, 4], 128), "W26122": ([64, 128, 128, 10], 256)}


@pytest.fixture(autouse=True)
def one_thread():
    with lm_cases.one_thread():
        yield


AGREEMENT = {"float64": 1e-9, "float32": 1e-4}


def _setup(name, dtype="float64"):
    sizes, m = NETS[name]
    net = bp.MLP(sizes, hidden="tanh", output="identity", dtype=dtype, backend="numpy", init="glorot", seed=0)
    rng = np.random.default_rng(0)
    return net, rng.standard_normal((m, sizes[0])).astype(dtype), rng.standard_normal((m, sizes[-1])).astype(dtype)


def _loss_of(xp, tanh, sizes):
    """ℓ(w, x, t) for one sample on bpgpu's flat layout (block l = [b; Wᵀ] row-major)."""

    def loss(w, x, t):
        a, off = x, 0
        for l, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            block = xp.reshape(w[off : off + n_out * (n_in + 1)], (n_in + 1, n_out))
            z = a @ block[1:] + block[0]
            a = tanh(z) if l < len(sizes) - 1 else z
            off += n_out * (n_in + 1)
        return 0.5 * xp.sum((a - t) ** 2)

    return loss


def _case(impl, net, X, T):
    sizes = list(net.sizes)
    if impl == "bpgpu":
        return lambda: bp.per_sample_gradients(net, X, T)
    if impl == "torch_vmap_grad":
        from torch.func import grad, vmap

        f = vmap(grad(_loss_of(torch, torch.tanh, sizes)), in_dims=(None, 0, 0))
        w, Xt, Tt = (torch.from_numpy(np.asarray(a)) for a in (net.params, X, T))
        return lambda: f(w, Xt, Tt)
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    f = jax.jit(jax.vmap(jax.grad(_loss_of(jnp, jnp.tanh, sizes)), in_axes=(None, 0, 0)))
    w, Xj, Tj = (jnp.asarray(np.asarray(a)) for a in (net.params, X, T))
    return lambda: f(w, Xj, Tj).block_until_ready()


IMPLS = ("bpgpu", "torch_vmap_grad", "jax_jit_vmap_grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(NETS))
def test_per_sample_gradients(benchmark, record, name, dtype, impl):
    net, X, T = _setup(name, dtype)
    case = _case(impl, net, X, T)
    expected = bp.to_numpy(bp.per_sample_gradients(net, X, T))
    got = np.asarray(case())
    assert got.dtype == expected.dtype
    assert np.abs(got - expected).max() <= AGREEMENT[dtype] * np.abs(expected).max()
    benchmark.group = f"per-sample gradients {name} {dtype}"
    benchmark(case)
    record("lm", (f"per_sample {name} {dtype}", impl), benchmark)
