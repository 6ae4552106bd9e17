"""`KVMoves`: which requests move to another rank with their KV, and what came of the moves.

A rank that hands requests off (`RankInfo.migrates`: decode ranks, and colocated ranks of a
server that may scale) takes a request out of its batch at a step boundary and sends its KV as
a prefill rank sends a prompt's (`workers.engine.handoff.KVHandoff.migrate_out`); the request's
next attempt (`attempt.run_attempt(moved_from=...)`) has a rank of the same role receive it and
decode on. This module decides which requests are asked and to where — off a pool instance
scaled down (`move_from`), onto one that joined (`balance`), or off a rank whose KV runs out
(`relieve`, planned by `orchestrator.kv_relief`) — and keeps the counts: a move
counts once its KV arrived (`RankTable.moved_off`, the new rank's first token), a move that
failed as a resume (`failed`). See docs/architecture.md, "Migrating a request with its KV".

Everything here runs on the router's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from orchestrator.kv_relief import Movable, Move
from orchestrator.ranks import RankTable
from orchestrator.routed import RoutedRequest

# `KVMoves.balance` moves requests off a rank whose reserved KV is over its role's overall
# share of capacity by more than this fraction of its own capacity.
BALANCE_SLACK = 0.1
# ... and the requests it moves hold at most this share of their receivers' free KV pages.
ROOM_USE = 0.8


def _held(req: RoutedRequest) -> int:
    """The tokens `req` holds in KV now: its prompt and the output so far."""
    return req.num_input_tokens + req.num_output_tokens


class KVMoves:
    def __init__(
        self,
        ranks: RankTable,
        requests: Mapping[str, RoutedRequest],
        next_rid: Callable[[str], str],
    ):
        """`requests`: the router's attempts in flight by id; `next_rid(client_rid)`: a new
        attempt id for that client request (the id a moved request's KV waits under)."""
        self.ranks = ranks
        self.requests = requests
        self.next_rid = next_rid
        # Requests whose move off a rank failed (they resumed from their output), by that rank.
        self.failed: Counter[int] = Counter()
        self.num_relieved = 0  # requests asked to move off a rank whose KV ran out

    # ---- where a moving request goes ----------------------------------------------------------

    def receiver(
        self, source: int, avoid: frozenset[int], planned: int | None = None
    ) -> int | None:
        """The rank that takes a request moving off `source` with its KV: `planned` (the rank
        its move was planned to, `RoutedRequest.move_to`) while that one can, else of its role
        the most free KV outside `avoid` (`RankTable.pick_receiver`); None when none can."""
        info = self.ranks.infos[source]
        if info is None:
            return None
        if planned is not None and planned not in avoid and planned in self.generating_ranks():
            return planned
        return self.ranks.pick_receiver(avoid, info.role)

    def generating_ranks(self) -> list[int]:
        """The live ranks that generate and take moved requests: decode ranks, or colocated
        ones when there are none."""
        loads = self.ranks.loads()
        role = "decode" if any(load.role == "decode" for load in loads) else "colocated"
        return [
            i for i, load in enumerate(loads)
            if load.alive and load.role == role and (info := self.ranks.infos[i]) is not None
            and info.migrates
        ]  # fmt: skip

    def can_move_from(self, ranks: Sequence[int]) -> bool:
        """Whether requests on `ranks` (one pool instance) could move with their KV: the ranks
        hand requests off, and another rank of their role takes them."""
        infos = [self.ranks.infos[i] for i in ranks]
        if not ranks or not all(info is not None and info.migrates for info in infos):
            return False
        return self.receiver(ranks[0], frozenset(ranks)) is not None

    def movable(self, req: RoutedRequest) -> bool:
        """Whether `req` may be handed off with its KV: decoding on a live rank that hands
        requests off (its first token came from there), not handed off already, not ending."""
        info = self.ranks.infos[req.rank]
        return (
            info is not None and info.migrates and self.ranks.is_live(req.rank)
            and req.prefill_rank is None and not req.migrating and req.lost is None
            and not req.aborted
        )  # fmt: skip

    # ---- asking ---------------------------------------------------------------------------------

    def candidates(self, ranks: Sequence[int]) -> set[str]:
        """The requests (attempt ids) a scale-down of `ranks` moves with their KV: those that
        decode there, or whose prompt a prefill rank computes for them — not those queued
        there without output (they start again elsewhere at once)."""
        on = set(ranks)
        return {
            r.rid for r in self.requests.values()
            if r.rank in on and (r.num_output_tokens > 0 or r.prefill_rank is not None)
        }  # fmt: skip

    def move_from(self, ranks: Sequence[int], only: set[str] | None = None) -> int:
        """Ask `ranks` (a decode or colocated pool instance scaled down) to hand the requests
        decoding on them (of `only`, when given) off with their KV; how many were asked. At
        its rank's next step boundary each leaves the batch, and its next attempt goes to the
        rank `receiver` gives it, which receives the KV of its tokens and decodes on: nothing
        is computed again, the tokens are those it would have made. One not decoding there
        then (preempted) goes once it decodes again; one whose new rank has no free pages for
        its KV is refused there at once and resumes from its output instead. Nothing is asked
        when no rank can take them (`can_move_from`)."""
        if not self.can_move_from(ranks):
            return 0
        on = frozenset(ranks)
        asked: dict[int, list[RoutedRequest]] = {}
        for req in self.requests.values():
            if req.rank in on and self.movable(req) and (only is None or req.rid in only):
                asked.setdefault(req.rank, []).append(req)
        return self._hand_off(asked)

    def balance(self, free_tokens: Mapping[int, int] | None = None) -> int:
        """Even out the generating ranks' load (decode ranks; colocated ones when there are
        none) by moving requests with their KV, from ranks whose reserved KV tokens (prompt +
        `max_new_tokens` of each request, the policy's measure) are over those ranks' overall
        share of their capacity by more than `BALANCE_SLACK` of it, towards that share; the
        rank with the most free KV takes each. For a scale-up: the new instances take running
        requests at once instead of only new ones. `free_tokens`: each rank's free KV pages
        now, in tokens (its stats): the requests moved hold (their tokens so far) at most
        `ROOM_USE` of the free tokens of the ranks under the share — an over-committed rank
        gives up no more than its receivers can hold, rather than having them refuse the
        rest (which then compute their KV again). How many were asked to move."""
        loads = self.ranks.loads()
        ranks = self.generating_ranks()
        capacity = sum(loads[i].kv_capacity_tokens for i in ranks)
        if len(ranks) < 2 or capacity <= 0:
            return 0
        share = sum(loads[i].num_reserved_tokens for i in ranks) / capacity
        room = float("inf")
        if free_tokens is not None:
            under = [
                i
                for i in ranks
                if loads[i].num_reserved_tokens < share * loads[i].kv_capacity_tokens
            ]
            room = ROOM_USE * sum(free_tokens.get(i, 0) for i in under)
        asked: dict[int, list[RoutedRequest]] = {}
        for i in ranks:
            cap = loads[i].kv_capacity_tokens
            excess = loads[i].num_reserved_tokens - share * cap
            if excess <= BALANCE_SLACK * cap:
                continue
            # The requests with the most tokens still to make first: they gain the most.
            movable = sorted(
                (r for r in self.requests.values() if r.rank == i and self.movable(r)),
                key=lambda r: r.num_tokens - _held(r),
                reverse=True,
            )
            for req in movable:
                if 2 * excess < req.num_tokens:  # it would leave the rank further from it
                    continue
                if _held(req) > room:
                    break
                asked.setdefault(i, []).append(req)
                excess -= req.num_tokens
                room -= _held(req)
        return self._hand_off(asked)

    async def move_off(
        self, ranks: Sequence[int], timeout_s: float, stopped: Callable[[], bool] = lambda: False
    ) -> None:
        """Move the requests on `ranks` (a pool instance scaled down) off with their KV
        (`move_from`, those there now) and wait until each has been taken on by its next rank
        (or failed and resumed from its output), for up to `timeout_s` or until `stopped()`.
        Nothing when no rank can take them (`can_move_from`)."""
        if not self.can_move_from(ranks):
            return
        until = time.monotonic() + timeout_s
        candidates = self.candidates(ranks)
        while not stopped():
            self.move_from(ranks, candidates)
            if not self.pending(ranks) or time.monotonic() >= until:
                return
            await asyncio.sleep(0.02)

    def movable_requests(self, ranks: Iterable[int]) -> list[Movable]:
        """The requests on `ranks` that may move with their KV (`movable`) to relieve their
        rank: not those that came there by a move (no request goes back and forth)."""
        on = set(ranks)
        return [
            Movable(r.rid, r.rank, _held(r), r.num_tokens - _held(r))
            for r in self.requests.values()
            if r.rank in on and self.movable(r) and r.moved_from is None
        ]

    def relieve(self, plan: Mapping[int, Sequence[Move]]) -> int:
        """Ask for the moves `orchestrator.kv_relief.plan_relief` planned off ranks whose KV
        runs out, each to the rank it planned while that one can take it; how many were
        asked."""
        asked: dict[int, list[RoutedRequest]] = {}
        for rank, moves in plan.items():
            for move in moves:
                req = self.requests.get(move.rid)
                if req is not None and req.rank == rank and self.movable(req):
                    req.move_to = move.to
                    asked.setdefault(rank, []).append(req)
        num = self._hand_off(asked)
        self.num_relieved += num
        return num

    def _hand_off(self, asked: dict[int, list[RoutedRequest]]) -> int:
        """Send each rank of `asked` its `migrate` command for those requests; how many."""
        for rank, reqs in asked.items():
            moves = []
            for req in reqs:
                req.migrating = True
                moves.append((req.rid, self.next_rid(req.client_rid)))
            with contextlib.suppress(Exception):
                self.ranks.send_command(rank, ("migrate", moves))
        return sum(map(len, asked.values()))

    def forget(self, moved: tuple[int, str]) -> None:
        """Abort the transfer of a moved request's KV that no attempt takes (the request
        ended meanwhile, or no rank is left to take it): its rank frees the pages."""
        with contextlib.suppress(Exception):
            self.ranks.send_command(moved[0], ("abort", moved[1]))

    # ---- progress and counts --------------------------------------------------------------------

    def under_way(self) -> int:
        """Requests asked to move that have not reached their next rank yet."""
        return sum(
            1
            for r in self.requests.values()
            if r.migrating or (r.moved_from is not None and r.prefill_rank is not None)
        )

    def pending(self, ranks: Sequence[int]) -> int:
        """Requests a scale-down of `ranks` waits for before it removes them: asked to move
        and not yet taken on by their next rank, and those whose prompt a prefill rank
        computes for `ranks` (they move once they decode there)."""
        on = set(ranks)
        return sum(
            1
            for r in self.requests.values()
            if r.prefill_rank in on  # its KV comes from there (a move under way)
            or (r.rank in on and (r.migrating or r.prefill_rank is not None))
        )

    def moved_off(self, ranks: Sequence[int]) -> tuple[int, int]:
        """Requests that moved off `ranks` with their KV so far, and those whose move failed
        (they resumed from their output)."""
        return (
            sum(self.ranks.moved_off[i] for i in ranks),
            sum(self.failed[i] for i in ranks),
        )

    @property
    def num_moved(self) -> int:
        """Requests that moved to another rank with their KV (it arrived there)."""
        return sum(self.ranks.moved_off.values())
