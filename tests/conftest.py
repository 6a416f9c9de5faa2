import os

import pytest
from hypothesis import HealthCheck, settings

# CI runs on 2 shared cores: no per-example deadline, a fixed number of examples.
settings.register_profile(
    "ci", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, max_examples=15)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(params=["numpy path", "compiled step"])
def step_path(request, monkeypatch):
    """Run a training test on both CPU step implementations: the engine's kernel-by-kernel
    passes (the reference, bit-exact; the one-call compiled gradient is off too) and numba's
    compiled step (skipped without numba)."""
    from bpgpu.kernels import jit

    if request.param == "numpy path":
        monkeypatch.setattr(jit, "train_step_for", lambda net, optimizer: None)
        monkeypatch.setattr(jit, "gradient_for", lambda net: None)
    elif not jit.available():
        pytest.skip("numba is not installed (extra 'jit'), so there is no compiled step")
    return request.param


@pytest.fixture
def numpy_path(monkeypatch):
    """Force the kernel-by-kernel passes (no one-call compiled step or gradient)."""
    from bpgpu.kernels import jit

    monkeypatch.setattr(jit, "train_step_for", lambda net, optimizer: None)
    monkeypatch.setattr(jit, "gradient_for", lambda net: None)
