"""The integer codes the compiled CPU kernels take, with no numba import.

:mod:`bpgpu.kernels.compiled` (numba) compiles against these names, and the callers that
describe a net to it (:mod:`bpgpu.kernels.jit`'s plan, the numpy backend's table
:mod:`bpgpu.kernels.cpu`) read them from here, so that building a plan or dispatching to the
kernels compiled ahead of time (:mod:`bpgpu.kernels.aot`) never imports numba.

    activation codes   the order of :data:`bpgpu.kernels.ACTIVATIONS`: g of layer l in the plan's CODE row
    loss codes         the order of :data:`bpgpu.kernels.LOSSES`: ℓ of the output layer
    update rules       what the training step applies after backprop (GRADIENT_ONLY: only ∂J/∂w)
    plan rows          SIZE n_l, OFFSET (where Θ(l + 1) starts in w), CODE (g of layer l)
"""

from bpgpu.kernels import LOSSES

IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, SOFTPLUS, SOFTMAX, EXP = range(8)
SQUARED_ERROR, BINARY_CROSS_ENTROPY, CROSS_ENTROPY, POISSON = range(4)
GRADIENT_ONLY, SGD, MOMENTUM, NESTEROV = range(4)  # the update applied after backprop
SIZE, OFFSET, CODE = range(3)  # the rows of train_step's plan
LOSS_CODE = {name: code for code, name in enumerate(LOSSES)}
