"""`PeerLoadWatch`: what a deployment's other routers hold on each rank, for this router's picks.

A router picks ranks from its own accounting of what it sent them (`orchestrator.policy`):
exact and current, but blind to the requests of the deployment's other routers (its primary
and front routers, `orchestrator.front`). With the clients spread evenly over the routers that
evens out; with uneven traffic (a load balancer's skew, one client with long requests, one
router taking more streams), each router would fill the same ranks first. So a router that
serves a deployment asks every rank, every `PEER_LOAD_S`, what each router's requests hold there
(`EngineWorker.load_by_router`, by router tag) and adds the other routers' share to its own
counts (`RankTable.peer_load`): the load is current for its own requests and at most
`PEER_LOAD_S` old for the others'. A decode rank's unstarted prompts (waiting for a prefill
rank) count in its reservations only, as in the router's own accounting.

A rank that does not answer keeps its last figures (it is not picked while it is down); a
rank whose pool instance goes loses them (`RankTable.remove`). Runs on the router's event
loop, in a primary with `--deployment` and in every front router.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.periodic import Periodic
from orchestrator.ranks import RankTable
from workers.engine.rank_reports import RouterLoad

PEER_LOAD_S = 0.5  # how often a router asks the ranks for the other routers' load


def others_of(by_router: dict[str, RouterLoad], tag: str) -> list[RouterLoad]:
    """What the routers other than the one tagged `tag` hold on a rank (`load_by_router`)."""
    return [load for t, load in by_router.items() if t != tag]


def peer_share(by_router: dict[str, RouterLoad], tag: str, role: str) -> RouterLoad:
    """The load on a rank of `role` of the routers other than the one tagged `tag`, in the
    router's own terms: reservations on generating ranks only, unstarted prompts on ranks
    that compute prompts only."""
    others = others_of(by_router, tag)
    reserved = 0 if role == "prefill" else sum(load.reserved_tokens for load in others)
    unstarted = 0 if role == "decode" else sum(load.unstarted_prompt_tokens for load in others)
    return RouterLoad(
        reserved,
        unstarted,
        sum(load.requests for load in others),
        sum(load.transfers for load in others),
    )


async def ask(handle: Any, timeout_s: float = 5.0) -> dict[str, RouterLoad] | None:
    """A rank's `load_by_router`; None when it does not answer within `timeout_s`."""
    try:
        loads: dict[str, RouterLoad] = await asyncio.wait_for(
            handle.load_by_router.remote(), timeout_s
        )
        return loads
    except Exception:  # down, or restarting
        return None


class PeerLoadWatch(Periodic):
    task_name = "peer-load"
    failure = "asking the ranks for the other routers' load failed"
    failure_traceback = True  # (`ask` takes a rank's failure: not expected)

    def __init__(self, ranks: RankTable, interval_s: float = PEER_LOAD_S):
        self.ranks = ranks
        self.interval_s = interval_s
        self.num_looks = 0

    async def look(self) -> None:
        """Ask the live ranks once and keep the other routers' share of what they hold, each
        rank's as it answers (one that hangs holds up no other's); one that does not answer
        keeps its last figures."""
        table = self.ranks

        async def one(i: int) -> None:
            by_router = await ask(table.handles[i])
            info = table.infos[i]
            if by_router is not None and info is not None and i not in table.removed:
                table.peer_load[i] = peer_share(by_router, table.tag, info.role)

        await asyncio.gather(*(one(i) for i in table.present if table.is_live(i)))
        self.num_looks += 1
