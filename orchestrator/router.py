"""`Router`: request state between the HTTP front end and the engine ranks.

One asyncio task per rank long-polls it (`poll`) and hands each `TokenDelta` to the queue of its
request; `generate` turns a request's deltas into `Output`s (text deltas with stop strings
applied). A request leaves the router's table when its generator ends, however it ends; when it
ends before the rank finished it (consumer gone, stop string, timeout), the rank is told to abort
it, which frees its KV pages. A rank whose poll fails is marked dead and every request on it ends
with an error.

Everything here runs on one event loop (the server's): call `start` from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.detokenizer import IncrementalDetokenizer
from orchestrator.policy import Affinity, Pick, RankLoad, pick_ranks
from orchestrator.tokenizer import Tokenizer
from workers.engine.messages import (
    FinishReason,
    GenerateRequest,
    RankInfo,
    RankStats,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    TransferReady,
    short_error,
)
from workers.engine.prefix_cache import page_key

logger = logging.getLogger(__name__)


class RouterNotReady(RuntimeError):
    """No rank can take the request (still loading, or dead)."""


class _RankUnreachable(RouterNotReady):
    """A rank's `add_request` failed without refusing the request (the rank died or is
    dying): nothing ran, so another rank may take it."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"engine rank {rank}: {short_error(error)}")
        self.rank = rank


AFFINITY_TOKENS = 64  # prompts that begin with the same this many tokens go to the same rank
# An expert-parallel pool that got no request for this long may be asleep (its idle ranks
# join its lockstep agreement only every few hundred ms): its other ranks are woken with the
# first request after it (`EngineWorker.wake`).
POOL_QUIET_S = 1.0
MAX_AFFINITY_KEYS = 65536


def prefix_key(input_ids: Sequence[int]) -> bytes | None:
    """The affinity key of a prompt: its first `AFFINITY_TOKENS` tokens (None for a prompt no
    longer than that, whose cache hits would be small)."""
    if len(input_ids) <= AFFINITY_TOKENS:
        return None
    return page_key(b"", input_ids[:AFFINITY_TOKENS])


@dataclass(frozen=True)
class Output:
    """What a request produced since the previous `Output`.

    `finish_reason` is set on the last one only: "stop" (EOS, a stop token or a stop string —
    `matched_stop` says which when known), "length", "abort" (timeout; `error` says so) or
    "error" (the rank failed; `error` says why)."""

    rid: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of `token_ids`, when asked
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held (not computed)
    # With the first token, when asked: one per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True)
class Limits:
    """What every rank accepts: the smallest of each value over the ranks."""

    vocab_size: int
    max_context_len: int
    kv_capacity_tokens: int


@dataclass
class _Request:
    rid: str
    rank: int  # the rank that generates (colocated or decode)
    num_tokens: int  # prompt + max_new_tokens: the load it puts on its rank
    num_prompt_tokens: int
    prefill_rank: int | None = None  # disaggregated: the rank that computes the prompt
    queue: asyncio.Queue[TokenDelta] = field(default_factory=asyncio.Queue)
    # A prompt being scored on a prefill rank that does the whole request: its prompt tokens
    # count as queued there until its first token (so scoring requests spread by load too).
    queued_here: bool = False


