"""SSE event encoding (`orchestrator.streaming.sse`), and the bench client's reading of a
stream's tail (`orchestrator.bench`)."""

from __future__ import annotations

import json

import pytest

from orchestrator.bench import _final_event, _last_events
from orchestrator.streaming import sse


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "obj",
    [
        {"text": "plain", "output_ids": [1, 2, 3], "meta_info": {"e2e_latency": 0.012345}},
        {"text": "line\u2028sep\u0085nel and caf\u00e9 \U0001f600", "output_ids": []},
        {"nested": {"a": None, "b": [True, False], "c": 'quote " and \\ and \n\x0b\x1c\u2029'}},
        {"text": "a lone surrogate \ud800", "big": 2**70},  # orjson refuses both
        {1: "a non-string key"},
    ],
)
def test_an_event_is_one_line_that_round_trips(obj):
    event = sse(obj)
    assert event.startswith("data: ") and event.endswith("\n\n")
    payload = event[len("data: ") : -2]
    assert len(payload.splitlines()) == 1  # no raw U+2028 / U+0085 / newline splits it
    assert json.loads(payload) == json.loads(json.dumps(obj))  # what `json` would send


@pytest.mark.timeout(30)
def test_the_bench_client_finds_the_totals_in_a_streams_tail_however_it_is_chunked():
    events = [{"text": "ab" * i, "meta_info": {"completion_tokens": i}} for i in range(1, 7)]
    stream = "".join(sse(e) for e in events).encode() + b"data: [DONE]\n\n"
    for size in (1, 2, 5, 13, 64, len(stream)):
        tail = b""
        for i in range(0, len(stream), size):
            tail = _last_events(tail + stream[i : i + size])
        assert _final_event(tail) == events[-1]
        assert len(tail) <= len(sse(events[-1])) + len(b"data: [DONE]\n\n") + size
    error = sse({"error": {"message": "boom"}}).encode() + b"data: [DONE]\n\n"
    two = "".join(sse(e) for e in events[:2]).encode()
    assert _final_event(_last_events(two + error)) == {"error": {"message": "boom"}}
    assert _final_event(b"") == {} and _final_event(b"data: [DONE]\n\n") == {}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("keepalive_s", [0.1, 0.0])
def test_a_silent_stream_gets_keep_alive_comments_between_its_events_only(keepalive_s):
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Route

    from orchestrator.streaming import SSE_KEEPALIVE, EventStream

    async def events():
        yield sse({"n": 1})
        await asyncio.sleep(0.45)
        yield sse({"n": 2})

    async def route(request):
        return EventStream(events(), keepalive_s)

    app = Starlette(routes=[Route("/s", route)])

    async def run() -> bytes:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.get("/s")
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            return r.content

    body = asyncio.run(run())
    first, second = sse({"n": 1}).encode(), sse({"n": 2}).encode()
    assert body.startswith(first) and body.endswith(second), body
    middle = body[len(first) : -len(second)]
    if keepalive_s:
        assert middle == SSE_KEEPALIVE * (len(middle) // len(SSE_KEEPALIVE)), body
        assert 2 <= middle.count(SSE_KEEPALIVE) <= 5, body
    else:
        assert middle == b"", body
