"""The flat parameter vector w: where each Θ(l) lives in it, and views into it.

Notation (docs/guide/feedforward.rst): layer l maps a(l−1) (n_{l−1} wide) to a(l) (n_l wide),
z(l) = Θ(l) a(l−1) with a_0 = 1. Θ(l) is (n_l, n_{l−1} + 1), column 0 the bias
θ_j0. All Θ(l) live in one flat vector w of length W = Σ_l n_l (n_{l−1} + 1)
(the seeds' "single vector w"); block l starts at ``offsets[l − 1]`` and is
Θ(l) stored column-major:

    w[offsets[l−1] : offsets[l−1] + n_l]          b(l) = Θ(l)[:, 0]
    w[offsets[l−1] + n_l : offsets[l]]            Wᵀ(l), C-contiguous (n_{l−1}, n_l)

so the bias slice is contiguous and the weight block, read row-major, is Wᵀ(l),
an ordinary matrix BLAS takes with no copy (a batch is row-major:
Z(l) = A(l−1) Wᵀ(l) + b(l)). Every vector "in the params layout" (gradients,
directions v of H v, optimizer state) has this layout too.

This module is the one owner of that layout: nobody else computes an offset.

    layout = Layout([n0, n1, ..., nL])
    layout.n_params, layout.offsets
    layout.theta(vec, l)         Θ(l) view, (n_l, n_{l−1} + 1)
    layout.wt(vec, l)            Wᵀ(l) view, (n_{l−1}, n_l)
    layout.bias(vec, l)          b(l) view, (n_l,)
    layout.weights(vec, l)       the weight block as a flat view, (n_l n_{l−1},)
    layout.split(V, l)           a stack V (k, W) split into b (k, n_l) and Wᵀ (k, n_{l−1}, n_l)
    layout.index(i)              flat index i → (l, j, k) with w_i = Θ(l)[j, k]
    layout.weight_mask()         1 on every θ_jk (k ≥ 1), 0 on every bias, host float64 (W,)

Views are taken with the namespace of the vector they view (numpy for numpy
arrays, the backend's namespace otherwise), so writing into a view writes into
the flat vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np


def _namespace(vec: Any) -> Any:
    return np if isinstance(vec, np.ndarray) else array_api_compat.array_namespace(vec)


class Layout:
    """Offsets and views of the flat vector w for layer sizes [n0, n1, ..., nL].

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first (already validated).

    Attributes
    ----------
    sizes : tuple of int
    n_layers : int
        L.
    offsets : list of int, length L + 1
        Block l of w is ``w[offsets[l − 1]:offsets[l]]``; ``offsets[L]`` is W.
    n_params : int
        W, the length of w.
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = tuple(int(n) for n in sizes)
        self.n_layers = len(self.sizes) - 1
        self.offsets = np.cumsum([0] + [n * (k + 1) for k, n in zip(self.sizes, self.sizes[1:])]).tolist()
        self.n_params = self.offsets[-1]

    def block(self, vec: Any, l: int) -> Any:
        """Θ(l)'s block of a flat vector, shape (n_l (n_{l−1} + 1),): a view."""
        return vec[self.offsets[l - 1] : self.offsets[l]]

    def theta(self, vec: Any, l: int) -> Any:
        """Θ(l) of a flat vector ``vec`` (W,) as a view of shape (n_l, n_{l−1} + 1), column 0 the bias."""
        n_in, n_out = self.sizes[l - 1], self.sizes[l]
        return _namespace(vec).reshape(self.block(vec, l), (n_in + 1, n_out)).T

    def wt(self, vec: Any, l: int, xp: Any = None) -> Any:
        """Wᵀ(l) of a flat vector: a C-contiguous view of shape (n_{l−1}, n_l).

        ``xp``: the vector's namespace, when the caller has it (saves the lookup in hot loops).
        """
        n_in, n_out = self.sizes[l - 1], self.sizes[l]
        xp = _namespace(vec) if xp is None else xp
        return xp.reshape(vec[self.offsets[l - 1] + n_out : self.offsets[l]], (n_in, n_out))

    def bias(self, vec: Any, l: int) -> Any:
        """b(l) = Θ(l)[:, 0] of a flat vector: a contiguous view of shape (n_l,)."""
        start = self.offsets[l - 1]
        return vec[start : start + self.sizes[l]]

    def weights(self, vec: Any, l: int) -> Any:
        """The weight block of Θ(l) (every θ_jk with k ≥ 1) as a flat contiguous view, (n_l n_{l−1},)."""
        return vec[self.offsets[l - 1] + self.sizes[l] : self.offsets[l]]

    def split(self, V: Any, l: int, xp: Any = None) -> tuple[Any, Any]:
        """Layer l of a stack of flat vectors V (k, W): b (k, n_l) and Wᵀ (k, n_{l−1}, n_l), views."""
        n_in, n_out = self.sizes[l - 1], self.sizes[l]
        xp = _namespace(V) if xp is None else xp
        block = xp.reshape(V[:, self.offsets[l - 1] : self.offsets[l]], (V.shape[0], n_in + 1, n_out))
        return block[:, 0, :], block[:, 1:, :]

    def join(self, blocks: Sequence[tuple[Any, Any]], xp: Any) -> Any:
        """The inverse of :meth:`split`: per-layer (b (k, n_l), Wᵀ (k, n_{l−1}, n_l)) for l = 1..L
        joined into one stack of flat vectors (k, W) (a new array)."""
        k = blocks[0][0].shape[0]
        parts = [xp.reshape(xp.concat([b[:, None, :], wt], axis=1), (k, -1)) for b, wt in blocks]
        return xp.concat(parts, axis=1)

    def index(self, i: int) -> tuple[int, int, int]:
        """Flat index i → (l, j, k) with w_i = Θ(l)[j, k] (row j, column k; k = 0 the bias)."""
        if 0 <= i < self.n_params:
            for l in range(1, self.n_layers + 1):
                if i < self.offsets[l]:
                    column, row = divmod(i - self.offsets[l - 1], self.sizes[l])
                    return l, row, column
        raise IndexError(f"parameter index {i} out of range for n_params={self.n_params}")

    def weight_mask(self) -> np.ndarray:
        """1.0 on every weight θ_jk (k ≥ 1), 0.0 on every bias θ_j0: a host float64 vector (W,)."""
        mask = np.ones(self.n_params)
        for l in range(1, self.n_layers + 1):
            self.bias(mask, l)[...] = 0.0
        return mask


__all__ = ["Layout"]
