"""The kernel tables: each equation once per language.

``compiled`` numba loops over one scalar definition of each g, g′, g″ and loss, plus the
            whole training step as one call (the numpy backend's table)
``cuda``     CuPy ElementwiseKernel / ReductionKernel bodies in CUDA C, created once and cached
``generic``  the array API standard only: the reference, and the table of any other
            namespace (array_api_strict, and numpy itself when numba is missing or broken)

All three modules export the same names with the same signatures; a caller
picks the module once through :func:`bpgpu.backend.resolve` (``backend.ops``)
and never branches on the backend itself. ``OPS`` lists the contract;
tests/test_tables.py holds every table's names, signatures and values against
the reference.
"""

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softplus", "softmax", "exp")
LOSSES = ("squared_error", "binary_cross_entropy", "cross_entropy", "poisson")
LEAKY_SLOPE = 0.01  # k of leaky_relu, max(z, k z)

OPS = (
    ("matmul", "colsum")
    + tuple(f"{g}_{d}" for g in ACTIVATIONS for d in ("fwd", "bwd"))
    + tuple(f"{j}_{d}" for j in LOSSES for d in ("fwd", "bwd"))
    + ("sigmoid_binary_cross_entropy_fwd", "softmax_cross_entropy_fwd", "exp_poisson_fwd", "canonical_value_and_delta")
    + ("sgd_update", "momentum_update", "nesterov_update", "adam_update", "l2_grad", "outer_sgd_update")
    + ("take_rows",)
)
