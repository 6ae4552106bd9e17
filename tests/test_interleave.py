"""`interleave`: several output streams as one (a call with `n` > 1), closing them all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from orchestrator.streaming import interleave

pytestmark = pytest.mark.timeout(30)


def test_items_keep_their_order_per_stream_and_every_stream_is_closed():
    closed: list[str] = []

    async def stream(name: str, n: int, delay: float, fail_at: int | None = None):
        try:
            for i in range(n):
                await asyncio.sleep(delay)
                if i == fail_at:
                    raise ValueError(f"{name} failed")
                yield f"{name}{i}"
        finally:
            closed.append(name)

    async def take(gens: list[AsyncGenerator[str, None]], limit: int | None = None):
        got: list[tuple[int, str]] = []
        merged = interleave(gens)
        try:
            async for item in merged:
                got.append(item)
                if limit is not None and len(got) == limit:
                    break
        finally:
            await merged.aclose()
        return got

    got = asyncio.run(take([stream("a", 3, 0.003), stream("b", 4, 0.001)]))
    assert [s for i, s in got if i == 0] == ["a0", "a1", "a2"]
    assert [s for i, s in got if i == 1] == ["b0", "b1", "b2", "b3"]
    assert sorted(closed) == ["a", "b"]

    closed.clear()  # a consumer that stops early closes the streams still running
    got = asyncio.run(take([stream("a", 100, 0.001), stream("b", 100, 0.001)], limit=5))
    assert len(got) == 5 and sorted(closed) == ["a", "b"]

    closed.clear()  # the first error of any stream is raised, and the others are closed
    with pytest.raises(ValueError, match="b failed"):
        asyncio.run(take([stream("a", 100, 0.002), stream("b", 5, 0.001, fail_at=2)]))
    assert sorted(closed) == ["a", "b"]

    closed.clear()  # one stream: passed through as it is
    assert asyncio.run(take([stream("a", 2, 0)])) == [(0, "a0"), (0, "a1")]
    assert closed == ["a"]
