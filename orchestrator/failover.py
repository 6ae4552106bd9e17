"""What the router does when a request's rank fails under it: which ranks its next attempt
avoids (`avoid_after`), whether an error before the first token is worth another pair
(`retryable`), and — when no other rank (pair) can take it — waiting for a rank to come back
(`lost_rank`, `went_down`, `wait_for_a_rank`: Ray restarts a failed rank, the pool set replaces
the instance of one dead for good). `Router.generate` drives them; they run on its loop."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from orchestrator.jobs import Job, ended
from orchestrator.outputs import Output
from orchestrator.routed import RankUnreachable, RoutedRequest

if TYPE_CHECKING:
    from orchestrator.router import Router

logger = logging.getLogger("orchestrator.router")


def retryable(router: Router, req: RoutedRequest) -> bool:
    """Whether an error before the first token is worth another pair: disaggregated (the
    transfer or the prefill failed), or a rank of its pair was taken out (scaled down)."""
    return req.pair[1] is not None or bool(taken_out(router, req))


def avoid_after(
    router: Router, req: RoutedRequest, unreachable: RankUnreachable | None
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
    failed |= taken_out(router, req)
    for candidate in (router.ranks.with_pool_peers(frozenset(failed)), frozenset(failed)):
        if router.ranks.can_pick(candidate):
            return candidate
    return None


def taken_out(router: Router, req: RoutedRequest) -> frozenset[int]:
    """The ranks of `req`'s pair whose pool instance is scaled down."""
    return frozenset(r for r in req.pair if r is not None and r in router.ranks.closed)


def lost_rank(
    router: Router, req: RoutedRequest, unreachable: RankUnreachable | None
) -> int | None:
    """The rank whose failure ended `req`'s attempt, when it is one that may come back
    (`wait_for_a_rank`): a rank lost under it, or one it could not reach that the router
    has seen go down. None otherwise (a failed transfer, a rank that refused it or is
    scaled down — unless its instance is being replaced)."""
    if unreachable is not None:
        rank = unreachable.rank
        if router.ranks.num_downs[rank] == req.downs_at_start.get(rank):
            return None  # up as far as the router knows: nothing to wait for
    elif req.lost is not None:
        rank = req.lost[0]
    else:
        return None
    return None if rank in router.ranks.closed and not router.num_replacing else rank


async def went_down(router: Router, req: RoutedRequest, grace_s: float = 2.0) -> int | None:
    """A rank of `req`'s pair that the router sees go down (since the attempt began)
    within `grace_s`; None if none does."""
    deadline = asyncio.get_running_loop().time() + grace_s
    while True:
        for rank in req.pair:
            if rank is not None and router.ranks.num_downs[rank] != req.downs_at_start.get(rank):
                return None if rank in router.ranks.closed else rank
        if asyncio.get_running_loop().time() >= deadline:
            return None
        await asyncio.sleep(0.05)


async def wait_for_a_rank(
    router: Router, job: Job, req: RoutedRequest, lost: int
) -> frozenset[int] | Output | str:
    """Wait until a rank (pair) can take `job` on, after rank `lost` failed under its
    attempt `req` and no other could: until a rank comes back — Ray restarts a failed one,
    the pool set replaces the instance of one dead for good — for up to `restart_wait_s`
    and the job's deadline. `lost` counts only once the router has seen it go down (a
    rank that leaves a broken pool reports its requests lost just before it goes).
    Returns the ranks to avoid then; or the output that ends `job` (its timeout, its
    abort); or why it gives up."""
    loop = asyncio.get_running_loop()
    until = loop.time() + router.restart_wait_s
    if job.deadline is not None:
        until = min(until, job.deadline)
    wake = asyncio.Event()
    router.waiting[job.rid] = (job, wake)
    router.num_waited += 1
    logger.warning("request %s lost engine rank %d and no other can take it; it waits up "
                   "to %.0f s for a rank to come back", job.rid, lost,
                   until - loop.time())  # fmt: skip
    try:
        while True:
            avoid = taken_out(router, req)
            seen_down = router.ranks.num_downs[lost] != req.downs_at_start.get(lost)
            if not seen_down:
                avoid |= {lost}  # on its way out
            if job.aborted:  # first: an abort that came with the rank's return is kept
                return ended(job, "abort", None)
            if router.ranks.can_pick(avoid):
                return avoid
            if router.closing:
                return "the server is shutting down"
            left = until - loop.time()
            if left <= 0:
                if job.deadline is not None and until >= job.deadline:
                    return ended(job, "timeout", f"the request timed out after {job.timeout_s:g} s")
                return (f"no engine rank came back within {router.restart_wait_s:g} s "
                        "(--rank-restart-wait)")  # fmt: skip
            if (
                seen_down
                and not router.num_replacing
                and not any(map(router.ranks.may_come_back, router.ranks.present))
            ):
                return "no engine rank that could take it will come back"
            wake.clear()
            timer = loop.call_later(left, wake.set)
            try:
                await wake.wait()
            finally:
                timer.cancel()
    finally:
        del router.waiting[job.rid]
