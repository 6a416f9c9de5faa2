"""Large result arrays whose memory is handed out again once the caller has dropped them.

The first write to each page of a fresh array makes the kernel zero it: for an exact Hessian
H (W, W) at W = 6,532 float64 (341 MB) that is about 20 ms of a 0.12 s ``bp.hessian`` call on
this project's 2-core host (benchmarks/NOTES.md, "H5", "H17"). A caller that computes one H
after another (Newton steps, curvature along a run) drops each before asking for the next; a
:class:`Recycler` then gives the next H the same, already faulted-in, memory.

Safety rests on who can still see the memory. The array handed out is a view of a *guard*: a
1-D array over a memoryview of the stored buffer. numpy records the guard as the ``base`` of
every view and copy-free derivative of the result (``H.T``, ``H[:10]``, ``np.asarray(H)``,
``memoryview(H)``, ``torch.from_numpy(H)``), and it does not collapse bases past the guard
because the guard's own base is not an ndarray. So the guard lives as long as anything that
can read the memory, and only its finalizer returns the buffer. Raw pointers
(``H.ctypes.data``) are, as always, valid only while H lives.

At most one free buffer is kept per recycler (one per net's compiled curvature tools), and
arrays under :data:`RECYCLE_BYTES` are plain ``np.empty``: small ones are cheap to fault in and
not worth holding.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import numpy as np

RECYCLE_BYTES = 1 << 25  # 32 MiB: far past the caches (as compiled.HESSIAN_STREAM_BYTES)


class Recycler:
    """``empty(shape, dtype)``: like ``np.empty``, but an array of RECYCLE_BYTES or more reuses
    the buffer of the last such array of the same byte size that every reader has dropped."""

    def __init__(self) -> None:
        self._free: tuple[int, np.ndarray] | None = None  # (nbytes, buffer): at most one
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes < RECYCLE_BYTES:
            return np.empty(shape, dtype=dtype)
        with self._lock:
            free, self._free = self._free, None
        # a free buffer of another size is dropped (returned to the system), not kept beside
        buffer = free[1] if free is not None and free[0] == nbytes else np.empty(nbytes, dtype=np.uint8)
        guard = np.frombuffer(memoryview(buffer), dtype=dtype, count=count)
        weakref.finalize(guard, self._release, nbytes, buffer)
        return guard.reshape(shape)

    def _release(self, nbytes: int, buffer: np.ndarray) -> None:
        with self._lock:
            self._free = (nbytes, buffer)

    @property
    def held_bytes(self) -> int:
        """Bytes of the free buffer kept for the next call (0 when none)."""
        free = self._free
        return 0 if free is None else free[0]

    def clear(self) -> None:
        """Drop the free buffer (its memory goes back to the system)."""
        with self._lock:
            self._free = None
