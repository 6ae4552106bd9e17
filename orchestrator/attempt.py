"""One try of a request on one pair of ranks (`run_attempt`): the request added to its ranks, its
deltas turned into `Output`s, and its end — however it ends — cleaned up on both sides.
`Router.generate` runs attempts until one ends the request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import TYPE_CHECKING

from orchestrator.jobs import Job
from orchestrator.outputs import Output, to_output
from orchestrator.request_sides import abort_sides, accepted_or_first
from orchestrator.routed import DuplicateRequest, RankUnreachable, RoutedRequest
from workers.engine.messages import FinishReason, GenerateRequest, TokenDelta

if TYPE_CHECKING:
    from orchestrator.router import Router


async def run_attempt(
    router: Router,
    job: Job,
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
        picked = router.moves.receiver(prefill_rank, avoid, planned)
        if picked is None:  # gone meanwhile: it resumes from its output instead
            router.moves.forget(moved_from)
            raise RankUnreachable(prefill_rank, RuntimeError("no rank left to move it to"))
        rank = picked
    else:
        rank, prefill_rank = router.ranks.pick(avoid, input_ids)
        here = sampling.prompt_logprobs and prefill_rank is not None
        if here:  # scoring a prompt: its prefill rank, which has the logits, does it all
            assert prefill_rank is not None
            rank, prefill_rank = prefill_rank, None
        if client_rid in router.attempt_of:
            raise DuplicateRequest(f"rid: request {client_rid!r} is already running")
        rid = router.next_attempt_id(client_rid)
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
    req.downs_at_start = {r: router.ranks.num_downs[r] for r in req.pair if r is not None}
    if prefill_rank is not None and (sender := router.ranks.infos[prefill_rank]) is not None:
        req.sender_pid = sender.pid
    used.append(req)
    router.attempts[rid] = req
    router.attempt_of[client_rid] = rid
    router.ranks.admit(req)
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
        add_ref = router.ranks.add(rank, request)
        req.adds.append((rank, add_ref))
        if moved_from is not None:  # the rank it left holds it already: no add there
            assert prefill_rank is not None
            held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            held.set_result(None)
            req.adds.append((prefill_rank, held))
        elif prefill_rank is not None:
            prefill_ref = router.ranks.add(prefill_rank, request)
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
                # `req.lost` names the rank (`dispatch`, `fail_requests` set it).
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
        router.attempts.pop(rid, None)
        router.attempt_of.pop(client_rid, None)
        if not finished:
            for abort in abort_sides(router.ranks, req):
                router.ranks.spawn(abort)
        router.ranks.release(req)
