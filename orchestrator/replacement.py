"""Replacing a pool instance whose rank is dead for good, while the server runs.

A rank that dies is restarted by Ray; one whose actor is dead for good (its constructor failed —
the model did not load, a GPU fault — or it was killed for good) would leave its instance down
for good. With `watch_dead_ranks` (the default; `--disable-instance-replacement` turns it off)
the router reports such a rank and the instance is replaced: taken down at once (nothing runs on
it; its placement group goes first, so that a full cluster has room for the new one), then a new
instance of its role is started, retried with a growing delay (`REPLACE_RETRY_S`, up to
`REPLACE_RETRY_MAX_S`) while it fails to start, until the role is back to its count. Requests
that waited for a rank of it (`--rank-restart-wait`) resume on the new one. A replacement is one
change like a scale (`orchestrator.scaling`: `take_down`, `bring_up`), one at a time with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from orchestrator.placement import PoolSpec
from orchestrator.pool_instance import PoolInstance
from orchestrator.scaling import bring_up, take_down

if TYPE_CHECKING:
    from orchestrator.pools import PoolSet

logger = logging.getLogger("orchestrator.scaling")

# A replacement of a dead instance that fails to start is tried again after this long, doubled
# each time up to the maximum.
REPLACE_RETRY_S = 10.0
REPLACE_RETRY_MAX_S = 300.0


def watch_dead_ranks(pools: PoolSet, router: Any, eplb: Any) -> None:
    """Replace the instance of any rank the router finds dead for good (see the module
    doc); call on the router's loop."""

    def gone(index: int) -> None:
        instance = next((i for i in pools.instances
                         if index in i.indices and i.state == "serving"), None)  # fmt: skip
        if instance is None or instance.name in pools.replacing or pools.stopped:
            return
        router.num_replacing += 1  # now: requests waiting for a rank wait for this one
        task = asyncio.ensure_future(_replace(pools, router, eplb, instance))
        pools.replacing[instance.name] = task

    router.on_rank_gone = gone


async def _replace(pools: PoolSet, router: Any, eplb: Any, dead: PoolInstance) -> None:
    """Take `dead` down and start instances of its role until it has its count again."""
    role = dead.spec.role
    try:
        if await asyncio.to_thread(pools.deployment_removed):  # (a GCS call)
            return
        await asyncio.to_thread(pools.record)  # (front routers' requests wait for it)
        while pools.scaling:  # one change at a time (a scale, the autoscaler, another)
            if pools.stopped or pools.stopping or router.draining:
                return
            await asyncio.sleep(0.2)
        if dead not in pools.instances:
            logger.warning("pool instance %s, whose rank is dead for good, was scaled down "
                           "meanwhile; not replacing it", dead.name)  # fmt: skip
            return
        want = pools.counts()[role]
        logger.error("pool instance %s has a rank that is dead for good; replacing it",
                     dead.name)  # fmt: skip
        pools.scaling = True
        try:
            await take_down(pools, router, eplb, dead, 0.0, migrate=False)
        finally:
            pools.scaling = False
        scales = pools.num_scales[role]
        delay = REPLACE_RETRY_S
        while pools.counts()[role] < want:
            if pools.stopped or pools.stopping or router.draining:
                return
            if pools.scaling:
                await asyncio.sleep(0.2)
                continue
            if pools.num_scales[role] != scales:
                logger.warning("replacing %s: a scale set the count of %s meanwhile; the "
                               "replacement stops", dead.name, role)  # fmt: skip
                return
            spec = PoolSpec(role, pools.next_number[role], *pools.shapes[role])
            pools.next_number[role] += 1
            pools.scaling = True
            try:
                with ThreadPoolExecutor(1, "pdserve-replace") as threads:
                    await bring_up(pools, router, eplb, spec, threads)
            except Exception as e:
                logger.error("replacing %s: %s did not start (%s); trying again in %.0f s",
                             dead.name, spec.name, e, delay)  # fmt: skip
            else:
                pools.num_replaced[role] += 1
                logger.warning("replaced pool instance %s by %s", dead.name, spec.name)
                continue
            finally:
                pools.scaling = False
            await asyncio.sleep(delay)
            delay = min(2 * delay, REPLACE_RETRY_MAX_S)
    finally:
        pools.replacing.pop(dead.name, None)
        router.num_replacing -= 1
        router.wake_waiting()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(pools.record)
