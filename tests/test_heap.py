"""`settle_heap`, which each role calls once it is set up: what is alive then leaves the collector's reach."""

from __future__ import annotations

import gc

from workers.runtime import settle_heap


def test_settle_heap_moves_what_is_alive_out_of_the_collectors_reach() -> None:
    kept = [[i] for i in range(10_000)]  # alive before: frozen with the rest
    before = len(gc.get_objects())
    assert before > len(kept)
    settle_heap()
    try:
        frozen, left = gc.get_freeze_count(), len(gc.get_objects())
        assert frozen >= len(kept) and left < before // 10, (frozen, left, before)
        # What is made afterwards is the collector's as before: a cycle made now is still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()  # the other tests' process is not a served one
    assert len(gc.get_objects()) >= before - 100 and kept
