"""bpgpu: multilayer perceptrons trained by backpropagation on numpy or CuPy."""

from bpgpu.backend import Backend, gpu_status, resolve as resolve_backend, to_numpy
from bpgpu.network import MLP
from bpgpu.optim import Optimizer, make_optimizer
from bpgpu.training import DivergenceError, History, fit, train_step
from bpgpu.io import load, save

__version__ = "0.1.0"

__all__ = ["MLP", "Backend", "gpu_status", "resolve_backend", "to_numpy", "__version__",
           "fit", "train_step", "History", "DivergenceError", "Optimizer", "make_optimizer", "save", "load"]
