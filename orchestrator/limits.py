"""Per-client request limits shared by the HTTP and gRPC front ends.

`ClientLimiter` counts the requests each client (its address) has in flight and refuses one
over `max_per_client` with HTTP 429 / gRPC RESOURCE_EXHAUSTED. A slot is held by the request's
output stream (`Limited`) and released when the stream is closed, finished or collected,
whichever comes first — also when it was never iterated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from orchestrator.request_fields import RequestError

T = TypeVar("T")


class ClientLimiter:
    def __init__(self, max_per_client: int | None):
        if max_per_client is not None and max_per_client < 1:
            raise ValueError(f"max_per_client must be >= 1, got {max_per_client}")
        self.max_per_client = max_per_client
        self.in_flight: Counter[str] = Counter()

    def check_call(self, num_outputs: int) -> None:
        """A 400 for a call of more outputs (choices, prompts of a batch) than a client may
        have in flight at all: it would be refused however long the client waited."""
        if self.max_per_client is not None and num_outputs > self.max_per_client:
            raise RequestError(
                f"this call asks for {num_outputs} outputs (choices times prompts), more than "
                f"the {self.max_per_client} requests a client may have in flight at once "
                "(--max-concurrent-requests-per-client): ask for fewer in one call", "n",
            )  # fmt: skip

    def acquire(self, client: str) -> None:
        if self.max_per_client is not None and self.in_flight[client] >= self.max_per_client:
            raise RequestError(
                f"too many concurrent requests from {client}: at most {self.max_per_client} "
                "(--max-concurrent-requests-per-client)", None, 429, "rate_limit_error",
                code="too_many_requests",
            )  # fmt: skip
        self.in_flight[client] += 1

    def release(self, client: str) -> None:
        self.in_flight[client] -= 1
        if self.in_flight[client] <= 0:
            del self.in_flight[client]

    def wrap(self, outputs: AsyncGenerator[T, None], client: str) -> Limited[T]:
        """Take a slot for `client` now (RequestError if none is left); `outputs` holds it."""
        self.acquire(client)
        return Limited(outputs, self, client)


class Limited(AsyncGenerator[T, None]):
    """An async generator's stream holding one client slot until it ends."""

    def __init__(self, inner: AsyncGenerator[T, None], limiter: ClientLimiter, client: str):
        self._inner = inner
        self._limiter: ClientLimiter | None = limiter
        self._client = client

    def _release(self) -> None:
        if self._limiter is not None:
            self._limiter.release(self._client)
            self._limiter = None

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._inner.__anext__()
        except BaseException:
            self._release()
            raise

    async def asend(self, value: None) -> T:
        return await self.__anext__()

    async def athrow(self, *args: object) -> T:
        self._release()
        return await self._inner.athrow(*args)  # type: ignore[arg-type, call-overload]

    async def aclose(self) -> None:
        self._release()
        await self._inner.aclose()

    def __del__(self) -> None:
        self._release()
