"""What the HTTP route modules share: `HttpContext` (the router and config, the per-client limits
and metrics every request goes through, what the chat template says about the model's output),
and the HTTP error a failed request is answered with."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping
from typing import Any, TypeVar

from fastapi import Request

from orchestrator.config import ServeConfig
from orchestrator.limits import ClientLimiter
from orchestrator.metrics import Metrics
from orchestrator.outputs import Output
from orchestrator.reasoning import template_reasons
from orchestrator.request_fields import RequestError
from orchestrator.routed import DuplicateRequest
from orchestrator.router import QueueSlot, Router
from orchestrator.tool_parser import FORMATS, MARKERS, ToolCallFormat, detect_format
from workers.engine.messages import SamplingParams

T = TypeVar("T")


class HttpContext:
    """The app's state that the route handlers read. The chat template's facts are read on
    first use (the tokenizer is there once the router has started), then kept."""

    def __init__(
        self, router: Router, config: ServeConfig, metrics: Metrics, limiter: ClientLimiter
    ):
        self.router = router
        self.config = config
        self.metrics = metrics
        self.limiter = limiter

    @functools.cached_property
    def model_names(self) -> frozenset[str]:
        """The `model` an OpenAI request may name: the served name, and `--model` as given."""
        return frozenset(n for n in (self.router.model_name, self.config.model) if n)

    @functools.cached_property
    def tool_format(self) -> ToolCallFormat:
        """How the served model writes tool calls."""
        if self.config.tool_call_parser != "auto":
            return FORMATS[self.config.tool_call_parser]
        return detect_format(self.router.tokenizer.chat_template)

    @functools.cached_property
    def splits_reasoning(self) -> bool:
        """A chat's thinking block comes apart as `reasoning_content`."""
        if self.config.reasoning_parser == "auto":
            return template_reasons(self.router.tokenizer.chat_template)
        return self.config.reasoning_parser == "deepseek_r1"

    @functools.cached_property
    def marker_ids(self) -> dict[str, int]:
        """The tool-call markers that are single tokens, by text."""
        return self.router.tokenizer.marker_ids(MARKERS)

    def run(
        self,
        ids: list[int],
        sampling: SamplingParams,
        stop: tuple[str, ...],
        client: str,
        rid: str | None = None,
        arrival_s: float | None = None,
        stream: bool = True,
        api: str = "/generate",
        slot: QueueSlot | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[Output, None]:
        """The request's outputs; takes one of `client`'s slots (429 when none is left).
        `slot`: its place from `Router.admit`, which a route takes for all its outputs before
        a stream starts (so that a refusal is a 503 status, not an error event).
        `stream=False`: the caller uses only the whole output (see `Router.generate`); `api`:
        the route, for the request log; `trace`: the caller's trace context (its span's
        parent, `orchestrator.tracing`)."""
        arrival = time.perf_counter() if arrival_s is None else arrival_s
        generated = self.router.generate(ids, sampling, stop, rid=rid, stream=stream, slot=slot)
        outputs = self.metrics.track(generated, arrival, api, client, sampling, trace, rid or "")
        return self.limiter.wrap(outputs, client)


def client_of(request: Request) -> str:
    """The client's address, the key of the per-client limits."""
    return request.client.host if request.client is not None else "unknown"


def error_status(out: Output) -> RequestError:
    """The error a request that ended with "error" or "timeout" is answered with."""
    if out.finish_reason == "timeout":
        return RequestError(out.error or "the request timed out", None, 504, "timeout_error")
    return RequestError(out.error or "the engine failed", None, 500, "server_error")


def refused(e: ValueError, default_param: str) -> RequestError:
    """A rank's refusal ("field: problem") as a 400 naming that field; a duplicate `rid`
    is a 409."""
    message = str(e)
    if isinstance(e, DuplicateRequest):
        return RequestError(message, "rid", 409, "conflict_error", code="duplicate_request")
    head = message.split(":", 1)[0]
    return RequestError(message, head if head.isidentifier() else default_param)


async def gather_all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `coros` concurrently; if one fails (or this is cancelled), cancel the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
