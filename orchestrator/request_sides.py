"""A disaggregated request has two sides, its prefill and its decode rank, and reaches each by
an add of its own (`RankTable.add`): `accepted_or_first` waits for both to take it (or for its
first output, whichever is first); `abort_after` aborts one side once its add got there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from orchestrator.ranks import RankTable
from orchestrator.routed import RankUnreachable
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


async def abort_after(ranks: RankTable, rank: int, add_ref: Any, rid: str) -> None:
    """Abort `rid` on `rank` once its add (`add_ref`) reached it: sent by actor call, adds
    leave in batches and calls to a threaded actor may run out of order, so an abort sent
    earlier could miss the request there (on the rank's stream the order holds anyway).
    Errors are ignored (a dead rank holds nothing)."""
    await asyncio.wait([add_ref])  # settled either way (a refused add: the abort is a no-op)
    with contextlib.suppress(Exception):
        ranks.send_command(rank, ("abort", rid))


def _log_late_refusal(task: asyncio.Future[None]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        logger.info("a rank answered a request late: %s", short_error(error))