class Router:
    def __init__(
        self,
        ranks: Sequence[Any],
        tokenizer: Tokenizer,
        model_name: str,
        poll_timeout_s: float = 0.5,
        request_timeout_s: float | None = None,
    ):
        """`ranks`: `EngineWorker` actor handles; the router polls each (it must be the only
        poller) and, on `close(shutdown_ranks=True)`, shuts them down."""
        if not ranks:
            raise ValueError("a router needs at least one rank")
        self.ranks = list(ranks)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.poll_timeout_s = poll_timeout_s
        self.restart_poll_s = 1.0  # how often a dead rank is checked for its restart
        self.num_retries = 0  # requests re-run on another pair after a failure
        self.num_rank_failures = 0  # times a rank was found dead or failing
        self.num_add_calls = 0  # `add_requests` actor calls (each carries one or more adds)
        self.num_pool_wakes = 0  # `wake` calls to the other ranks of a quiet pool
        self._pool_last_add: dict[tuple[str, int], float] = {}  # (role, instance) -> time
        self.num_deltas = 0  # token deltas handed to requests (at most one per request a poll)
        self.request_timeout_s = request_timeout_s
        self.infos: list[RankInfo | None] = [None] * len(ranks)
        self.rank_errors: list[str | None] = [None] * len(ranks)
        self._requests: dict[str, _Request] = {}
        # The load this router put on each rank (see `orchestrator.policy`).
        self._reserved_tokens = [0] * len(ranks)
        self._queued_prefill_tokens = [0] * len(ranks)
        # Prefix affinity: the key of a prompt's first AFFINITY_TOKENS -> the rank that last
        # computed such a prompt (whose prefix cache likely holds them), oldest first.
        self._affinity: OrderedDict[bytes, int] = OrderedDict()
        self._running = [0] * len(ranks)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        # Adds waiting for this event-loop pass to end, per rank (see `_add`).
        self._adds: dict[int, list[tuple[GenerateRequest, asyncio.Future[None]]]] = {}
        self._ready: asyncio.Event | None = None  # created in start(), on the serving loop
        # Set when the server shuts down gracefully: new requests are refused (503, /health
        # says "draining") while the ones in flight run to their end.
        self.draining = False

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one task per rank: wait for it to be ready, then poll it until `close`."""
        self._ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._run_rank(i), name=f"router-rank-{i}")
            for i in range(len(self.ranks))
        ]

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once every rank is ready; raise RouterNotReady if one died, TimeoutError."""
        if self._ready is None:
            raise RouterNotReady("the router was not started")
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        if not self.is_ready:
            raise RouterNotReady(self._dead_message())

    @property
    def is_ready(self) -> bool:
        """True when every rank has loaded its model, none has died, and the server is not
        draining."""
        loaded = all(i is not None for i in self.infos) and not any(self.rank_errors)
        return loaded and not self.draining

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    @property
    def limits(self) -> Limits:
        infos = [i for i in self.infos if i is not None]
        if len(infos) < len(self.ranks):
            raise RouterNotReady("the model is still loading")
        return Limits(
            vocab_size=min(i.vocab_size for i in infos),
            max_context_len=min(i.max_context_len for i in infos),
            kv_capacity_tokens=min(i.kv_capacity_tokens for i in infos),
        )

    async def close(self, shutdown_ranks: bool = False) -> None:
        """Stop polling, end every in-flight request with an error, optionally shut ranks down."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._fail_requests(None, "the server is shutting down")
        if shutdown_ranks:
            for handle in self.ranks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(handle.shutdown.remote(), 15)

    async def _run_rank(self, index: int) -> None:
        """Wait for rank `index`, then poll it. When it dies, fail its requests at once, report
        the pool degraded, and wait for Ray to restart it (`max_restarts`); then go on."""
        handle = self.ranks[index]
        while True:
            try:
                self.infos[index] = await handle.ready.remote()
                if self.rank_errors[index] is not None:
                    logger.warning("engine rank %d is back", index)
                self.rank_errors[index] = None
                if all(i is not None for i in self.infos):
                    assert self._ready is not None
                    self._ready.set()
                await self._poll_rank(index)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                message = f"engine rank {index} failed: {short_error(e)}"
                if self.rank_errors[index] is None:
                    self.num_rank_failures += 1
                    logger.error("%s", message)
                    self._fail_requests(index, message)
                self.rank_errors[index] = message
                assert self._ready is not None
                self._ready.set()  # wake waiters: readiness is now decided (failed)
                await asyncio.sleep(self.restart_poll_s)

    async def _poll_rank(self, index: int) -> None:
        handle = self.ranks[index]
        while True:
            items: list[TokenDelta | TransferReady] = await handle.poll.remote(self.poll_timeout_s)
            targets: dict[int, list[tuple[str, Any]]] = {}  # prefill rank -> (rid, target)
            for item in items:
                req = self._requests.get(item.rid)
                if req is None:
                    continue
                if isinstance(item, TransferReady):
                    if req.prefill_rank is not None:
                        targets.setdefault(req.prefill_rank, []).append((item.rid, item.target))
                    continue
                if index == req.prefill_rank and item.finish_reason is not None:
                    # The prefill side failed: the decode side waits for KV that won't come.
                    self._spawn(self.ranks[req.rank].abort.remote(item.rid))
                elif index == req.rank and item.token_ids and req.queued_here:
                    self._queued_prefill_tokens[index] -= req.num_prompt_tokens
                    req.queued_here = False
                elif index == req.rank and item.token_ids and req.prefill_rank is not None:
                    # Decoding: it no longer depends on (or loads) the prefill rank.
                    self._queued_prefill_tokens[req.prefill_rank] -= req.num_prompt_tokens
                    self._running[req.prefill_rank] -= 1
                    req.prefill_rank = None
                self.num_deltas += 1
                req.queue.put_nowait(item)
            # One call per prefill rank for all the targets this poll brought.
            for prefill_rank, pairs in targets.items():
                self._spawn(self.ranks[prefill_rank].set_transfer_targets.remote(pairs))

    def _spawn(self, awaitable: Any) -> None:
        """Fire and forget an actor call; failures surface through the polls."""

        async def run() -> None:
            with contextlib.suppress(Exception):
                await awaitable

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def loads(self) -> list[RankLoad]:
        """Each rank's load as the pair-picking policy sees it."""
        return [
            RankLoad(
                role=info.role if info is not None else "",
                alive=info is not None and err is None,
                kv_capacity_tokens=info.kv_capacity_tokens if info is not None else 0,
                num_queued_prefill_tokens=self._queued_prefill_tokens[i],
                num_reserved_tokens=self._reserved_tokens[i],
                num_running=self._running[i],
            )
            for i, (info, err) in enumerate(zip(self.infos, self.rank_errors, strict=True))
        ]

    def _pick(self, avoid: frozenset[int] = frozenset(), input_ids: Sequence[int] = ()) -> Pick:
        """The ranks for a new request (`orchestrator.policy.pick_ranks`), with prefix
        affinity for `input_ids`; ranks in `avoid` are not picked. RouterNotReady when no live
        rank (pair) can take it."""
        key = prefix_key(input_ids)
        affinity = None
        if key is not None and key in self._affinity:
            affinity = Affinity(self._affinity[key], slack_tokens=len(input_ids))
        pick = pick_ranks(self.loads(), avoid, affinity)
        if pick is None:
            raise RouterNotReady(self._dead_message())
        if key is not None:
            self._affinity[key] = pick.rank if pick.prefill_rank is None else pick.prefill_rank
            self._affinity.move_to_end(key)
            if len(self._affinity) > MAX_AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return pick

    def _fail_requests(self, rank: int | None, message: str) -> None:
        for req in list(self._requests.values()):
            if rank is None or rank in (req.rank, req.prefill_rank):
                req.queue.put_nowait(
                    TokenDelta(req.rid, [], finish_reason=FinishReason.ERROR, error=message)
                )

    def _dead_message(self) -> str:
        errors = [e for e in self.rank_errors if e]
        return "; ".join(errors) if errors else "the model is still loading"

    # ---- requests -------------------------------------------------------------------------

    async def generate(
        self,
        input_ids: list[int],
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        rid: str | None = None,
        timeout_s: float | None = None,
        stream: bool = True,
    ) -> AsyncGenerator[Output, None]:
        """Run one request; yield its `Output`s, the last with `finish_reason` set.

        `stream=False`: the caller wants the output whole. Unless there are stop strings to
        match as the text grows, the rank then sends the first token and the rest at the end
        (one output instead of one per engine step: far less work for rank, router and HTTP).

        Raises ValueError (message naming the field) when a rank refuses the request before it
        starts, RouterNotReady when no rank can take it. Closing the iterator early (client gone)
        or a stop string or timeout aborts the request on its rank. A request whose rank died
        while taking it, and a disaggregated request that fails before its first token (a rank
        died, a transfer failed), is retried once on another rank (pair) when there is one."""
        if self.draining:
            raise RouterNotReady("the server is shutting down (draining the requests in flight)")
        rid = rid or uuid.uuid4().hex
        used: list[tuple[int, int | None]] = []
        whole = not stream and not stop
        first = self._attempt(input_ids, sampling, stop, rid, timeout_s, frozenset(), used, whole)
        streamed = False  # a token reached the consumer: too late to retry
        avoid: frozenset[int] | None = None  # set when the request is to be retried
        reason: str | None = None
        try:
            async with contextlib.aclosing(first) as outs:
                async for out in outs:
                    retry = out.finish_reason == "error" and not streamed and not out.token_ids
                    if not (retry and used and used[0][1] is not None):
                        streamed = streamed or bool(out.token_ids)
                        yield out
                        continue
                    # Another prefill rank; a dead decode rank is skipped anyway (not live).
                    candidate = frozenset(r for r in used[0][1:] if r is not None)
                    if not self._can_pick(candidate):
                        yield out  # no other pair: the error stands
                        return
                    avoid, reason = candidate, out.error
                    break
        except _RankUnreachable as e:
            # A rank died while taking the request: nothing ran anywhere yet.
            if not self._can_pick(frozenset({e.rank})):
                raise
            avoid, reason = frozenset({e.rank}), str(e)
        if avoid is None:
            return
        self.num_retries += 1
        logger.warning("request %s failed before its first token (%s); retrying on another "
                       "rank", rid, reason)  # fmt: skip
        # A new id on the ranks: the first attempt's abort may not have reached them yet.
        retry_rid = f"{rid}-retry"
        second = self._attempt(input_ids, sampling, stop, retry_rid, timeout_s, avoid, used, whole)
        async with contextlib.aclosing(second) as outs:
            async for out in outs:
                yield dataclasses.replace(out, rid=rid)

    def _can_pick(self, avoid: frozenset[int]) -> bool:
        return pick_ranks(self.loads(), avoid) is not None

    async def _attempt(
        self,
        input_ids: list[int],
        sampling: SamplingParams,
        stop: Sequence[str],
        rid: str,
        timeout_s: float | None,
        avoid: frozenset[int],
        used: list[tuple[int, int | None]],
        whole: bool = False,
    ) -> AsyncGenerator[Output, None]:
        """One try of `generate` on the pair `_pick(avoid)`, recorded in `used`; `whole`: the
        ranks may hold the output after the first token until the end."""
        rank, prefill_rank = self._pick(avoid, input_ids)
        here = sampling.prompt_logprobs and prefill_rank is not None
        if here:  # scoring a prompt: its prefill rank, which has the logits, does it all
            assert prefill_rank is not None
            rank, prefill_rank = prefill_rank, None
        used.append((rank, prefill_rank))
        if rid in self._requests:
            raise ValueError(f"rid: request {rid!r} is already running")
        timeout_s = timeout_s if timeout_s is not None else self.request_timeout_s
        handle = self.ranks[rank]
        req = _Request(
            rid, rank, len(input_ids) + sampling.max_new_tokens, len(input_ids), prefill_rank
        )
        self._requests[rid] = req
        self._reserved_tokens[rank] += req.num_tokens
        self._running[rank] += 1
        if here:
            req.queued_here = True
            self._queued_prefill_tokens[rank] += req.num_prompt_tokens
        if prefill_rank is not None:
            self._queued_prefill_tokens[prefill_rank] += req.num_prompt_tokens
            self._running[prefill_rank] += 1
        detok = IncrementalDetokenizer(
            self.tokenizer, input_ids, stop, min_new_tokens=sampling.min_new_tokens
        )
        finished = False
        add_ref = prefill_ref = None
        timer: asyncio.TimerHandle | None = None
        try:
            request = GenerateRequest(
                rid, list(input_ids), sampling, stream=not whole, generate_here=here
            )
            # Decode side first, so that its receive is posted while the prompt computes.
            add_ref = self._add(rank, request)
            if prefill_rank is not None:
                prefill_ref = self._add(prefill_rank, request)
            # A timer, not `asyncio.wait_for`: before Python 3.12, wait_for swallows a
            # cancellation (client gone) that coincides with a delta arriving. It runs from the
            # start: a rank that cannot be reached must not hold the request past its timeout.
            timed_out = TokenDelta(rid, [], FinishReason.ABORT, error="timeout")
            if timeout_s is not None:
                timer = asyncio.get_running_loop().call_later(
                    timeout_s, req.queue.put_nowait, timed_out
                )
            accepted = asyncio.ensure_future(
                self._accepted((add_ref, rank), (prefill_ref, prefill_rank))
            )
            first = asyncio.ensure_future(req.queue.get())
            try:
                await asyncio.wait({accepted, first}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                first.cancel()
                accepted.cancel()
                raise
            early: TokenDelta | None = None
            if first.done():
                early = first.result()
            else:
                first.cancel()
            if accepted.done():
                try:
                    accepted.result()
                except ValueError as e:
                    # Refused: nothing runs. (Disaggregated, the other side may have accepted
                    # it: leave `finished` False so that both sides are told to abort.)
                    finished = prefill_ref is None
                    raise ValueError(short_error(e)) from None
                except _RankUnreachable:
                    finished = prefill_ref is None
                    raise
            else:
                # Output (an error from one side, or the timeout) came before both ranks took
                # the request — one of them may be unreachable: go on with what came.
                accepted.add_done_callback(_log_late_refusal)
            num_output_tokens = 0
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
                        rid=rid,
                        text=detok.flush(),
                        token_ids=[],
                        num_prompt_tokens=len(input_ids),
                        num_output_tokens=num_output_tokens,
                        finish_reason="abort",
                        error=f"the request timed out after {timeout_s:g} s",
                    )
                    return
                num_output_tokens = delta.num_output_tokens or num_output_tokens
                out = self._output(delta, detok)
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
            self._reserved_tokens[rank] -= req.num_tokens
            self._running[rank] -= 1
            if req.prefill_rank is not None:  # still on it (no token came from decode yet)
                self._queued_prefill_tokens[req.prefill_rank] -= req.num_prompt_tokens
                self._running[req.prefill_rank] -= 1
            if req.queued_here:
                self._queued_prefill_tokens[rank] -= req.num_prompt_tokens
            if not finished:
                if add_ref is not None:
                    self._spawn(self._abort_after(handle, add_ref, rid))
                if prefill_ref is not None and prefill_rank is not None:
                    self._spawn(self._abort_after(self.ranks[prefill_rank], prefill_ref, rid))

    def _add(self, rank: int, request: GenerateRequest) -> asyncio.Future[None]:
        """`add_request` on `rank`, batched: the adds of one event-loop pass reach a rank in one
        actor call (`add_requests`; a burst of arrivals costs one round trip, not one each).
        The future raises what the single call would: ValueError (refused), or the error the
        call failed with."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(_retrieve)  # nobody may await it (the client left at once)
        pending = self._adds.setdefault(rank, [])
        if not pending:
            loop.call_soon(self._send_adds, rank)
        pending.append((request, future))
        return future

    def _send_adds(self, rank: int) -> None:
        batch = self._adds.pop(rank, [])
        if not batch:
            return
        ref = self.ranks[rank].add_requests.remote([request for request, _ in batch])
        self.num_add_calls += 1
        self._wake_pool_of(rank)

        async def settle() -> None:
            try:
                refusals: list[str | None] = await ref
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                return
            for (_, future), refusal in zip(batch, refusals, strict=True):
                if future.done():
                    continue
                if refusal is None:
                    future.set_result(None)
                else:
                    future.set_exception(ValueError(refusal))

        task = asyncio.get_running_loop().create_task(settle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _wake_pool_of(self, rank: int) -> None:
        """Wake the other ranks of `rank`'s expert-parallel pool when it has been quiet (see
        `POOL_QUIET_S`), so that the work just sent does not wait for them to join a step."""
        info = self.infos[rank]
        if info is None or info.pool_size < 2:
            return
        pool = (info.role, info.instance)
        now = asyncio.get_running_loop().time()
        last = self._pool_last_add.get(pool)
        self._pool_last_add[pool] = now
        if last is not None and now - last < POOL_QUIET_S:
            return
        for peer, peer_info in enumerate(self.infos):
            if (
                peer != rank
                and peer_info is not None
                and (peer_info.role, peer_info.instance) == pool
            ):
                self.num_pool_wakes += 1
                self._spawn(self.ranks[peer].wake.remote())

    def _output(self, delta: TokenDelta, detok: IncrementalDetokenizer) -> Output:
        text = detok.add(delta.token_ids)
        finish = delta.finish_reason.value if delta.finish_reason is not None else None
        matched: str | int | None = None
        if detok.stopped:
            finish, matched = "stop", detok.matched_stop
        elif finish is not None:
            text += detok.flush()
            if finish == "stop" and delta.token_ids:
                matched = delta.token_ids[-1]
        return Output(
            rid=delta.rid,
            text=text,
            token_ids=list(delta.token_ids),
            num_prompt_tokens=delta.num_prompt_tokens,
            num_output_tokens=delta.num_output_tokens,
            finish_reason=finish,
            matched_stop=matched,
            error=delta.error,
            logprobs=None if delta.logprobs is None else list(delta.logprobs),
            num_cached_tokens=delta.num_cached_tokens,
            prompt_logprobs=delta.prompt_logprobs,
        )

    @staticmethod
    async def _accepted(*sides: tuple[Any, int | None]) -> None:
        """Every side (`add_request` ref, rank) took the request. Raises the first refusal
        (ValueError), or `_RankUnreachable` naming the rank whose call failed otherwise."""
        for ref, rank in sides:
            if ref is None or rank is None:
                continue
            try:
                await ref
            except ValueError:
                raise
            except Exception as e:
                raise _RankUnreachable(rank, e) from None

    @staticmethod
    async def _abort_after(handle: Any, add_ref: Any, rid: str) -> None:
        """Abort `rid` once its `add_request` has reached the rank (calls to a threaded actor
        may run out of order, so an abort sent earlier could miss the request)."""
        with contextlib.suppress(Exception):
            await add_ref
            await handle.abort.remote(rid)

    async def abort(self, rid: str) -> bool:
        """Abort a running request; its generator then ends with finish_reason "abort"."""
        req = self._requests.get(rid)
        if req is None:
            return False
        await self.ranks[req.rank].abort.remote(rid)
        if req.prefill_rank is not None:
            await self.ranks[req.prefill_rank].abort.remote(rid)
        return True

    async def flush_prefix_cache(self) -> int:
        """Forget the prefix cache of every live rank; the cached pages freed in all."""
        live = [h for h, info, err in zip(self.ranks, self.infos, self.rank_errors, strict=True)
                if info is not None and err is None]  # fmt: skip
        return sum(await asyncio.gather(*(h.flush_prefix_cache.remote() for h in live)))

    async def stats(self) -> list[RankStats | None]:
        """Each rank's stats; None for a rank that is not ready or does not answer."""

        async def one(i: int) -> RankStats | None:
            if self.infos[i] is None or self.rank_errors[i] is not None:
                return None
            try:
                stats: RankStats = await asyncio.wait_for(self.ranks[i].stats.remote(), 5)
                return stats
            except Exception:
                return None

        return list(await asyncio.gather(*(one(i) for i in range(len(self.ranks)))))


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's exception as seen (asyncio logs an unseen one as an error)."""
    if not future.cancelled():
        future.exception()


def _log_late_refusal(task: asyncio.Future[None]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        logger.info("a rank answered a request late: %s", short_error(error))
