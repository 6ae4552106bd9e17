"""A disaggregated request has two sides, its prefill and its decode rank, and reaches each by
an add of its own (`RankTable.add`): `accepted_or_first` waits for both to take it (or for its
first output, whichever is first); `abort_after` aborts one side once its add got there,
`abort_sides` every side of a request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from orchestrator.ranks import RankTable
from orchestrator.routed import RankUnreachable, RoutedRequest
from workers.engine.messages import TokenDelta, short_error

logger = logging.getLogger(__name__)


async def _accepted(*sides: tuple[Any, int | None]) -> None:
    """Every side (`add_request` ref, rank) took the request. Raises the first refusal
    (ValueError), or `RankUnreachable` naming the rank whose call failed otherwise."""
    for ref, rank in sides:
        if ref is None or rank is None:
            continue
        try:
            # Shielded: cancelling this wait (the client left) must not cancel the add's
            # future, which the request's aborts wait on (`abort_after`).
            await asyncio.shield(ref)
        except ValueError:
            raise
        except Exception as e:
            raise RankUnreachable(rank, e) from None


async def accepted_or_first(
    sides: tuple[tuple[Any, int | None], ...], queue: asyncio.Queue[TokenDelta]
) -> TokenDelta | None:
    """Wait until every side (`add_request` ref, rank) took the request or its first delta
    came on `queue`, whichever is first; return the delta when one came. A refusal raises
    ValueError, a side whose call failed otherwise `RankUnreachable`."""
    accepted = asyncio.ensure_future(_accepted(*sides))
    first = asyncio.ensure_future(queue.get())
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
    if not accepted.done():
        # Output (an error from one side, or the timeout) came before both ranks took the
        # request — one of them may be unreachable: go on with what came.
        accepted.add_done_callback(_log_late_refusal)
        return early
    try:
        accepted.result()
    except ValueError as e:
        raise ValueError(short_error(e)) from None
    return early


async def abort_after(
    ranks: RankTable, rank: int, add_ref: Any, rid: str, sender_idle: bool = False
) -> None:
    """Abort `rid` on `rank` once its add (`add_ref`) reached it: sent by actor call, adds
    leave in batches and calls to a threaded actor may run out of order, so an abort sent
    earlier could miss the request there (on the rank's stream the order holds anyway).
    `sender_idle`: `rank` receives the request's KV and its sender never had the target (see
    `abort_sides`). Errors are ignored (a dead rank holds nothing)."""
    await asyncio.wait([add_ref])  # settled either way (a refused add: the abort is a no-op)
    command = ("abort", rid, True) if sender_idle else ("abort", rid)
    with contextlib.suppress(Exception):
        ranks.send_command(rank, command)


def abort_sides(ranks: RankTable, req: RoutedRequest, only: int | None = None) -> list[Any]:
    """Abort `req` on each of its sides (`only`: on that rank only), each once its add got
    there: the coroutines, for the caller to spawn or await. No target goes to its sending
    side from now on, so its receiving side is told whether the sender ever had one: when it
    did not, the receive's pages are free at once (`KVHandoff.abort`) instead of being held
    until the sender is known to write no more."""
    req.targets_closed = True
    # (`pair`, not `prefill_rank`: that is cleared once the prompt is done, or the attempt
    # released, while a receive may still be waiting.)
    sender = req.pair[1]
    idle = not req.target_sent or any(
        rank == sender and _refused(ref) for rank, ref in req.adds
    )  # (a sending rank that refused the request never computes it: it writes nothing)
    if sender is not None and not idle:
        info = ranks.infos[sender]
        if sender in ranks.gone or sender in ranks.exited:
            idle = True  # its actor is dead for good, or ended (scaled down)
        elif ranks.errors[sender] is not None or sender in ranks.removed:
            # Down, or scaled down: told once its restart is seen, or its process ended.
            ranks.orphans.setdefault(sender, set()).add((req.rank, req.rid))
        elif info is not None and req.sender_pid not in (None, info.pid):
            idle = True  # restarted since: the process that had the target is gone
    receiving = req.rank if sender is not None else None
    return [
        abort_after(ranks, rank, ref, req.rid, rank == receiving and idle)
        for rank, ref in req.adds
        if only is None or rank == only
    ]


def _refused(add: Any) -> bool:
    """Whether the add (future) ended with the rank's refusal."""
    return bool(add.done() and not add.cancelled() and isinstance(add.exception(), ValueError))


def _log_late_refusal(task: asyncio.Future[None]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        logger.info("a rank answered a request late: %s", short_error(error))
