"""The peers a training step is timed against: PyTorch eager, JAX jit, scikit-learn.

Each builder returns a :class:`~bpgpu.bench.timing.Case` for the same net as
bpgpu's step (relu hidden, identity output, ½ Σ (y − t)² / m, SGD), already
called once (compiled, warm). Heavy imports happen inside the builders.
"""

from __future__ import annotations

import importlib.util
from itertools import pairwise

import numpy as np

from bpgpu.backend import Backend

from .configs import LEARNING_RATE
from .timing import Case

# implementation name: the module it needs
PEER_MODULES = {"torch_eager": "torch", "jax_jit": "jax", "sklearn": "sklearn"}


def available_peers() -> list[str]:
    """The peer implementations importable here (without importing them)."""
    return [impl for impl, mod in PEER_MODULES.items() if importlib.util.find_spec(mod) is not None]


def peer_device(backend: Backend, impl: str) -> str:
    """Where a peer runs: PyTorch on CUDA when the backend is CuPy and torch has CUDA."""
    if backend.device.startswith("cuda") and impl == "torch_eager":
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def torch_case(sizes, m: int, dtype: str, device: str = "cpu", lr: float = LEARNING_RATE) -> Case:
    """PyTorch eager: nn.Linear/ReLU, ½ Σ (y − t)² / m, backward, optim.SGD.step()."""
    import torch

    torch.manual_seed(0)
    tdt = getattr(torch, dtype)
    layers: list = []
    for l, (a, b) in enumerate(pairwise(sizes), start=1):
        layers.append(torch.nn.Linear(a, b, dtype=tdt, device=device))
        if l < len(sizes) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    X = torch.randn(m, sizes[0], dtype=tdt, device=device)
    T = torch.randn(m, sizes[-1], dtype=tdt, device=device)

    def step():
        opt.zero_grad()
        loss = 0.5 * torch.sum((model(X) - T) ** 2) / m
        loss.backward()
        opt.step()
        return loss.detach()

    case = Case(step, lambda loss: loss.item())
    case.finish(case.fn())
    return case


def jax_case(sizes, m: int, dtype: str, lr: float = LEARNING_RATE) -> Case:
    """JAX: value_and_grad and the SGD update in one jit-compiled function with the
    parameters donated; compiled before timing."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # float64 cases; explicit dtypes keep float32 as float32
    rng = np.random.default_rng(0)
    params = [
        (jnp.asarray(rng.standard_normal((a, b)) * np.sqrt(2.0 / a), dtype=dtype), jnp.zeros(b, dtype=dtype))
        for a, b in pairwise(sizes)
    ]
    X = jnp.asarray(rng.standard_normal((m, sizes[0])), dtype=dtype)
    T = jnp.asarray(rng.standard_normal((m, sizes[-1])), dtype=dtype)

    def loss_fn(params, X, T):
        a = X
        for l, (w, b) in enumerate(params, start=1):
            a = a @ w + b
            if l < len(params):
                a = jax.nn.relu(a)
        return 0.5 * jnp.sum((a - T) ** 2) / m

    def sgd(params, X, T):
        loss, grads = jax.value_and_grad(loss_fn)(params, X, T)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss

    update = jax.jit(sgd, donate_argnums=0)
    state = [params]

    def step():
        state[0], loss = update(state[0], X, T)
        return loss

    case = Case(step, lambda loss: loss.block_until_ready())
    case.finish(case.fn())
    return case


def sklearn_case(sizes, m: int, dtype: str, lr: float = LEARNING_RATE) -> Case:
    """scikit-learn's MLPRegressor(solver='sgd', momentum=0, alpha=0, batch_size=m):
    one ``partial_fit`` on m rows is exactly one SGD step (it includes sklearn's
    input validation and its own buffer allocation, which are part of its step)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((m, sizes[0])).astype(dtype)
    T = rng.standard_normal((m, sizes[-1])).astype(dtype)
    if sizes[-1] == 1:
        T = T.ravel()
    model = MLPRegressor(
        hidden_layer_sizes=tuple(sizes[1:-1]),
        activation="relu",
        solver="sgd",
        alpha=0.0,
        batch_size=m,
        learning_rate_init=lr,
        momentum=0.0,
        nesterovs_momentum=False,
        shuffle=False,
        random_state=0,
    )

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.partial_fit(X, T)

    case = Case(step)
    case.fn()
    return case
