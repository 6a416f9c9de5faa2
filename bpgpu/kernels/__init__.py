"""Fused elementwise kernels, each twice: a numpy twin and a CuPy twin.

``cpu``     numpy ufuncs with ``out=``, in place (the CPU path)
``cuda``    CuPy ElementwiseKernel / ReductionKernel, created once and cached
``generic`` the array API standard only (array_api_strict and other namespaces)

All three modules export the same names with the same signatures; a caller
picks the module once through :func:`bpgpu.backend.resolve` (``backend.ops``)
and never branches on the backend itself. ``OPS`` lists the contract.
"""

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softplus", "softmax", "exp")
LOSSES = ("squared_error", "binary_cross_entropy", "cross_entropy", "poisson")

OPS = (
    ("matmul", "colsum")
    + tuple(f"{g}_{d}" for g in ACTIVATIONS for d in ("fwd", "bwd"))
    + tuple(f"{j}_{d}" for j in LOSSES for d in ("fwd", "bwd"))
    + ("sigmoid_binary_cross_entropy_fwd", "softmax_cross_entropy_fwd", "exp_poisson_fwd", "canonical_value_and_delta")
    + ("sgd_update", "momentum_update", "nesterov_update", "adam_update", "l2_grad", "outer_sgd_update")
    + ("take_rows",)
)
