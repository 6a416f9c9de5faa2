"""bpgpu: multilayer perceptrons trained by backpropagation on numpy or CuPy."""

from bpgpu.backend import Backend, gpu_status, resolve as resolve_backend, to_numpy
from bpgpu.network import MLP

__version__ = "0.1.0"

__all__ = ["MLP", "Backend", "gpu_status", "resolve_backend", "to_numpy", "__version__"]
