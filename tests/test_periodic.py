"""`orchestrator.periodic.Periodic`, the loop of the router's watches: a look every
interval, a failing look logged once until one works again, never the end of the watch."""

from __future__ import annotations

import asyncio
import logging

import pytest

from orchestrator.periodic import Periodic

pytestmark = pytest.mark.timeout(60)


class _Watch(Periodic):
    failure = "looking failed"

    def __init__(self, outcomes: list[bool], look_at_start: bool = False):
        self.interval_s = 0.01
        self.look_at_start = look_at_start
        self.outcomes = outcomes  # each look's: True works, False raises
        self.looks = 0
        self.done = asyncio.Event()

    async def look(self) -> None:
        self.looks += 1
        if self.looks >= len(self.outcomes):
            self.done.set()
        if not self.outcomes[min(self.looks, len(self.outcomes)) - 1]:
            raise RuntimeError(f"look {self.looks} broke")


def test_a_failing_look_is_logged_once_and_the_watch_goes_on(caplog):
    async def run() -> _Watch:
        watch = _Watch([False, False, True, False, True])
        watch.start()
        await asyncio.wait_for(watch.done.wait(), 10)
        await watch.stop()
        return watch

    with caplog.at_level(logging.WARNING, logger=__name__):
        watch = asyncio.run(run())
    said = [r.getMessage() for r in caplog.records if r.name == __name__]
    assert said == ["looking failed: look 1 broke", "looking failed: look 4 broke"], said
    assert watch.looks >= 5 and watch._task is None


def test_the_first_look_comes_at_start_or_an_interval_after():
    async def first_look(look_at_start: bool, interval_s: float) -> int:
        watch = _Watch([True], look_at_start)
        watch.interval_s = interval_s
        watch.start()
        await asyncio.sleep(0.2)
        looks = watch.looks
        await watch.stop()
        await watch.stop()  # (twice: nothing more)
        return looks

    assert asyncio.run(first_look(True, 60)) == 1
    assert asyncio.run(first_look(False, 60)) == 0
