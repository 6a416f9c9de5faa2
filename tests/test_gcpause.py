"""bpgpu.gcpause.paused: no automatic collections inside, the collector's state restored after."""

import gc

import pytest

from bpgpu.gcpause import paused


def test_paused_turns_the_collector_off_and_back_on():
    assert gc.isenabled()
    with paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_paused_restores_the_collector_after_an_exception():
    with pytest.raises(ZeroDivisionError), paused():
        1 / 0  # noqa: B018
    assert gc.isenabled()


def test_paused_leaves_a_collector_the_caller_turned_off_off():
    gc.disable()
    try:
        with paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_nested_pauses_restore_the_outer_state():
    with paused():
        with paused():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()


def test_loading_the_compiled_table_and_the_estimators_leaves_the_collector_on():
    import bpgpu
    from bpgpu.kernels import jit

    jit.kernels()
    pytest.importorskip("sklearn")
    assert bpgpu.MLPClassifier is not None
    assert gc.isenabled()


def test_collect_frees_the_cycles_made_in_the_block():
    import weakref

    class Node:
        pass

    with paused(collect=True):
        node = Node()
        node.self = node  # a reference cycle: only the cyclic collector frees it
        alive = weakref.ref(node)
        del node
        assert alive() is not None  # no automatic collection inside the block
    assert alive() is None
