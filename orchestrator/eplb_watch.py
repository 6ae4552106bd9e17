"""The EPLB service's pools, and keeping the service in step with them when Ray restarts it.

The service (`eplb.service.EPLBService`) is a Ray actor started with the server's expert-
parallel pool instances; Ray restarts it when its process dies (`max_restarts`), running its
constructor again with the pools it was first given. Scaling may have changed them since, and
a rebalance it was driving may have left ranks holding staged weights. `EplbWatch` asks the
service for its incarnation (a new id per start) every few seconds; a new one makes it hand
the service the pools the router serves now (`sync_pools`, which also drops whatever a
rebalance left staged on their ranks) and start its periodic trigger again, so that
`/admin/rebalance`, `/admin/experts` and `--eplb-interval-s` go on as before — its counters
start again from zero (the metrics keep their totals).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from orchestrator.periodic import Periodic
from workers.engine.rank_reports import RankInfo

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 5.0


def expert_pools(
    handles: Sequence[Any], infos: Sequence[RankInfo | None], num_groups: int, skip: Any = ()
) -> list[Any]:
    """The expert-parallel pool instances among these ranks (`PoolHandle`s, named like
    `decode-1`, ranks in pool-rank order), leaving out the rank indices in `skip`."""
    from eplb.service import PoolHandle

    pools: dict[str, list[tuple[int, Any]]] = {}
    for i, (handle, info) in enumerate(zip(handles, infos, strict=True)):
        if info is not None and info.pool_size > 1 and i not in skip:
            pools.setdefault(f"{info.role}-{info.instance}", []).append((info.pool_rank, handle))
    return [
        PoolHandle(name, [h for _, h in sorted(members, key=lambda m: m[0])], num_groups)
        for name, members in sorted(pools.items())
    ]


class EplbWatch(Periodic):
    """Resyncs the EPLB service with the router's pools after each restart (module doc).
    One that does not answer (restarting, or gone for good) is looked at again later."""

    task_name = "eplb-watch"
    failure = "the EPLB service does not answer"
    look_at_start = True

    def __init__(
        self, eplb: Any, router: Any, num_groups: int, interval_s: float = WATCH_INTERVAL_S
    ):
        self.eplb = eplb
        self.router = router
        self.num_groups = num_groups
        self.interval_s = interval_s
        self.num_restarts = 0  # restarts seen and resynced
        self._seen: str | None = None  # the service's incarnation at the last look

    def pools_now(self) -> list[Any]:
        """The expert-parallel pools the router serves now (not those draining or gone)."""
        ranks = self.router.ranks
        return expert_pools(ranks.handles, ranks.infos, self.num_groups, ranks.closed)

    async def look(self) -> None:
        incarnation = await asyncio.wait_for(self.eplb.incarnation.remote(), 30)
        if self._seen is not None and incarnation != self._seen:
            pools = self.pools_now()
            await asyncio.wait_for(self.eplb.sync_pools.remote(pools), 120)
            # A scale that added or removed a pool while that call was on its way told the
            # service first, and the call undid it: sync again until the pools hold still.
            for _ in range(10):
                now = self.pools_now()
                if [p.name for p in now] == [p.name for p in pools]:
                    break
                pools = now
                await asyncio.wait_for(self.eplb.sync_pools.remote(pools), 120)
            await asyncio.wait_for(self.eplb.start.remote(), 30)
            self.num_restarts += 1
            logger.warning(
                "the EPLB service was restarted; it serves the %d expert-parallel "
                "pool(s) again (%s)", len(pools), ", ".join(p.name for p in pools),
            )  # fmt: skip
        self._seen = incarnation
