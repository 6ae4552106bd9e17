"""Overlapping `/metrics` scrapes: each reads the ranks' counts and applies them in turn, so
an earlier reading never lands after a later one (it looked like a rank that restarted, and
the total jumped; found by an audit)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import ServeConfig
from orchestrator.metrics import Metrics
from orchestrator.ops_routes import add_ops_routes
from workers.engine.rank_reports import RankStats

pytestmark = pytest.mark.timeout(60)


def test_overlapping_scrapes_do_not_inflate_the_counters():
    readings = iter([(100, 0.3), (105, 0.0), (110, 0.0)])  # (preemptions, delay before answer)

    async def stats() -> list[RankStats]:
        count, delay = next(readings)  # read now, answered after `delay`
        await asyncio.sleep(delay)
        return [RankStats(0, 0, 16, 16, 0, 0, num_preemptions=count)]

    router = SimpleNamespace(
        stats=stats, ranks=SimpleNamespace(final_stats={}, loads=lambda: []),
        num_retries=0, num_resumed=0, num_rank_failures=0, draining=False, num_queued=0,
        num_shed=0, num_waiting=0, num_waited=0, num_migrated=0,
        moves=SimpleNamespace(num_relieved=0),
    )  # fmt: skip
    ctx: Any = SimpleNamespace(router=router, config=ServeConfig(), metrics=Metrics())
    app = FastAPI()
    add_ops_routes(app, ctx)

    def preemptions(text: str) -> float:
        for family in text_string_to_metric_families(text):
            if family.name == "pdserve_preemptions":
                return sum(s.value for s in family.samples if s.name.endswith("_total"))
        raise AssertionError("no pdserve_preemptions_total")

    async def run() -> float:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            slow = asyncio.ensure_future(client.get("/metrics"))
            await asyncio.sleep(0.05)
            fast = asyncio.ensure_future(client.get("/metrics"))
            await asyncio.gather(slow, fast)
            return preemptions((await client.get("/metrics")).text)

    assert asyncio.run(run()) == 110  # not 100 + 105 + 110 - ...: one rank counting to 110
