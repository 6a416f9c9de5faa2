"""The training-step configurations every implementation builds, and their flop counts."""

from __future__ import annotations

from itertools import pairwise

# name: (layer sizes, batch)
CONFIGS = {
    "tiny": ([2, 2, 2, 1], 1),
    "small": ([64, 32, 10], 32),
    "medium": ([784, 256, 256, 10], 128),
    "large": ([4096, 4096, 4096, 10], 512),
}
LEARNING_RATE = 0.01
STEP_NET = {"hidden": "relu", "output": "identity", "loss": "squared_error"}


def step_flops(sizes, m: int) -> int:
    """GEMM flops of one training step: per layer 2 m n_in n_out for the forward
    product and the weight gradient, and for every layer but the first one more
    for the delta sent back (elementwise work is not counted)."""
    return sum(2 * m * a * b * (2 if l == 1 else 3) for l, (a, b) in enumerate(pairwise(sizes), start=1))


def largest_layer(sizes) -> tuple[int, int]:
    return max(pairwise(sizes), key=lambda ab: ab[0] * ab[1])
