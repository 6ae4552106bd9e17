"""`sampling_request.parse_off_loop`: a body asking for structured output is parsed in a
thread (its grammar's check may take long); one whose check runs past `CHECK_TIMEOUT_S` is a
400, one still queued behind other requests' checks then is a 503 to retry (found by a
review: it was a 400 telling the client to simplify a grammar never looked at)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import orchestrator.sampling_request as sampling_request
from orchestrator.request_fields import RequestError
from orchestrator.routed import Overloaded

pytestmark = pytest.mark.timeout(30)

SCHEMA = {"sampling_params": {"json_schema": "{}"}}


def test_slow_checks_are_400_and_queued_ones_503(monkeypatch):
    monkeypatch.setattr(sampling_request, "CHECK_TIMEOUT_S", 0.1)
    release = threading.Event()
    started: list[str] = []

    def slow(raw: Any, name: str) -> str:
        started.append(name)
        release.wait(10)
        return name

    async def run() -> None:
        # Inline, on the loop: no structured output.
        assert await sampling_request.parse_off_loop(lambda raw: "plain", {"text": "hi"}) == "plain"
        calls = [sampling_request.parse_off_loop(slow, SCHEMA, f"c{i}") for i in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r) for r in results] == [RequestError, RequestError, Overloaded]
        assert "took over 0.1 s to check" in str(results[0])
        assert started == ["c0", "c1"]  # the queued one never ran
        release.set()

    asyncio.run(run())
