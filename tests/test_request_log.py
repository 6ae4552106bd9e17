"""`Metrics.track` records each request's end in the metrics and, with `log_requests`, as a
JSON line of the request log (`orchestrator.request_log`); a request its client left is logged
as `gone`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator

from orchestrator.metrics import Metrics
from orchestrator.outputs import Output


def test_track_logs_each_ended_request_once_and_a_left_one_as_gone():
    records: list[dict[str, object]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(record.getMessage()))

    async def outputs(rid: str, end: bool) -> AsyncGenerator[Output, None]:
        yield Output(rid, "a", [7], num_prompt_tokens=5, num_output_tokens=1)
        await asyncio.sleep(0.01)
        yield Output(rid, "bc", [8, 9], 5, 3, finish_reason="length" if end else None,
                     num_cached_tokens=2)  # fmt: skip
        if not end:
            await asyncio.sleep(10)  # the client leaves before this

    async def run(metrics: Metrics) -> None:
        start = time.perf_counter()
        async for _ in metrics.track(outputs("done", True), start, "/v1/completions", "10.0.0.1"):
            pass
        left = metrics.track(outputs("left", False), start, "grpc", "10.0.0.2")
        assert (await left.__anext__()).token_ids == [7]
        assert (await left.__anext__()).token_ids == [8, 9]
        await left.aclose()

    logger = logging.getLogger("pdserve.requests")
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        asyncio.run(run(Metrics(log_requests=True)))
        quiet = len(records)
        asyncio.run(run(Metrics()))  # without log_requests: nothing logged
        assert len(records) == quiet
    finally:
        logger.removeHandler(handler)
    done, left = records
    assert {k: done[k] for k in ("rid", "api", "client", "finish")} == {
        "rid": "done", "api": "/v1/completions", "client": "10.0.0.1", "finish": "length",
    }  # fmt: skip
    assert (done["prompt_tokens"], done["cached_tokens"], done["output_tokens"]) == (5, 2, 3)
    assert 0 <= done["ttft_ms"] < done["e2e_ms"]  # type: ignore[operator]
    assert "error" not in done
    assert left["rid"] == "left" and left["finish"] == "gone" and left["api"] == "grpc"
    assert left["output_tokens"] is None and left["ttft_ms"] is not None


def test_a_request_not_taken_is_logged_as_refused_or_unavailable_with_its_error():
    """A rank's refusal (the route answers 400) and no rank to take it (503) are not a
    client gone: their lines say so, with the message the client got."""
    from orchestrator.routed import RouterNotReady

    records: list[dict[str, object]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(record.getMessage()))

    async def refused(error: Exception) -> AsyncGenerator[Output, None]:
        raise error
        yield  # (a generator)

    async def run(metrics: Metrics) -> None:
        for error in (ValueError("max_new_tokens: too many"), RouterNotReady("loading")):
            try:
                outputs = refused(error)
                async for _ in metrics.track(outputs, time.perf_counter(), "/generate", rid="c1"):
                    pass
            except (ValueError, RouterNotReady) as e:
                assert e is error
            else:
                raise AssertionError("the refusal was swallowed")

    logger = logging.getLogger("pdserve.requests")
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics = Metrics(log_requests=True)
        asyncio.run(run(metrics))
        metrics.not_taken("/v1/completions", "10.0.0.3", "no rank is up")  # a 503 at admission
    finally:
        logger.removeHandler(handler)
    bad, down, shed = records
    assert bad["finish"] == "refused" and bad["error"] == "max_new_tokens: too many"
    assert bad["rid"] == "c1"  # the client's id, though no rank took it
    assert down["finish"] == "unavailable" and down["error"] == "loading"
    assert (shed["finish"], shed["api"], shed["error"]) == (
        "unavailable",
        "/v1/completions",
        "no rank is up",
    )
