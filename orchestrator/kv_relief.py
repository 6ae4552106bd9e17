"""Relieving a generating rank whose KV runs out: some of its requests move, with their KV, to
ranks of its role that have room.

The router places requests by their reservations (prompt + `max_new_tokens`), and a busy server
over-commits them (most requests end well before their limit), so a decode rank's pages can run
out while another rank of its role has plenty. The rank then preempts its newest request, whose
prompt and output are computed again there once pages free up. `KVReliefWatch` looks at the
generating ranks' stats every `--kv-pressure-interval` seconds, and `plan_relief` picks moves:

- a rank's *floor* is what its KV in use grows by over the next `HORIZON` looks (as fast as
  over the last one: new requests and longer outputs, less those that ended; KV that moved
  in is no growth, so the look after moves measures anew), at least `PRESSED_FREE` of its
  capacity and at most `MOST_FLOOR` of it; it *wants* its floor and `RELIEVED_FREE` of its
  capacity free. A rank is *pressed* when less than its floor is free, or less than it wants
  when it preempted a request since the last look;
- a pressed rank hands off the requests holding the most KV first (each move frees the most;
  the newest, which a rank preempts first and which then hold nothing, come last; one with
  fewer than `MIN_GAIN_TOKENS` to go ends there, and one that already moved stays) until what
  it wants is free;
- each goes to the rank of its role that is not pressed and would have the most KV free once it
  had taken the request and the request had run to its end — still what that rank wants, else
  the request stays: a move should not press its receiver, and a rank that took moved
  requests in the last `COOLDOWN_LOOKS` looks hands none off (its growth then is partly theirs),
  so that nothing moves back and forth;
- with other routers (front routers, `orchestrator.front`), each moves only its own requests
  and frees its share of what a pressed rank wants (its part of the KV reserved there, from
  `RankTable.peer_load`), so that together they free it once; a rank that took requests any
  router moved (`RankStats.num_moved_in` grew) counts as having taken moves;
- nothing moves while the role is short of KV as a whole (its ranks' free KV less than what
  they want together): moves would only pass the pressure from rank to rank, and the ranks
  preempt as they would without them (more ranks help then, not moves).

A move is that of a scale (`orchestrator.kv_moves`, docs/architecture.md, "Migrating a request
with its KV"): at a step boundary the request leaves its rank's batch, its KV goes by NIXL, and
it decodes on at the other rank — the same tokens, nothing computed again. A receiver that has
no pages for it after all refuses it at once, and it resumes from its output there instead.

`plan_relief` is a pure function; the watch runs on the router's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from orchestrator.periodic import Periodic

logger = logging.getLogger(__name__)

HORIZON = 2  # looks ahead a rank's floor covers
PRESSED_FREE = 0.05  # of a rank's KV capacity: the least its floor is
MOST_FLOOR = 0.5  # ... and the most
RELIEVED_FREE = 0.2  # ... what it wants free over its floor (a pressed one after its moves, a
# receiver after taking one)
MIN_GAIN_TOKENS = 16  # a request with fewer tokens to go ends where it is
COOLDOWN_LOOKS = 2 * HORIZON  # a rank that took moved requests hands none off for this long


class RankRoom(NamedTuple):
    """A generating rank's KV, as its stats give it."""

    capacity_tokens: int
    free_tokens: int  # free pages × page size (pages holding a cached prefix count: reclaimable)
    growth_tokens: int = 0  # how much more of its KV is in use than at the last look (>= 0)
    preempted: bool = False  # it preempted a request since the last look
    took_moves: bool = False  # it took moved requests in the last `COOLDOWN_LOOKS` looks
    # This router's part of what it must free when pressed: with other routers (front
    # routers), each frees its share of the shortfall (by the KV reserved there) with its own
    # requests, so that together they free it once, not once each.
    share: float = 1.0

    @property
    def floor_tokens(self) -> float:
        floor = max(PRESSED_FREE * self.capacity_tokens, HORIZON * self.growth_tokens)
        return min(floor, MOST_FLOOR * self.capacity_tokens)

    @property
    def wanted_tokens(self) -> float:
        return self.floor_tokens + RELIEVED_FREE * self.capacity_tokens

    @property
    def is_pressed(self) -> bool:
        if self.took_moves:
            return False
        free = self.free_tokens
        return free < self.floor_tokens or (self.preempted and free < self.wanted_tokens)


class Movable(NamedTuple):
    """A request that may move with its KV (`KVMoves.movable`)."""

    rid: str
    rank: int
    held_tokens: int  # its KV now: prompt and output so far
    remaining_tokens: int  # the tokens it may still make


class Move(NamedTuple):
    rid: str
    to: int


