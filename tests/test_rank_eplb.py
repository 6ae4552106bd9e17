"""`RankEplb.abort` against an `execute` that arms meanwhile: nothing stays armed once the
abort returns (a stub rebalancer; the phases themselves are tested in test_eplb_service)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from typing import Any

import pytest

from workers.engine.rank_eplb import RankEplb

pytestmark = pytest.mark.timeout(30)


class _Rebalancer:
    def __init__(self) -> None:
        self.stage = "prepared"

    def abort(self) -> None:
        self.stage = "idle"

    def execute(self) -> str:
        if self.stage != "prepared":
            raise RuntimeError(f"rebalance phase out of order: the rank is {self.stage}")
        self.stage = "idle"
        return "executed"


class _FifoLock:
    """A lock taken in the order it was asked for (threading.Lock promises no order)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0
        self.waiting = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self.waiting += 1
            self._cond.wait_for(lambda: self._serving == ticket)
            self.waiting -= 1

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def test_an_abort_leaves_nothing_armed_by_an_execute_that_came_first():
    """The phase lock is busy (a phase runs); an execute, then an abort, wait for it. The
    execute arms, then the abort drops it: no agreement offers it afterwards, and the execute
    call ends. (Found by an audit: the abort looked for an armed execute before it waited,
    found none, and left the one armed meanwhile to fire with the next rebalance.)"""
    r = RankEplb.__new__(RankEplb)
    r.engine, r.rebalancer, r._wake = None, _Rebalancer(), lambda: None  # type: ignore[assignment]
    r._phase_lock = _FifoLock()  # type: ignore[assignment]
    r._swap_lock = threading.Lock()
    r._swap = r._offered = None
    r._faults = Counter()
    outcome: dict[str, Any] = {}

    def execute() -> None:
        try:
            outcome["execute"] = r.execute(10.0)
        except (Exception, concurrent.futures.CancelledError) as e:
            outcome["execute"] = type(e).__name__

    lock = r._phase_lock
    with lock:  # a phase running
        executing = threading.Thread(target=execute)
        executing.start()
        while lock.waiting < 1:
            time.sleep(0.001)
        aborting = threading.Thread(target=r.abort)
        aborting.start()
        time.sleep(0.05)  # (the abort reaches the lock, or what it did before it)
    aborting.join(10)
    executing.join(10)
    assert r.rebalancer.stage == "idle"  # type: ignore[union-attr]
    assert r._swap is None and not r.offer_swap()
    r.end_offer()
    assert outcome["execute"] == "CancelledError"
