"""`Router`: request state between the HTTP front end and the engine ranks.

One asyncio task per rank (`orchestrator.rank_watch`) reads its output stream
(`orchestrator.rank_output`: frames of every request's new tokens, one per engine step) and
hands each `TokenDelta` to the queue of its request; `generate` (`orchestrator.request_run`)
turns a request's deltas into `Output`s (text deltas with stop strings applied). A request
leaves the router's table when its generator ends, however it ends; when it ends before the rank
finished it (consumer gone, stop string, timeout), the rank is told to abort it, which frees its
KV pages. A rank whose stream breaks or goes silent is marked dead and every request on it ends
with an error.

Everything here runs on one event loop (the server's): call `start` from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from orchestrator.jobs import Job, QueueSlot
from orchestrator.kv_moves import KVMoves
from orchestrator.outputs import Output
from orchestrator.rank_output import dispatch
from orchestrator.rank_watch import watch_rank
from orchestrator.ranks import RankTable
from orchestrator.request_run import run_request
from orchestrator.request_sides import abort_sides
from orchestrator.routed import Limits, Overloaded, RoutedRequest, RouterNotReady
from orchestrator.tokenizer import Tokenizer
from workers.engine.messages import (
    AddsTaken,
    FinishReason,
    SamplingParams,
    TokenDelta,
    TransferReady,
)
from workers.engine.rank_reports import RankInfo, RankStats


class Router:
    def __init__(
        self,
        ranks: Sequence[Any],
        tokenizer: Tokenizer,
        model_name: str,
        stream_silence_s: float = 30.0,
        request_timeout_s: float | None = None,
        max_queued_requests: int | None = None,
        restart_wait_s: float = 0.0,
        tag: str = "",
    ):
        """`ranks`: `EngineWorker` actor handles; the router reads each one's output stream (it
        must be its only reader of that tag) and, on `close(shutdown_ranks=True)`, shuts them
        down. `tag`: a front router's (`orchestrator.front`), "" for a deployment's primary
        router (or the only one)."""
        if not ranks:
            raise ValueError("a router needs at least one rank")
        self.tag = tag
        self.ranks = RankTable(ranks, tag)
        self.tokenizer = tokenizer
        self.model_name = model_name
        # A rank's stream silent this long (no output, no heartbeat) counts as a failed rank.
        self.stream_silence_s = stream_silence_s
        self.restart_poll_s = 1.0  # how often a dead rank is checked for its restart
        # How long a request whose rank failed under it, with no other rank (pair) to go on
        # on, waits for a rank to come back (Ray restarts it) and resumes there; 0: it ends.
        self.restart_wait_s = restart_wait_s
        self.num_waited = 0  # requests that waited for a rank to come back
        # Kill a rank whose stream goes silent (stuck), for Ray to restart it. A front router
        # (`orchestrator.front`) does not: its own stall would look the same, and the ranks
        # are the primary's to restart.
        self.kills_stuck_ranks = not tag
        # The requests waiting for a rank now, by the client's id: their job, and the event
        # that wakes them (a rank's state changed, the client aborted, the server stops).
        self.waiting: dict[str, tuple[Job, asyncio.Event]] = {}
        # Requests between two attempts for a moment (`failover.went_down`'s grace), by client id:
        # still in flight, their ids taken, an abort ends them.
        self.between: dict[str, Job] = {}
        self.closing = False
        # Called with a rank's index when its actor is found dead for good (the pool set
        # replaces its instance); `num_replacing` counts the instances being replaced, whose
        # ranks requests waiting for a rank may also wait for.
        self.on_rank_gone: Callable[[int], None] | None = None
        self.num_replacing = 0
        self.num_retries = 0  # requests re-run on another pair after a failure, before output
        self.num_resumed = 0  # requests that went on on another pair from the output they had
        self.num_rank_failures = 0  # times a rank was found dead or failing
        self.num_deltas = 0  # token deltas handed to requests (at most one per request a frame)
        self.request_timeout_s = request_timeout_s
        # Load shedding: while this many requests wait for their first token (queued on a
        # rank, or in prefill), new ones are refused (`Overloaded`); None: no cap.
        self.max_queued_requests = max_queued_requests
        self.num_queued = 0  # requests in flight without their first token yet
        self.num_shed = 0  # requests refused by that cap
        # Requests in flight by their id on the ranks, and each client id's current one: every
        # attempt gets an id of its own there, so a client may reuse an id as soon as its
        # request ended here, whatever the ranks still hold of the old one (a receive in
        # quarantine, a late target).
        self.attempts: dict[str, RoutedRequest] = {}
        self.attempt_of: dict[str, str] = {}
        self._num_attempts = 0
        # Requests moving to another rank with their KV (scale-downs, scale-ups, KV pressure).
        self.moves = KVMoves(self.ranks, self.attempts, self.next_attempt_id)
        self._tasks: dict[int, asyncio.Task[None]] = {}  # each rank's reader, by index
        # Set once every rank is ready or one failed (`wait_ready`); created in start(), on
        # the serving loop.
        self.ready_decided: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once started
        # Set when the server shuts down gracefully: new requests are refused (503, /health
        # says "draining") while the ones in flight run to their end.
        self.draining = False

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one task per rank: wait for it to be ready, then read its output until `close`."""
        self.loop = asyncio.get_running_loop()
        self.ready_decided = asyncio.Event()
        for i in range(len(self.ranks)):
            self._read(i)

    def _read(self, index: int) -> None:
        self._tasks[index] = asyncio.create_task(
            watch_rank(self, index), name=f"router-rank-{index}"
        )

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once every rank is ready; raise RouterNotReady if one died, TimeoutError."""
        if self.ready_decided is None:
            raise RouterNotReady("the router was not started")
        await asyncio.wait_for(self.ready_decided.wait(), timeout_s)
        if not self.is_ready:
            raise RouterNotReady(self.ranks.dead_message())

    @property
    def is_ready(self) -> bool:
        """True when every rank has loaded its model, none has died, there is one, and the
        server is not draining."""
        return (
            self.ranks.all_loaded
            and bool(self.ranks.present)
            and not any(self.ranks.errors)
            and not self.draining
        )

    @property
    def is_serving(self) -> bool:
        """True while requests are taken: every rank loaded once, the server not draining, and
        a rank (pair) up to take one. A rank down with others still serving makes the server
        degraded, not down (`/health` 200 "degraded"; gRPC health SERVING)."""
        return self.ranks.all_loaded and not self.draining and self.ranks.can_pick(frozenset())

    @property
    def num_in_flight(self) -> int:
        return len(self.attempts) + len(self.waiting) + len(self.between)

    @property
    def num_migrated(self) -> int:
        """Requests that moved to another rank with their KV (it arrived there)."""
        return self.moves.num_moved

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a rank to come back (`restart_wait_s`)."""
        return len(self.waiting)

    @property
    def limits(self) -> Limits:
        return self.ranks.limits

    @property
    def infos(self) -> list[RankInfo | None]:
        """Each rank's `RankInfo` (None until it is ready)."""
        return self.ranks.infos

    @property
    def rank_errors(self) -> list[str | None]:
        """Why each rank is down (None while it is up)."""
        return self.ranks.errors

    async def close(self, shutdown_ranks: bool = False) -> None:
        """Stop reading the ranks, end every in-flight request with an error, optionally shut ranks
        down."""
        await self._stop_reading(list(self._tasks))
        self.end_all("the server is shutting down")
        if shutdown_ranks:
            for i in self.ranks.present:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ranks.handles[i].shutdown.remote(), 15)

    def end_all(self, message: str) -> None:
        """End every request in flight with `message` (an error), those waiting for a rank
        too; none waits for a rank from now on. On the router's loop."""
        self.closing = True
        self.wake_waiting()
        self.fail_requests(None, message)

    async def _stop_reading(self, ranks: Sequence[int]) -> None:
        tasks = [task for i in ranks if (task := self._tasks.pop(i, None)) is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- scaling (`orchestrator.scaling`) ----------------------------------------------------

    async def add_ranks(self, handles: Sequence[Any]) -> list[int]:
        """Take on the ranks of a new pool instance (ready: their models are loaded); they
        are picked for new requests from now on. Their indices."""
        infos = await asyncio.gather(*(h.ready.remote() for h in handles))
        indices = self.ranks.add_ranks(handles, infos)
        for i in indices:
            self._read(i)
        return indices

    def close_ranks(self, ranks: Sequence[int]) -> None:
        """Pick `ranks` for no new request (their pool instance drains)."""
        self.ranks.closed.update(ranks)

    def requests_on(self, ranks: Sequence[int], with_output: bool | None = None) -> int:
        """Requests in flight that still need one of `ranks` (to generate, or to compute
        their prompt); with `with_output`, only those that have (or have not) had a token."""
        on = set(ranks)
        return sum(
            1
            for r in self.attempts.values()
            if (r.rank in on or r.prefill_rank in on)
            and (with_output is None or (r.num_output_tokens > 0) == with_output)
        )

    async def remove_ranks(self, ranks: Sequence[int], message: str) -> None:
        """Forget `ranks` (their pool instance goes): stop reading them, and end the requests
        still on them with `message` — a request that had no token yet is retried on another
        rank (pair) when it can be."""
        self.close_ranks(ranks)
        final = await self.ranks.stats_of(ranks)
        self.ranks.final_stats.update({i: st for i, st in zip(ranks, final, strict=True) if st})
        await self._stop_reading(ranks)
        for rank in ranks:
            self.fail_requests(rank, message)
        self.ranks.remove(ranks)

    def take_frame(self, index: int, items: list[TokenDelta | TransferReady | AddsTaken]) -> None:
        self.num_deltas += dispatch(self.ranks, self.attempts, index, items)

    def fail_requests(self, rank: int | None, message: str) -> None:
        """End the requests on `rank` (all with None: the server stops) with `message`; those
        of a rank may go on elsewhere (`generate`)."""
        for req in list(self.attempts.values()):
            if rank is None or rank in (req.rank, req.prefill_rank):
                if rank is not None and req.lost is None:
                    req.lost = (rank, message)
                req.queue.put_nowait(
                    TokenDelta(
                        req.rid, [], FinishReason.ERROR, error=message, resumable=rank is not None
                    )
                )

    # ---- requests -------------------------------------------------------------------------

    def generate(
        self,
        input_ids: list[int],
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        rid: str | None = None,
        timeout_s: float | None = None,
        stream: bool = True,
        slot: QueueSlot | None = None,
    ) -> AsyncGenerator[Output, None]:
        """Run one request; yield its `Output`s, the last with `finish_reason` set. `slot`: its
        place from `admit` (taken here when not given).

        `stream=False`: the caller wants the output whole. Unless there are stop strings to
        match as the text grows, the rank then sends the first token and the rest at the end,
        and every `HELD_CHECKPOINT` tokens (what a move resumes from): a few outputs instead
        of one per engine step, far less work for rank, router and HTTP.

        Raises ValueError (message naming the field) when a rank refuses the request before it
        starts, RouterNotReady when no rank can take it. Closing the iterator early (client gone)
        or a stop string or timeout aborts the request on its rank.

        A request goes on on another rank (pair), up to `request_run.MAX_MOVES` times, when a rank fails
        under it — dies, goes silent, is scaled down, or loses an expert-parallel peer — and
        when, disaggregated, it fails before its first token (a transfer failed). One that
        had output resumes from it (`GenerateRequest.output_ids`): the consumer sees one
        stream, the same tokens as without the move for a greedy or seeded request. One its
        rank handed off with its KV (`orchestrator.kv_moves`) goes on on another rank from
        that KV; that is no failure and does not count as a move."""
        return run_request(self, input_ids, sampling, stop, rid, timeout_s, stream, slot)

    def next_attempt_id(self, client_rid: str) -> str:
        """A new attempt id for the client's request `client_rid`; a front router's ends in
        its tag (`workers.engine.messages.router_of`: the ranks send its output to it)."""
        self._num_attempts += 1
        rid = f"{client_rid}#{self._num_attempts}"
        return f"{rid}@{self.tag}" if self.tag else rid

    def wake_waiting(self) -> None:
        """A rank's state changed (or the server stops): the requests waiting for a rank look
        again."""
        for _, wake in self.waiting.values():
            wake.set()

    def admit(self, count: int = 1) -> list[QueueSlot]:
        """Places for a request of `count` outputs (choices, prompts of a batch) among those
        waiting for their first token. RouterNotReady while draining or while no rank (pair)
        can take a request (a pool is down); `Overloaded` while `max_queued_requests` wait
        already — checked once for the whole request, so that one of more outputs than the
        cap is still served when there is room. Front ends admit a request before its stream
        starts, so that a refusal is a status (503), not an error event; `generate` admits
        the requests given it without a place."""
        if self.draining:
            raise RouterNotReady("the server is shutting down (draining the requests in flight)")
        if not self.ranks.can_pick(frozenset()):
            raise RouterNotReady(self.ranks.dead_message())
        cap = self.max_queued_requests
        if cap is not None and self.num_queued >= cap:
            self.num_shed += 1
            raise Overloaded(
                f"overloaded: {self.num_queued} requests are waiting for their first token "
                f"(--max-queued-requests {cap}); retry later"
            )
        return [QueueSlot(self) for _ in range(count)]

    async def abort(self, rid: str) -> bool:
        """Abort a running request (the client's `rid`); its generator then ends with
        finish_reason "abort" (what it produced until then kept)."""
        if rid in self.waiting:  # for a rank to come back: it ends now
            job, wake = self.waiting[rid]
            job.aborted = True
            wake.set()
            return True
        if rid in self.between:  # it ends once the grace is over
            self.between[rid].aborted = True
            return True
        req = self.attempts.get(self.attempt_of.get(rid, ""))
        if req is None:
            return False
        req.aborted = True
        # After each side's add: an abort that overtook its add would miss the request there
        # (adds leave in batches; a threaded actor may run calls out of order), leaving that
        # side to wait for its transfer to time out — and the request to be retried.
        await asyncio.gather(*abort_sides(self.ranks, req))
        return True

    async def flush_prefix_cache(self) -> int:
        """Forget the prefix cache of every live rank; the cached pages freed in all."""
        return await self.ranks.flush_prefix_cache()

    async def stats(self) -> list[RankStats | None]:
        """Each rank's stats; None for a rank that is not ready or does not answer."""
        return await self.ranks.stats()