def plan_relief(rooms: Mapping[int, RankRoom], movable: Iterable[Movable]) -> dict[int, list[Move]]:
    """The moves that relieve the pressed ranks of `rooms` (module doc), by the rank they
    leave; `rooms` holds every rank of one role that takes moved requests."""
    pressed = {i for i, room in rooms.items() if room.is_pressed}
    if not pressed or len(pressed) == len(rooms):
        return {}
    if sum(r.free_tokens for r in rooms.values()) < sum(r.wanted_tokens for r in rooms.values()):
        return {}  # short of KV as a whole: moves would only pass the pressure around
    free = {i: float(room.free_tokens) for i, room in rooms.items()}
    # What each receiver keeps free once the requests it takes have run to their end.
    room_left = dict(free)
    on: dict[int, list[Movable]] = {}
    for m in movable:
        if m.rank in pressed and m.remaining_tokens >= MIN_GAIN_TOKENS:
            on.setdefault(m.rank, []).append(m)
    plan: dict[int, list[Move]] = {}
    for i in sorted(pressed, key=lambda i: (free[i] / max(1, rooms[i].capacity_tokens), i)):
        room = rooms[i]
        enough = free[i] + room.share * (room.wanted_tokens - free[i])
        for m in sorted(on.get(i, ()), key=lambda m: (-m.held_tokens, m.rid)):
            if free[i] >= enough:
                break
            need = m.held_tokens + m.remaining_tokens
            takers = [
                r for r in rooms
                if r not in pressed and room_left[r] - need >= rooms[r].wanted_tokens
            ]  # fmt: skip
            if not takers:
                continue  # a smaller request may still fit somewhere
            to = max(takers, key=lambda r: (room_left[r], -r))
            room_left[to] -= need
            free[i] += m.held_tokens
            plan.setdefault(i, []).append(Move(m.rid, to))
    return plan


class KVReliefWatch(Periodic):
    """Looks at the generating ranks' KV every `interval_s` and moves requests off pressed
    ranks (module doc); not while `busy()` (a scale runs: it moves requests itself) or moves
    are under way. A look that fails (a rank going down meanwhile) is logged; the next one
    comes as usual."""

    task_name = "kv-relief"
    failure = "KV pressure look failed"
    failure_traceback = True

    def __init__(self, router: Any, interval_s: float, busy: Callable[[], bool] = lambda: False):
        self.router = router
        self.interval_s = interval_s
        self.busy = busy
        self.num_looks = 0
        # Each rank's KV in use at the last look, unless requests moved since (their KV is not
        # growth), and its preemptions so far.
        self._used: dict[int, int] = {}
        self._preemptions: dict[int, int] = {}
        # The look at which each rank last took moves (any router's: `RankStats.num_moved_in`),
        # and the requests it took so far.
        self._took_at: dict[int, int] = {}
        self._moved_in: dict[int, int] = {}

    async def look(self) -> int:
        """One look: the requests asked to move."""
        router = self.router
        moves = router.moves
        ranks = moves.generating_ranks()
        if len(ranks) < 2 or router.draining or self.busy() or moves.under_way():
            self._used.clear()
            return 0
        stats = await router.ranks.stats_of(ranks)
        self.num_looks += 1
        rooms: dict[int, RankRoom] = {}
        table = router.ranks
        for i, st in zip(ranks, stats, strict=True):
            info = router.infos[i]
            if st is None or info is None:
                continue
            free = st.num_pages_free * info.page_size
            used = info.kv_capacity_tokens - free
            growth = max(0, used - self._used.get(i, used))
            preempted = st.num_preemptions > self._preemptions.get(i, st.num_preemptions)
            if st.num_moved_in > self._moved_in.get(i, st.num_moved_in):
                self._took_at[i] = self.num_looks  # another router moved requests there
            self._used[i], self._preemptions[i] = used, st.num_preemptions
            self._moved_in[i] = st.num_moved_in
            took = self.num_looks - self._took_at.get(i, -COOLDOWN_LOOKS) < COOLDOWN_LOOKS
            own, peers = table.reserved_tokens[i], table.peer_load[i].reserved_tokens
            share = own / (own + peers) if peers > 0 else 1.0
            rooms[i] = RankRoom(info.kv_capacity_tokens, free, growth, preempted, took, share)
        if self.busy() or moves.under_way():  # (it began while the stats came)
            self._used.clear()
            return 0
        plan = plan_relief(rooms, moves.movable_requests(rooms))
        for i, planned in plan.items():
            room = rooms[i]
            logger.info(
                "KV pressure on rank %d (%.0f%% of its KV free%s): %d request(s) move to "
                "rank(s) %s with their KV", i, 100 * room.free_tokens / room.capacity_tokens,
                ", it preempted requests" if room.preempted else "", len(planned),
                ",".join(str(r) for r in sorted({m.to for m in planned})),
            )  # fmt: skip
        num = moves.relieve(plan)
        if num:
            self._used.clear()
            for planned in plan.values():
                self._took_at.update((m.to, self.num_looks) for m in planned)
        return num
