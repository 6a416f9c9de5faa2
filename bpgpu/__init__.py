"""bpgpu: multilayer perceptrons trained by backpropagation on numpy or CuPy."""

from bpgpu.backend import Backend, gpu_status, to_numpy
from bpgpu.backend import resolve as resolve_backend
from bpgpu.curvature import hessian_eigenvalues, hessian_trace
from bpgpu.derivatives import GradientCheck, check_gradient, hessian, hvp, jacobian, numerical_gradient
from bpgpu.io import load, save
from bpgpu.network import MLP
from bpgpu.optim import Optimizer, make_optimizer
from bpgpu.per_sample import per_sample_gradients
from bpgpu.training import DivergenceError, History, fit, train_step

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "Backend",
    "gpu_status",
    "resolve_backend",
    "to_numpy",
    "__version__",
    "GradientCheck",
    "check_gradient",
    "hessian",
    "hvp",
    "jacobian",
    "numerical_gradient",
    "hessian_eigenvalues",
    "hessian_trace",
    "per_sample_gradients",
    "Optimizer",
    "make_optimizer",
    "DivergenceError",
    "History",
    "fit",
    "train_step",
    "load",
    "save",
    "MLPClassifier",
    "MLPRegressor",
    "to_onnx",
]

# Names whose modules need an optional extra: imported on first use, so that
# ``import bpgpu`` never imports scikit-learn or onnx (public name -> its module).
_LAZY = {"MLPClassifier": "bpgpu.estimators", "MLPRegressor": "bpgpu.estimators", "to_onnx": "bpgpu.onnx_export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bpgpu' has no attribute {name!r}")
