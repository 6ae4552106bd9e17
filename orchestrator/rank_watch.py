"""Watching a rank from the router: wait for it to be ready, read its output stream
(`orchestrator.rank_output`), and when it fails, end or move its requests, report the pool
degraded and wait for Ray to restart it — unless its actor is dead for good (`actor_is_dead`):
then it is reported (`Router.on_rank_gone`) and no longer waited for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import ray

from orchestrator.rank_output import RankSilent, read_output
from workers.engine.messages import short_error

if TYPE_CHECKING:
    from orchestrator.router import Router

logger = logging.getLogger(__name__)


def actor_is_dead(handle: Any) -> bool:
    """Whether the Ray actor behind `handle` is dead for good (GCS says DEAD: Ray will not
    restart it). Blocking (a GCS call); False when that cannot be told."""
    actor_id = getattr(handle, "_actor_id", None)
    if actor_id is None:
        return False
    try:
        from ray._private import state  # no public call reads one actor's state without
        # the dashboard, which a cluster may run without

        return bool(state.actors(actor_id=actor_id.hex()).get("State") == "DEAD")
    except Exception:
        return False


async def watch_rank(router: Router, index: int) -> None:
    """Wait for rank `index`, then read its output stream. When it dies, fail its requests
    at once, report the pool degraded, and wait for Ray to restart it (`max_restarts`);
    then go on."""
    handle, ranks = router.ranks.handles[index], router.ranks
    while True:
        try:
            before = ranks.infos[index]
            ranks.infos[index] = info = await handle.ready.remote()
            if ranks.errors[index] is not None:
                logger.warning("engine rank %d is back", index)
            ranks.errors[index] = None
            ranks.release_orphans(index, before is not None and info.pid != before.pid)
            router.wake_waiting()
            if ranks.all_loaded:
                assert router.ready_decided is not None
                router.ready_decided.set()
            await read_output(
                ranks, index, router.stream_silence_s, partial(router.take_frame, index)
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            message = f"engine rank {index} failed: {short_error(e)}"
            if ranks.errors[index] is None:
                ranks.num_downs[index] += 1
                router.num_rank_failures += 1
                logger.error("%s", message)
                router.fail_requests(index, message)
            if isinstance(e, RankSilent) and router.kills_stuck_ranks:
                # Alive but stuck: it would hold its expert-parallel peers in their
                # collectives until those time out, and never come back by itself. Ray
                # starts it afresh (and its peers, whose collectives then fail at once).
                logger.error("engine rank %d is stuck; killing it to be restarted", index)
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=False)
            ranks.errors[index] = message
            assert router.ready_decided is not None
            router.ready_decided.set()  # wake waiters: readiness is now decided (failed)
            if await asyncio.to_thread(actor_is_dead, handle):
                ranks.gone.add(index)
                ranks.errors[index] = f"{message} (dead for good: Ray does not restart it)"
                logger.error("engine rank %d is dead for good (Ray does not restart it)",
                             index)  # fmt: skip
                ranks.release_orphans(index, process_gone=True)
                if router.on_rank_gone is not None:
                    router.on_rank_gone(index)
                router.wake_waiting()
                return
            router.wake_waiting()
            await asyncio.sleep(router.restart_poll_s)
