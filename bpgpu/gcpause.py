"""Pause CPython's cyclic garbage collector around an import storm (a cold start's one-time loads).

CPython runs a full collection whenever the objects that survived since the last one
exceed a quarter of all tracked objects. Importing numba and its first dispatch (which
imports all of numba's typing and lowering registries) make some 80,000 objects, all
alive for the rest of the process: with the collector on, they are walked by two full
collections and some 180 younger ones that free next to nothing. Paused, and ended by
one full collection (``collect=True``), the same objects are walked once: in a first
``MLPClassifier.fit`` the collector's CPU time fell from 0.16–0.17 s to 0.10–0.14 s
(benchmarks/NOTES.md, "E5. Cold start"). Nothing is frozen or exempted: after the block
the collector runs on its usual thresholds.

    with paused(collect=True):
        import numba   # no automatic collections in here, one full one at the end
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused(collect: bool = False) -> Iterator[None]:
    """No automatic cyclic collections inside the block; the collector's state is restored after
    it (left off if the caller had it off). Explicit ``gc.collect()`` calls still run.

    collect: end the block with one full collection (when the collector was on). Without it,
    the first allocations after the block run a generation-0, then a generation-1, then a
    full collection, each over all the objects the block made; with it, one pass over the
    process's objects does their work, and the next full collection waits until a quarter
    as many new objects again have survived.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            if collect:
                gc.collect()
