"""bpgpu.kernels.recycle: a large result's memory is handed out again only once nothing that
can read it is left (the array, its views, memoryviews and other libraries' wrappers)."""

import gc

import numpy as np
import pytest

from bpgpu.kernels.recycle import RECYCLE_BYTES, Recycler

LARGE = (RECYCLE_BYTES // 8 // 1000 + 1, 1000)  # float64: just past RECYCLE_BYTES


def address(a):
    return a.__array_interface__["data"][0]


def float64_bytes(shape):
    return int(np.prod(shape)) * 8


def test_a_dropped_array_is_reused_and_a_held_one_is_not():
    recycler = Recycler()
    first = recycler.empty(LARGE, np.float64)
    assert first.shape == LARGE and first.dtype == np.float64 and first.flags.writeable and first.flags.c_contiguous
    where = address(first)
    held = recycler.empty(LARGE, np.float64)  # first is still alive: new memory
    assert address(held) != where
    del first
    assert recycler.held_bytes == float64_bytes(LARGE)
    again = recycler.empty(LARGE, np.float64)
    assert address(again) == where and recycler.held_bytes == 0
    del held
    assert recycler.held_bytes == float64_bytes(LARGE)  # one free buffer kept: held's
    recycler.clear()
    assert recycler.held_bytes == 0


@pytest.mark.parametrize(
    "keep",
    [
        lambda H: H[:10],
        lambda H: H.T,
        lambda H: np.asarray(H).reshape(-1),
        lambda H: memoryview(H),
        lambda H: np.frombuffer(memoryview(H), dtype=np.float64),
    ],
    ids=["rows", "transpose", "reshape", "memoryview", "frombuffer"],
)
def test_anything_that_can_read_the_memory_keeps_it_out_of_reuse(keep):
    recycler = Recycler()
    H = recycler.empty(LARGE, np.float64)
    H[:] = 7.0
    reader = keep(H)
    del H
    gc.collect()
    assert recycler.held_bytes == 0
    other = recycler.empty(LARGE, np.float64)
    other[:] = -1.0
    assert np.all(np.asarray(reader) == 7.0)
    del reader
    assert recycler.held_bytes == float64_bytes(LARGE)


def test_torch_wrapper_keeps_the_memory():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    recycler = Recycler()
    H = recycler.empty(LARGE, np.float64)
    H[:] = 3.0
    wrapped = torch.from_numpy(H)
    del H
    assert recycler.held_bytes == 0
    recycler.empty(LARGE, np.float64)[:] = -1.0
    assert bool((wrapped == 3.0).all())


def test_small_arrays_and_other_sizes():
    recycler = Recycler()
    small = recycler.empty((100, 100), np.float32)
    assert small.flags.owndata  # a plain np.empty
    del small
    assert recycler.held_bytes == 0
    big = recycler.empty(LARGE, np.float64)
    del big
    other = recycler.empty((LARGE[0] + 1, LARGE[1]), np.float64)  # another size: fresh memory, the free one dropped
    assert recycler.held_bytes == 0
    del other
    as32 = recycler.empty((2 * LARGE[0], LARGE[1]), np.float32)  # the same bytes in another dtype: reused
    assert as32.dtype == np.float32 and recycler.held_bytes == 0
