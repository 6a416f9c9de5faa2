"""Pause CPython's cyclic garbage collector around an import storm (a cold start's one-time loads).

CPython runs a full collection whenever the objects that survived since the last one
exceed a quarter of all tracked objects. Importing numba and its first dispatch (which
imports all of numba's typing and lowering registries) create some 100,000 objects, all
alive for the rest of the process, and so trigger full collections that walk every
object in the process (the caller's too) and free next to nothing: measured in
benchmarks/NOTES.md ("E5. Cold start"), the most of 0.4 s of a first fit's extra time
on a loaded machine. :func:`paused` skips them; afterwards the collector runs on
its usual thresholds, and the objects made meanwhile are examined by its next
collections like any others (nothing is frozen or exempted).

    with paused():
        import numba   # no collections in here
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """No automatic cyclic collections inside the block; the collector's state is restored after
    it (left off if the caller had it off). Explicit ``gc.collect()`` calls still run."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
