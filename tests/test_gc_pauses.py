"""`workers.gc_pauses`: the collector's pauses are summed and the longest kept; startup objects
are frozen out of later collections, unless `PDSERVE_GC_FREEZE=0`."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from workers.gc_pauses import GcPauses, freeze_startup_objects

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's objects go back to the collected generations


def test_pauses_are_summed_and_the_longest_kept() -> None:
    pauses = GcPauses().install()
    try:
        junk = [[i] for i in range(200_000)]  # a full collection has these to walk
        gc.collect()
        first = pauses.seconds
        del junk
        gc.collect()
    finally:
        pauses.uninstall()
    assert 0 < first < pauses.seconds
    assert 0 < pauses.longest_s <= pauses.seconds
    seconds = pauses.seconds
    gc.collect()  # uninstalled: not counted
    assert pauses.seconds == seconds
    pauses.uninstall()  # idempotent


def test_freezing_exempts_live_objects_and_can_be_turned_off(unfrozen, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_GC_FREEZE", "0")
    assert freeze_startup_objects("test") == 0 and gc.get_freeze_count() == 0
    monkeypatch.delenv("PDSERVE_GC_FREEZE")
    kept = [[i] for i in range(10_000)]
    frozen = freeze_startup_objects("test")
    # (Other threads of the test process may free frozen objects meanwhile.)
    assert frozen >= len(kept) and gc.get_freeze_count() >= len(kept)
    collected = {id(o) for o in gc.get_objects()}  # the three generations, not the frozen
    assert not any(id(x) in collected for x in kept)
    gc.unfreeze()
    assert id(kept[0]) in {id(o) for o in gc.get_objects()}
