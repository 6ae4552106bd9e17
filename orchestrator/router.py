"""`Router`: request state between the HTTP front end and the engine ranks.

One asyncio task per rank reads its output stream (`orchestrator.rank_output`: frames of
every request's new tokens, one per engine step) and hands each `TokenDelta` to the queue of its
request; `generate` turns a request's deltas into `Output`s (text deltas with stop strings
applied). A request leaves the router's table when its generator ends, however it ends; when it
ends before the rank finished it (consumer gone, stop string, timeout), the rank is told to abort
it, which frees its KV pages. A rank whose stream breaks or goes silent is marked dead and every
request on it ends with an error.

Everything here runs on one event loop (the server's): call `start` from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import ray

from orchestrator.detokenizer import IncrementalDetokenizer
from orchestrator.kv_moves import KVMoves
from orchestrator.outputs import Output, to_output
from orchestrator.rank_output import RankSilent, dispatch, read_output
from orchestrator.ranks import (
    Limits,
    Overloaded,
    RankTable,
    RankUnreachable,
    RoutedRequest,
    RouterNotReady,
    actor_is_dead,
)
from orchestrator.request_sides import abort_after, accepted_or_first
from orchestrator.tokenizer import Tokenizer
from workers.engine.messages import (
    AddsTaken,
    FinishReason,
    GenerateRequest,
    RankInfo,
    RankStats,
    SamplingParams,
    TokenDelta,
    TransferReady,
    short_error,
)

logger = logging.getLogger(__name__)


MAX_MOVES = 2  # times one request goes on on another rank (pair) after a failure


@dataclass
class _Job:
    """One client request across its attempts (`Router.generate`)."""

    rid: str  # the client's
    input_ids: list[int]
    sampling: SamplingParams
    whole: bool  # the ranks may hold the output after the first token until the end
    timeout_s: float | None
    deadline: float | None  # on the loop's clock
    # One for all attempts (it holds the stop strings): the text goes on where it stood.
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)  # handed to the consumer so far
    aborted: bool = False  # by the client while it waited for a rank (`Router.abort`)


class QueueSlot:
    """A request's place in `Router.num_queued` (requests without their first token yet):
    taken at admission, given back at the request's first token or end — or, for a request
    whose outputs were never read, when the slot is dropped."""

    def __init__(self, router: Router):
        router.num_queued += 1
        self._router: Router | None = router

    def release(self) -> None:
        if self._router is not None:
            self._router.num_queued -= 1
            self._router = None

    def __del__(self) -> None:
        self.release()


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
    ):
        """`ranks`: `EngineWorker` actor handles; the router reads each one's output stream (it
        must be its only reader) and, on `close(shutdown_ranks=True)`, shuts them down."""
        if not ranks:
            raise ValueError("a router needs at least one rank")
        self.ranks = RankTable(ranks)
        self.tokenizer = tokenizer
        self.model_name = model_name
        # A rank's stream silent this long (no output, no heartbeat) counts as a failed rank.
        self.stream_silence_s = stream_silence_s
        self.restart_poll_s = 1.0  # how often a dead rank is checked for its restart
        # How long a request whose rank failed under it, with no other rank (pair) to go on
        # on, waits for a rank to come back (Ray restarts it) and resumes there; 0: it ends.
        self.restart_wait_s = restart_wait_s
        self.num_waited = 0  # requests that waited for a rank to come back
        # The requests waiting for a rank now, by the client's id: their job, and the event
        # that wakes them (a rank's state changed, the client aborted, the server stops).
        self._waiting: dict[str, tuple[_Job, asyncio.Event]] = {}
        # Requests between two attempts for a moment (`_went_down`'s grace), by client id:
        # still in flight, their ids taken, an abort ends them.
        self._between: dict[str, _Job] = {}
        self._closing = False
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
        self._requests: dict[str, RoutedRequest] = {}
        self._rank_rids: dict[str, str] = {}
        self._num_attempts = 0
        # Requests moving to another rank with their KV (scale-downs, scale-ups, KV pressure).
        self.moves = KVMoves(self.ranks, self._requests, self._next_rid)
        self._tasks: dict[int, asyncio.Task[None]] = {}  # each rank's reader, by index
        self._ready: asyncio.Event | None = None  # created in start(), on the serving loop
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once started
        # Set when the server shuts down gracefully: new requests are refused (503, /health
        # says "draining") while the ones in flight run to their end.
        self.draining = False

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one task per rank: wait for it to be ready, then read its output until `close`."""
        self.loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        for i in range(len(self.ranks)):
            self._read(i)

    def _read(self, index: int) -> None:
        self._tasks[index] = asyncio.create_task(self._run_rank(index), name=f"router-rank-{index}")

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once every rank is ready; raise RouterNotReady if one died, TimeoutError."""
        if self._ready is None:
            raise RouterNotReady("the router was not started")
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        if not self.is_ready:
            raise RouterNotReady(self.ranks.dead_message())

    @property
    def is_ready(self) -> bool:
        """True when every rank has loaded its model, none has died, and the server is not
        draining."""
        return self.ranks.all_loaded and not any(self.ranks.errors) and not self.draining

    @property
    def is_serving(self) -> bool:
        """True while requests are taken: every rank loaded once, the server not draining, and
        a rank (pair) up to take one. A rank down with others still serving makes the server
        degraded, not down (`/health` 200 "degraded"; gRPC health SERVING)."""
        return self.ranks.all_loaded and not self.draining and self.ranks.can_pick(frozenset())

    @property
    def num_in_flight(self) -> int:
        return len(self._requests) + len(self._waiting) + len(self._between)

    @property
    def num_migrated(self) -> int:
        """Requests that moved to another rank with their KV (it arrived there)."""
        return self.moves.num_moved

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a rank to come back (`restart_wait_s`)."""
        return len(self._waiting)

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
        self._closing = True
        self.wake_waiting()
        self._fail_requests(None, message)

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
            for r in self._requests.values()
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
            self._fail_requests(rank, message)
        self.ranks.remove(ranks)

    async def _run_rank(self, index: int) -> None:
        """Wait for rank `index`, then read its output stream. When it dies, fail its requests
        at once, report the pool degraded, and wait for Ray to restart it (`max_restarts`);
        then go on."""
        handle, ranks = self.ranks.handles[index], self.ranks
        while True:
            try:
                ranks.infos[index] = await handle.ready.remote()
                if ranks.errors[index] is not None:
                    logger.warning("engine rank %d is back", index)
                ranks.errors[index] = None
                self.wake_waiting()
                if ranks.all_loaded:
                    assert self._ready is not None
                    self._ready.set()
                await read_output(
                    ranks, index, self.stream_silence_s, partial(self._dispatch, index)
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                message = f"engine rank {index} failed: {short_error(e)}"
                if ranks.errors[index] is None:
                    ranks.num_downs[index] += 1
                    self.num_rank_failures += 1
                    logger.error("%s", message)
                    self._fail_requests(index, message)
                if isinstance(e, RankSilent):
                    # Alive but stuck: it would hold its expert-parallel peers in their
                    # collectives until those time out, and never come back by itself. Ray
                    # starts it afresh (and its peers, whose collectives then fail at once).
                    logger.error("engine rank %d is stuck; killing it to be restarted", index)
                    with contextlib.suppress(Exception):
                        ray.kill(handle, no_restart=False)
                ranks.errors[index] = message
                assert self._ready is not None
                self._ready.set()  # wake waiters: readiness is now decided (failed)
                if await asyncio.to_thread(actor_is_dead, handle):
                    ranks.gone.add(index)
                    ranks.errors[index] = f"{message} (dead for good: Ray does not restart it)"
                    logger.error("engine rank %d is dead for good (Ray does not restart it)",
                                 index)  # fmt: skip
                    if self.on_rank_gone is not None:
                        self.on_rank_gone(index)
                    self.wake_waiting()
                    return
                self.wake_waiting()
                await asyncio.sleep(self.restart_poll_s)

    def _dispatch(self, index: int, items: list[TokenDelta | TransferReady | AddsTaken]) -> None:
        self.num_deltas += dispatch(self.ranks, self._requests, index, items)

    def _fail_requests(self, rank: int | None, message: str) -> None:
        """End the requests on `rank` (all with None: the server stops) with `message`; those
        of a rank may go on elsewhere (`generate`)."""
        for req in list(self._requests.values()):
            if rank is None or rank in (req.rank, req.prefill_rank):
                if rank is not None and req.lost is None:
                    req.lost = (rank, message)
                req.queue.put_nowait(
                    TokenDelta(
                        req.rid, [], FinishReason.ERROR, error=message, resumable=rank is not None
                    )
                )

    # ---- requests -------------------------------------------------------------------------

    async def generate(
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

        A request goes on on another rank (pair), up to `MAX_MOVES` times, when a rank fails
        under it — dies, goes silent, is scaled down, or loses an expert-parallel peer — and
        when, disaggregated, it fails before its first token (a transfer failed). One that
        had output resumes from it (`GenerateRequest.output_ids`): the consumer sees one
        stream, the same tokens as without the move for a greedy or seeded request. One its
        rank handed off with its KV (`orchestrator.kv_moves`) goes on on another rank from
        that KV; that is no failure and does not count as a move."""
        if slot is None:
            (slot,) = self.admit()
        rid = rid or uuid.uuid4().hex
        if rid in self._rank_rids or rid in self._waiting or rid in self._between:
            slot.release()
            raise ValueError(f"rid: request {rid!r} is already running")
        timeout_s = timeout_s if timeout_s is not None else self.request_timeout_s
        now = asyncio.get_running_loop().time()
        job = _Job(
            rid, list(input_ids), sampling, not stream and not stop, timeout_s,
            None if timeout_s is None else now + timeout_s,
            IncrementalDetokenizer(
                self.tokenizer, input_ids, stop, min_new_tokens=sampling.min_new_tokens
            ),
        )  # fmt: skip
        used: list[RoutedRequest] = []
        avoid: frozenset[int] = frozenset()
        # A move with its KV (`orchestrator.kv_moves`): the rank it left and the id its KV
        # waits under there, for the next attempt to take (or, none doing so, to abort).
        moved: tuple[int, str] | None = None
        moves = 0  # after failures (a migration is no failure: it does not count)
        try:
            while True:
                failure: str | None = None
                unreachable: RankUnreachable | None = None
                new_tokens = 0  # from this attempt
                moved_from, moved = moved, None
                try:
                    attempt = self._attempt(job, avoid, used, moved_from)
                    try:
                        async with contextlib.aclosing(attempt) as outs:
                            async for out in outs:
                                if (out.finish_reason == "error" and not out.token_ids
                                        and not new_tokens
                                        and self._retryable(used[-1])):  # fmt: skip
                                    failure = out.error or "failed"
                                    break
                                new_tokens += len(out.token_ids)
                                job.output_ids += out.token_ids
                                if out.token_ids or out.finish_reason is not None:
                                    slot.release()  # no longer waits for its first token
                                yield out
                                if out.finish_reason is not None:
                                    return  # ended (a rank failing under it changes nothing)
                    finally:  # however it ended: its rank may have handed it off with its KV
                        last = used[-1] if used else None
                        if (
                            last is not None
                            and last.moved_to
                            and (moved_from is None or last.moved_to != moved_from[1])
                        ):  # (not the move the attempt took: that attempt ends it itself)
                            moved = (last.rank, last.moved_to)
                    if used[-1].lost is not None:  # ended without a word: its rank was lost
                        failure = used[-1].lost[1]
                        if used[-1].aborted:  # by the client, while its last tokens went out
                            yield self._ended(job, "abort", None)
                            return
                except RankUnreachable as e:
                    # A rank died while taking the request: nothing ran there.
                    failure, unreachable = str(e), e
                except ValueError as e:
                    if not job.output_ids:
                        raise  # refused before anything was said: the caller answers 400
                    if moved_from is None:
                        failure = f"the rank it was to resume on refused it: {e}"
                        break
                    # Refused where its KV was to go: it resumes from its output instead.
                    failure = f"the rank it was to move to with its KV refused it: {e}"
                if failure is None:
                    return
                if moved is not None:
                    if self.moves.receiver(moved[0], frozenset({moved[0]})) is not None:
                        avoid = frozenset({moved[0]})
                        logger.info("request %s moves to another rank with its KV after %d "
                                    "token(s)", rid, len(job.output_ids))  # fmt: skip
                        continue
                    self.moves.forget(moved)  # no rank left to take it: resumed after a failure
                    moved = None
                if moves == MAX_MOVES:
                    failure += (f" (after {MAX_MOVES} moves to other ranks or restarted ones, the "
                                "most a request makes)")  # fmt: skip
                    break
                moves += 1
                next_avoid = self._avoid(used[-1], unreachable)
                if next_avoid is None:
                    if self.restart_wait_s <= 0:
                        break
                    lost = self._lost_rank(used[-1], unreachable)
                    if lost is None and used[-1].lost is None and unreachable is None:
                        # A failed transfer, maybe because a rank of the pair just died: the
                        # router sees that on the rank's stream a moment later.
                        self._between[job.rid] = job
                        try:
                            lost = await self._went_down(used[-1])
                        finally:
                            del self._between[job.rid]
                        if job.aborted:
                            yield self._ended(job, "abort", None)
                            return
                    if lost is None:
                        break
                    waited = await self._wait_for_a_rank(job, used[-1], lost)
                    if isinstance(waited, Output):
                        yield waited
                        return
                    if isinstance(waited, str):
                        failure = f"{failure}; {waited}"
                        break
                    next_avoid = waited
                avoid = next_avoid
                if job.output_ids:
                    self.num_resumed += 1
                    if used[-1].moved_from is not None:  # its move with its KV failed
                        self.moves.failed[used[-1].moved_from] += 1
                    logger.warning("request %s lost its rank after %d token(s) (%s); resuming "
                                   "it", rid, len(job.output_ids), failure)  # fmt: skip
                else:
                    self.num_retries += 1
                    logger.warning("request %s failed before its first token (%s); retrying on "
                                   "another rank", rid, failure)  # fmt: skip
            if unreachable is not None and not job.output_ids:
                raise unreachable  # nothing ran, nothing was said: the caller answers 503
            yield self._ended(job, "error", failure)
        finally:
            slot.release()
            if moved is not None:
                self.moves.forget(moved)

    def _next_rid(self, client_rid: str) -> str:
        """A new attempt id for the client's request `client_rid`."""
        self._num_attempts += 1
        return f"{client_rid}#{self._num_attempts}"

    def _lost_rank(self, req: RoutedRequest, unreachable: RankUnreachable | None) -> int | None:
        """The rank whose failure ended `req`'s attempt, when it is one that may come back
        (`_wait_for_a_rank`): a rank lost under it, or one it could not reach that the router
        has seen go down. None otherwise (a failed transfer, a rank that refused it or is
        scaled down — unless its instance is being replaced)."""
        if unreachable is not None:
            rank = unreachable.rank
            if self.ranks.num_downs[rank] == req.downs_at_start.get(rank):
                return None  # up as far as the router knows: nothing to wait for
        elif req.lost is not None:
            rank = req.lost[0]
        else:
            return None
        return None if rank in self.ranks.closed and not self.num_replacing else rank

    async def _went_down(self, req: RoutedRequest, grace_s: float = 2.0) -> int | None:
        """A rank of `req`'s pair that the router sees go down (since the attempt began)
        within `grace_s`; None if none does."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while True:
            for rank in req.pair:
                if rank is not None and self.ranks.num_downs[rank] != req.downs_at_start.get(rank):
                    return None if rank in self.ranks.closed else rank
            if asyncio.get_running_loop().time() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def _wait_for_a_rank(
        self, job: _Job, req: RoutedRequest, lost: int
    ) -> frozenset[int] | Output | str:
        """Wait until a rank (pair) can take `job` on, after rank `lost` failed under its
        attempt `req` and no other could: until a rank comes back — Ray restarts a failed one,
        the pool set replaces the instance of one dead for good — for up to `restart_wait_s`
        and the job's deadline. `lost` counts only once the router has seen it go down (a
        rank that leaves a broken pool reports its requests lost just before it goes).
        Returns the ranks to avoid then; or the output that ends `job` (its timeout, its
        abort); or why it gives up."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.restart_wait_s
        if job.deadline is not None:
            until = min(until, job.deadline)
        wake = asyncio.Event()
        self._waiting[job.rid] = (job, wake)
        self.num_waited += 1
        logger.warning("request %s lost engine rank %d and no other can take it; it waits up "
                       "to %.0f s for a rank to come back", job.rid, lost,
                       until - loop.time())  # fmt: skip
        try:
            while True:
                avoid = self._taken_out(req)
                seen_down = self.ranks.num_downs[lost] != req.downs_at_start.get(lost)
                if not seen_down:
                    avoid |= {lost}  # on its way out
                if job.aborted:  # first: an abort that came with the rank's return is kept
                    return self._ended(job, "abort", None)
                if self.ranks.can_pick(avoid):
                    return avoid
                if self._closing:
                    return "the server is shutting down"
                left = until - loop.time()
                if left <= 0:
                    if job.deadline is not None and until >= job.deadline:
                        return self._ended(
                            job, "timeout", f"the request timed out after {job.timeout_s:g} s"
                        )
                    return (f"no engine rank came back within {self.restart_wait_s:g} s "
                            "(--rank-restart-wait)")  # fmt: skip
                if (
                    seen_down
                    and not self.num_replacing
                    and not any(map(self.ranks.may_come_back, self.ranks.present))
                ):
                    return "no engine rank that could take it will come back"
                wake.clear()
                timer = loop.call_later(left, wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
        finally:
            del self._waiting[job.rid]

    def wake_waiting(self) -> None:
        """A rank's state changed (or the server stops): the requests waiting for a rank look
        again."""
        for _, wake in self._waiting.values():
            wake.set()

    @staticmethod
    def _ended(job: _Job, finish_reason: str, error: str | None) -> Output:
        """The last output of `job`, ended by the router between attempts."""
        return Output(
            rid=job.rid, text=job.detok.flush(), token_ids=[],
            num_prompt_tokens=len(job.input_ids), num_output_tokens=len(job.output_ids),
            finish_reason=finish_reason, error=error,
        )  # fmt: skip

    def _retryable(self, req: RoutedRequest) -> bool:
        """Whether an error before the first token is worth another pair: disaggregated (the
        transfer or the prefill failed), or a rank of its pair was taken out (scaled down)."""
        return req.pair[1] is not None or bool(self._taken_out(req))

    def _avoid(
        self, req: RoutedRequest, unreachable: RankUnreachable | None
    ) -> frozenset[int] | None:
        """The ranks a request that failed on `req`'s pair avoids next: the rank that failed
        (the prefill rank of a failed hand-off; a dead decode rank is not live anyway) and any
        scaled down, with their expert-parallel peers when another pool can take it (when a
        rank of a pool fails, its peers leave the pool too). None: no pair is left."""
        if unreachable is not None:
            failed = {unreachable.rank}
        elif req.lost is not None:
            failed = {req.lost[0]}
        else:
            failed = {r for r in req.pair[1:] if r is not None}
        failed |= self._taken_out(req)
        for candidate in (self.ranks.with_pool_peers(frozenset(failed)), frozenset(failed)):
            if self.ranks.can_pick(candidate):
                return candidate
        return None

    def _taken_out(self, req: RoutedRequest) -> frozenset[int]:
        """The ranks of `req`'s pair whose pool instance is scaled down."""
        return frozenset(r for r in req.pair if r is not None and r in self.ranks.closed)

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

    async def _attempt(
        self,
        job: _Job,
        avoid: frozenset[int],
        used: list[RoutedRequest],
        moved_from: tuple[int, str] | None = None,
    ) -> AsyncGenerator[Output, None]:
        """One try of `job` on the pair `RankTable.pick(avoid)`, recorded in `used`; from the
        output `job` has (a resumed request). The ranks know the attempt by an id of its own.
        A failure of a rank, not of the request, ends it without a final output: `req.lost`
        says so (its last tokens come first). `moved_from`: the rank the request left with
        its KV and the id its KV waits under there (`orchestrator.kv_moves`): this attempt, of
        that id, has the rank `KVMoves.receiver` gives (outside `avoid`) receive it there."""
        input_ids, resumed = job.input_ids, list(job.output_ids)
        sampling = job.sampling
        if resumed and sampling.prompt_logprobs:  # they came with the first token
            sampling = replace(sampling, prompt_logprobs=False)
        client_rid = job.rid
        here = False
        prefill_rank: int | None
        if moved_from is not None:
            prefill_rank, rid = moved_from  # the KV comes from that rank, as from a prefill's
            planned = used[-1].move_to if used else None
            picked = self.moves.receiver(prefill_rank, avoid, planned)
            if picked is None:  # gone meanwhile: it resumes from its output instead
                self.moves.forget(moved_from)
                raise RankUnreachable(prefill_rank, RuntimeError("no rank left to move it to"))
            rank = picked
        else:
            rank, prefill_rank = self.ranks.pick(avoid, input_ids)
            here = sampling.prompt_logprobs and prefill_rank is not None
            if here:  # scoring a prompt: its prefill rank, which has the logits, does it all
                assert prefill_rank is not None
                rank, prefill_rank = prefill_rank, None
            if client_rid in self._rank_rids:
                raise ValueError(f"rid: request {client_rid!r} is already running")
            rid = self._next_rid(client_rid)
        req = RoutedRequest(
            rid,
            rank,
            len(input_ids) + sampling.max_new_tokens,
            len(input_ids) + len(resumed),
            prefill_rank,
            queued_here=bool(here),
            num_output_tokens=len(resumed),
            client_rid=client_rid,
            moved_from=None if moved_from is None else moved_from[0],
            num_input_tokens=len(input_ids),
        )
        req.downs_at_start = {r: self.ranks.num_downs[r] for r in req.pair if r is not None}
        used.append(req)
        self._requests[rid] = req
        self._rank_rids[client_rid] = rid
        self.ranks.admit(req)
        detok = job.detok
        finished = False
        add_ref = prefill_ref = None
        timer: asyncio.TimerHandle | None = None
        try:
            request = GenerateRequest(
                rid, list(input_ids), sampling, stream=not job.whole, generate_here=here,
                output_ids=resumed, migrated=moved_from is not None,
            )  # fmt: skip
            # Decode side first, so that its receive is posted while the prompt computes.
            add_ref = self.ranks.add(rank, request)
            req.adds.append((rank, add_ref))
            if moved_from is not None:  # the rank it left holds it already: no add there
                assert prefill_rank is not None
                held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                held.set_result(None)
                req.adds.append((prefill_rank, held))
            elif prefill_rank is not None:
                prefill_ref = self.ranks.add(prefill_rank, request)
                req.adds.append((prefill_rank, prefill_ref))
            # A timer, not `asyncio.wait_for`: before Python 3.12, wait_for swallows a
            # cancellation (client gone) that coincides with a delta arriving. It runs from the
            # start: a rank that cannot be reached must not hold the request past its timeout.
            timed_out = TokenDelta(rid, [], FinishReason.ABORT, error="timeout")
            if job.deadline is not None:
                loop = asyncio.get_running_loop()
                timer = loop.call_later(
                    max(0.0, job.deadline - loop.time()), req.queue.put_nowait, timed_out
                )
            try:
                sides = ((add_ref, rank), (prefill_ref, prefill_rank))
                early = await accepted_or_first(sides, req.queue)
            except (ValueError, RankUnreachable):
                # Nothing runs. (Disaggregated, the other side may have accepted it, and a
                # moved request's KV waits on the rank it left: leave `finished` False so that
                # both sides are told to abort.)
                finished = prefill_ref is None and moved_from is None
                raise
            num_output_tokens = len(resumed)
            while True:
                delta, early = (early, None) if early is not None else (await req.queue.get(), None)
                # Coalesce what else arrived meanwhile: a consumer that fell behind catches up
                # with one event instead of one per engine step.
                while delta.finish_reason is None and not req.queue.empty():
                    nxt = req.queue.get_nowait()
                    if nxt is timed_out:
                        req.queue.put_nowait(nxt)
                        break
                    nxt.prepend(delta)  # one delta: both's tokens, the later one's state
                    delta = nxt
                if delta is timed_out:
                    yield Output(
                        rid=client_rid,
                        text=detok.flush(),
                        token_ids=[],
                        num_prompt_tokens=len(input_ids),
                        num_output_tokens=num_output_tokens,
                        finish_reason="timeout",
                        error=f"the request timed out after {job.timeout_s:g} s",
                    )
                    return
                if req.aborted and delta.finish_reason is FinishReason.ERROR:
                    # Aborted by the client: one side's abort failed the other's transfer.
                    delta.finish_reason, delta.error = FinishReason.ABORT, None
                elif delta.resumable and delta.finish_reason is FinishReason.ERROR:
                    # `req.lost` names the rank (`dispatch`, `_fail_requests` set it).
                    delta.finish_reason, delta.error = None, None
                    if delta.token_ids:  # made before the rank failed: they stand
                        out = to_output(delta, detok, client_rid, len(input_ids))
                        yield out  # (a stop string among them ends the request here)
                    return
                num_output_tokens = delta.num_output_tokens or num_output_tokens
                out = to_output(delta, detok, client_rid, len(input_ids))
                # Finished on the rank (an error may come from the router or the other side of a
                # disaggregated pair: then the ranks are still told to abort).
                if delta.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                    finished = True
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if timer is not None:
                timer.cancel()
            self._requests.pop(rid, None)
            self._rank_rids.pop(client_rid, None)
            self.ranks.release(req)
            if not finished:
                for side, ref in req.adds:
                    self.ranks.spawn(abort_after(self.ranks, side, ref, rid))

    async def abort(self, rid: str) -> bool:
        """Abort a running request (the client's `rid`); its generator then ends with
        finish_reason "abort" (what it produced until then kept)."""
        if rid in self._waiting:  # for a rank to come back: it ends now
            job, wake = self._waiting[rid]
            job.aborted = True
            wake.set()
            return True
        if rid in self._between:  # it ends once the grace is over
            self._between[rid].aborted = True
            return True
        req = self._requests.get(self._rank_rids.get(rid, ""))
        if req is None:
            return False
        rid = req.rid
        req.aborted = True
        # After each side's add: an abort that overtook its add would miss the request there
        # (adds leave in batches; a threaded actor may run calls out of order), leaving that
        # side to wait for its transfer to time out — and the request to be retried.
        await asyncio.gather(*(abort_after(self.ranks, r, ref, rid) for r, ref in req.adds))
        return True

    async def flush_prefix_cache(self) -> int:
        """Forget the prefix cache of every live rank; the cached pages freed in all."""
        return await self.ranks.flush_prefix_cache()

    async def stats(self) -> list[RankStats | None]:
        """Each rank's stats; None for a rank that is not ready or does not answer."""
        return await self.ranks.stats()
