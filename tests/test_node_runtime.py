"""The node runtime's garbage-collection policy: young cycles still collected, no automatic full collection
(its 20-50 ms stops were the bus benchmark's p99), the full collection run by the worker's own loop."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from congressctl.node import runtime


class Node:
    def __init__(self):
        self.other = self


@pytest.fixture
def gc_state():
    before = gc.get_threshold()
    generations: list[int] = []

    def note(phase, info):
        if phase == "stop":
            generations.append(info["generation"])
    gc.callbacks.append(note)
    yield generations
    gc.callbacks.remove(note)
    gc.unfreeze()
    gc.set_threshold(*before)


def test_young_cycles_are_collected_and_no_full_collection_runs_by_itself(gc_state):
    runtime.keep_full_gc_manual()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[2] == runtime.NO_AUTOMATIC_FULL_GC
    cycle = Node()
    gone = weakref.ref(cycle)
    del cycle
    gc_state.clear()
    kept = [[i] for i in range(400_000)]   # survivors: promoted, which is what triggered full collections
    assert gone() is None, "a young cycle must still be collected automatically"
    assert 0 in gc_state and 1 in gc_state
    assert 2 not in gc_state
    del kept


def test_the_worker_loop_runs_the_full_collection(gc_state):
    runtime.keep_full_gc_manual()
    gc_state.clear()

    async def run_for_a_moment():
        task = asyncio.get_running_loop().create_task(runtime.full_gc_loop(0.05))
        await asyncio.sleep(0.3)
        task.cancel()
    asyncio.run(run_for_a_moment())
    assert gc_state.count(2) >= 2
