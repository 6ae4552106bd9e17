"""HTTP plumbing that notices a client going away: SSE responses, bounded bodies, request counts.

A request must be aborted as soon as its client disconnects, also while no token is being sent
(a long prefill, a queue). Starlette notices a disconnect only on the next write under ASGI 2.4,
so both the stream and the non-streaming wait here listen for `http.disconnect` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.request_fields import RequestError

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
# An SSE comment, which clients skip: sent on a stream that has said nothing for
# `EventStream.keepalive_s`, so that proxies and load balancers (nginx, cloud ones: 60 s by
# default) do not take a long queue, a long prompt or a wait for a restarting rank for a dead
# connection.
SSE_KEEPALIVE = b": keep-alive\n\n"


# Characters that `str.splitlines` splits at and JSON leaves raw (the ones below U+0020 are
# escaped by every JSON encoder).
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse(obj: Any) -> str:
    """One SSE event, JSON in UTF-8 (orjson: ~10x faster than `json`, and a stream sends an
    event per token). NEL, U+2028 and U+2029 are escaped: raw, they would split the line for
    clients that split lines the way `str.splitlines` does."""
    try:
        body = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # what orjson refuses (a lone surrogate, a huge int): `json` escapes all
        return f"data: {json.dumps(obj)}\n\n"
    if not body.isascii():
        for char, escaped in _LINE_BREAKS.items():
            body = body.replace(char, escaped)
    return f"data: {body}\n\n"


async def interleave(
    streams: Sequence[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """`(index, item)` from every stream as items come (a call with `n` > 1 streams its
    choices at once). The first error of any stream is raised; on any exit every stream is
    closed, so their `finally` blocks (aborting requests) run."""
    if len(streams) == 1:  # every n = 1 stream: passed through, no task per item
        async with contextlib.aclosing(streams[0]) as only:
            async for first in only:
                yield 0, first
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
        except Exception as e:
            await queue.put((index, None, e))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(StreamingResponse):
    """`text/event-stream` over an async generator; a disconnect (noticed at once, not at the
    next write) cancels the stream, and the generator is always closed, so its `finally` runs.
    A stream silent for `keepalive_s` gets an SSE comment (`SSE_KEEPALIVE`) every
    `keepalive_s` until it speaks again."""

    body_iterator: AsyncGenerator[str, None]

    def __init__(self, events: AsyncGenerator[str, None], keepalive_s: float = 15.0):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        last_write = loop.time()
        open_body = False  # the response started and its body has not ended
        writing = asyncio.Lock()  # one write at a time: a keep-alive never after the end

        async def write(message: Message) -> None:
            nonlocal last_write, open_body
            async with writing:
                last_write = loop.time()
                if message["type"] == "http.response.start":
                    open_body = True
                elif not message.get("more_body", False):
                    open_body = False
                await send(message)

        async def stream() -> None:
            with contextlib.suppress(OSError):  # the client went away mid-write
                await self.stream_response(write)

        async def keep_alive() -> None:
            nonlocal last_write
            while True:
                await asyncio.sleep(max(0.0, last_write + self.keepalive_s - loop.time()))
                async with writing:
                    if open_body and loop.time() - last_write >= self.keepalive_s:
                        last_write = loop.time()
                        with contextlib.suppress(OSError):
                            await send({"type": "http.response.body", "body": SSE_KEEPALIVE,
                                        "more_body": True})  # fmt: skip

        streaming = asyncio.create_task(stream())
        listening = asyncio.create_task(_wait_disconnect(receive))
        tasks = [streaming, listening]
        if self.keepalive_s > 0:
            tasks.append(asyncio.create_task(keep_alive()))
        try:
            await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.body_iterator.aclose()
        error = None if streaming.cancelled() else streaming.exception()
        if error is not None:
            raise error


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    listener = asyncio.create_task(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, listener, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON; 413 when it exceeds `max_bytes`, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(max_bytes)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    if not body:
        raise RequestError("body: the request body is empty; send a JSON object", "body")
    try:
        obj = json.loads(body)
        # Rare: look for one that is not half of a pair.
        where = _lone_surrogate(obj, "") if _SURROGATE_ESCAPE.search(body) else None
    except ValueError as e:  # (not JSON, not UTF-8, an integer of over 4300 digits)
        raise RequestError(f"body: the request body is not valid JSON ({e})", "body") from None
    except RecursionError:
        raise RequestError("body: the request body is nested too deeply", "body") from None
    if where is not None:
        raise RequestError(
            f"{where or 'body'}: holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape "
            "that is not half of a pair), which is not text", where or "body",
        )  # fmt: skip
    return obj


# A JSON escape of a UTF-16 surrogate; JSON decodes a pair of them into one character, a lone
# one into a string that cannot be encoded (tokenizers and the JSON answer fail on it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first key or string in `value` holding a lone surrogate; None if none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            where = _lone_surrogate(key, inner)
            if where is None:
                where = _lone_surrogate(item, inner)
            if where is not None:
                return where
    elif isinstance(value, list):
        for i, item in enumerate(value):
            where = _lone_surrogate(item, f"{path}[{i}]")
            if where is not None:
                return where
    return None


def _too_large(max_bytes: int) -> RequestError:
    return RequestError(
        f"body: the request body exceeds the limit of {max_bytes} bytes", "body", status=413
    )


class CountRequests:
    """ASGI middleware: calls `count(route, status)` once per HTTP request on a known route."""

    def __init__(self, app: ASGIApp, routes: set[str], count: Callable[[str, int], None]):
        self.app = app
        self.routes = routes
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.count(route, status)
