"""One client request from its admission to its end (`run_request`, the body of
`Router.generate`): attempts on one rank (pair) after another (`orchestrator.attempt`) until one
ends it — a retry on another pair when it failed before its first token, a resume from its
output when its rank was lost after it (`orchestrator.failover`), a move with its KV when its
rank handed it off (`orchestrator.kv_moves`) — at most `MAX_MOVES` moves after failures. Runs on
the router's loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

from orchestrator import failover
from orchestrator.attempt import run_attempt
from orchestrator.detokenizer import IncrementalDetokenizer
from orchestrator.jobs import Job, QueueSlot, ended
from orchestrator.outputs import Output
from orchestrator.routed import DuplicateRequest, RankUnreachable, RoutedRequest
from workers.engine.messages import SamplingParams

if TYPE_CHECKING:
    from orchestrator.router import Router

logger = logging.getLogger("orchestrator.router")


MAX_MOVES = 2  # times one request goes on on another rank (pair) after a failure


async def run_request(
    router: Router,
    input_ids: list[int],
    sampling: SamplingParams,
    stop: Sequence[str],
    rid: str | None,
    timeout_s: float | None,
    stream: bool,
    slot: QueueSlot | None,
) -> AsyncGenerator[Output, None]:
    """`Router.generate` (its contract is there)."""
    if slot is None:
        (slot,) = router.admit()
    rid = rid or uuid.uuid4().hex
    if rid in router.attempt_of or rid in router.waiting or rid in router.between:
        slot.release()
        raise DuplicateRequest(f"rid: request {rid!r} is already running")
    timeout_s = timeout_s if timeout_s is not None else router.request_timeout_s
    now = asyncio.get_running_loop().time()
    job = Job(
        rid, list(input_ids), sampling, not stream and not stop, timeout_s,
        None if timeout_s is None else now + timeout_s,
        IncrementalDetokenizer(
            router.tokenizer, input_ids, stop, min_new_tokens=sampling.min_new_tokens
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
                attempt = run_attempt(router, job, avoid, used, moved_from)
                try:
                    async with contextlib.aclosing(attempt) as outs:
                        async for out in outs:
                            if (out.finish_reason == "error" and not out.token_ids
                                    and not new_tokens
                                    and failover.retryable(router, used[-1])):  # fmt: skip
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
            if used and used[-1].aborted:  # by the client meanwhile (while its last tokens
                # went out, or its rank took it): it is not tried again
                yield ended(job, "abort", None)
                return
            if router.closing:  # the router reads no rank's output any more
                break
            if moved is not None:
                if router.moves.receiver(moved[0], frozenset({moved[0]})) is not None:
                    avoid = frozenset({moved[0]})
                    logger.info("request %s moves to another rank with its KV after %d "
                                "token(s)", rid, len(job.output_ids))  # fmt: skip
                    continue
                router.moves.forget(moved)  # no rank left to take it: resumed after a failure
                moved = None
            if moves == MAX_MOVES:
                failure += (f" (after {MAX_MOVES} moves to other ranks or restarted ones, the "
                            "most a request makes)")  # fmt: skip
                break
            moves += 1
            next_avoid = failover.avoid_after(router, used[-1], unreachable)
            if next_avoid is None:
                if router.restart_wait_s <= 0:
                    break
                lost = failover.lost_rank(router, used[-1], unreachable)
                if lost is None and used[-1].lost is None and unreachable is None:
                    # A failed transfer, maybe because a rank of the pair just died: the
                    # router sees that on the rank's stream a moment later.
                    router.between[job.rid] = job
                    try:
                        lost = await failover.went_down(router, used[-1])
                    finally:
                        del router.between[job.rid]
                    if job.aborted:
                        yield ended(job, "abort", None)
                        return
                if lost is None:
                    break
                waited = await failover.wait_for_a_rank(router, job, used[-1], lost)
                if isinstance(waited, Output):
                    yield waited
                    return
                if isinstance(waited, str):
                    failure = f"{failure}; {waited}"
                    break
                next_avoid = waited
            avoid = next_avoid
            if job.output_ids:
                router.num_resumed += 1
                if used[-1].moved_from is not None:  # its move with its KV failed
                    router.moves.failed[used[-1].moved_from] += 1
                logger.warning("request %s lost its rank after %d token(s) (%s); resuming "
                               "it", rid, len(job.output_ids), failure)  # fmt: skip
            else:
                router.num_retries += 1
                logger.warning("request %s failed before its first token (%s); retrying on "
                               "another rank", rid, failure)  # fmt: skip
        if unreachable is not None and not job.output_ids:
            raise unreachable  # nothing ran, nothing was said: the caller answers 503
        yield ended(job, "error", failure)
    finally:
        slot.release()
        if moved is not None:
            router.moves.forget(moved)
