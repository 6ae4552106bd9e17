"""`plan_relief`: which requests leave a rank whose KV runs out, and where they go."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.kv_relief import MIN_GAIN_TOKENS, Movable, Move, RankRoom, plan_relief

pytestmark = pytest.mark.timeout(30)

CAP = 1000


def _room(free: int, preempted: bool = False, cap: int = CAP, growth: int = 0) -> RankRoom:
    return RankRoom(cap, free, growth, preempted)


def test_a_rank_is_pressed_under_its_floor_or_after_preempting_under_what_it_wants():
    # Slow growth: the floor is 5% of capacity, it wants 20% more free.
    assert _room(49).is_pressed and not _room(50).is_pressed
    assert _room(249, preempted=True).is_pressed and not _room(250, preempted=True).is_pressed
    assert not _room(249).is_pressed
    # 100 tokens a look: the floor is two looks' worth.
    assert _room(199, growth=100).is_pressed and not _room(200, growth=100).is_pressed
    assert _room(399, growth=100, preempted=True).is_pressed
    assert not _room(400, growth=100, preempted=True).is_pressed
    # Growth faster than the capacity allows for: the floor is half of it at most.
    fast = _room(510, growth=1000)
    assert fast.floor_tokens == 500 and fast.wanted_tokens == 700 and not fast.is_pressed


def test_nothing_moves_without_a_pressed_rank_or_when_every_rank_is_pressed():
    reqs = [Movable("a", 0, 300, 500)]
    assert plan_relief({0: _room(60), 1: _room(900)}, reqs) == {}
    assert plan_relief({0: _room(10), 1: _room(20)}, reqs) == {}


def test_nothing_moves_while_the_role_is_short_of_kv_as_a_whole():
    reqs = [Movable("a", 0, 100, 100)]
    # Rank 1 is not pressed, but the two want 250 + 400 free and have 400.
    assert plan_relief({0: _room(0), 1: _room(400, growth=100)}, reqs) == {}
    assert plan_relief({0: _room(0), 1: _room(700, growth=100)}, reqs) == {0: [Move("a", 1)]}


def test_the_requests_holding_most_kv_leave_first_until_what_it_wants_is_free():
    reqs = [
        Movable("small", 0, 60, 700),  # the newest: a rank preempts it first
        Movable("big", 0, 200, 300),
        Movable("mid", 0, 120, 400),
        Movable("ending", 0, 300, MIN_GAIN_TOKENS - 1),  # about to free its pages anyway
        Movable("other", 1, 120, 900),  # on a rank that is not pressed
    ]
    big = _room(4000, cap=4000)
    # 30 free: 220 more wanted; the big one frees 200, the mid one 120.
    assert plan_relief({0: _room(30), 1: big}, reqs) == {0: [Move("big", 1), Move("mid", 1)]}
    # Growing 100 tokens a look, it wants 400 free: the small one goes too.
    assert plan_relief({0: _room(30, growth=100), 1: big}, reqs) == {
        0: [Move("big", 1), Move("mid", 1), Move("small", 1)]
    }


def test_a_rank_that_just_took_moved_requests_hands_none_off():
    reqs = [Movable("a", 0, 100, 100)]
    assert plan_relief({0: _room(0), 1: _room(900)}, reqs) == {0: [Move("a", 1)]}
    took = RankRoom(CAP, 0, 0, preempted=True, took_moves=True)
    assert not took.is_pressed
    assert plan_relief({0: took, 1: _room(900)}, reqs) == {}


def test_a_request_about_to_end_stays():
    reqs = [Movable("ending", 0, 400, MIN_GAIN_TOKENS - 1)]
    assert plan_relief({0: _room(0), 1: _room(900)}, reqs) == {}
    reqs = [Movable("going", 0, 400, MIN_GAIN_TOKENS)]
    assert plan_relief({0: _room(0), 1: _room(900)}, reqs) == {0: [Move("going", 1)]}


def test_each_goes_where_most_is_left_once_it_ran_to_its_end_if_that_is_what_the_rank_wants():
    reqs = [Movable(f"r{k}", 0, 150, 100 - k) for k in range(4)]  # about 250 tokens each
    rooms = {0: _room(0), 1: _room(700), 2: _room(600), 3: _room(500)}
    # Rank 1 takes the first (450 left), rank 2 the second (about 350): 300 free on rank 0.
    assert plan_relief(rooms, reqs) == {0: [Move("r0", 1), Move("r1", 2)]}
    # Rank 3 would keep under what it wants (250) once a request ran to its end: they stay.
    long_reqs = [Movable("long", 0, 150, 250)]
    assert plan_relief({0: _room(0), 3: _room(600)}, long_reqs) == {}
    # A receiver growing fast wants more free: rank 1 (two looks of 150) takes none.
    rooms = {0: _room(0), 1: _room(700, growth=150), 2: _room(600)}
    assert plan_relief(rooms, reqs) == {0: [Move("r0", 2)]}


def test_receivers_by_their_own_capacity_and_a_smaller_request_may_still_fit():
    reqs = [Movable("big", 0, 600, 900), Movable("small", 0, 100, 100)]
    # The big one fits nowhere; the small one does (rank 1 keeps 25% of its 2000).
    rooms = {0: _room(10), 1: _room(800, cap=2000)}
    assert plan_relief(rooms, reqs) == {0: [Move("small", 1)]}


def test_the_most_pressed_rank_is_relieved_first():
    reqs = [Movable("a", 0, 300, 500), Movable("b", 1, 300, 500)]
    rooms = {0: _room(40), 1: _room(0), 2: _room(1100)}
    # Room for one move only: rank 1 (nothing free) gets it.
    assert plan_relief(rooms, reqs) == {1: [Move("b", 2)]}


def test_a_rank_that_preempted_is_relieved_up_to_what_it_wants():
    reqs = [Movable("a", 0, 100, 500), Movable("b", 0, 100, 400)]
    # 150 free (over its floor), but it preempted: one move makes the 250 it wants.
    assert plan_relief({0: _room(150, preempted=True), 1: _room(900)}, reqs) == {0: [Move("a", 1)]}


class _Handle:
    """An engine rank's actor handle as the router calls it without a stream: `migrate`."""

    def __init__(self, calls: list[Any]):
        self.migrate = self
        self.calls = calls

    def remote(self, moves: Any) -> Any:
        self.calls.append(moves)
        return asyncio.sleep(0)


def _table(calls: list[Any], num: int = 3) -> Any:
    from orchestrator.ranks import RankTable
    from workers.engine.rank_reports import RankInfo

    table = RankTable([_Handle(calls) for _ in range(num)])
    for i in range(num):
        table.infos[i] = RankInfo("m", "deepseek_v3", 1000, 4096, (0,), CAP, 16, CAP // 16,
                                  role="decode", instance=i, migrates=True)  # fmt: skip
    return table


def test_relieve_asks_the_planned_moves_and_the_next_attempt_takes_the_planned_rank():
    from orchestrator.kv_moves import KVMoves
    from orchestrator.routed import RoutedRequest

    async def run() -> None:
        calls: list[Any] = []
        table = _table(calls)
        reqs = {
            "a#1": RoutedRequest("a#1", 0, 600, 40, num_output_tokens=100, client_rid="a",
                                 num_input_tokens=40),
            "b#1": RoutedRequest("b#1", 0, 600, 40, num_output_tokens=100, client_rid="b",
                                 num_input_tokens=40),
            "ended#1": RoutedRequest("ended#1", 0, 600, 40, client_rid="ended", aborted=True),
            # It came to rank 0 by a move: it does not move again to relieve it.
            "moved#3": RoutedRequest("moved#3", 0, 600, 40, num_output_tokens=100,
                                     client_rid="moved", moved_from=1, num_input_tokens=40),
        }  # fmt: skip
        for req in reqs.values():
            table.admit(req)
        moves = KVMoves(table, reqs, lambda client: f"{client}#2")
        movable = moves.movable_requests([0])
        assert sorted(m.rid for m in movable) == ["a#1", "b#1"]  # not the aborted, moved ones
        assert movable[0].held_tokens == 140 and movable[0].remaining_tokens == 460
        plan = {0: [Move("a#1", 2), Move("gone#1", 1)], 1: [Move("b#1", 1)]}
        # Only requests still on the rank the plan moves them off are asked.
        assert moves.relieve(plan) == 1 and moves.num_relieved == 1
        await asyncio.sleep(0)
        assert calls == [[("a#1", "a#2")]]
        assert reqs["a#1"].migrating and reqs["a#1"].move_to == 2
        assert not reqs["b#1"].migrating
        # The next attempt goes where the move was planned, unless that rank cannot take it:
        # then the usual pick (the most free KV outside `avoid`).
        assert moves.receiver(0, frozenset({0}), planned=2) == 2
        table.reserved_tokens[2] = 500
        assert moves.receiver(0, frozenset({0, 2}), planned=2) == 1
        table.closed.add(2)  # scaled down meanwhile
        assert moves.receiver(0, frozenset({0}), planned=2) == 1
        assert moves.receiver(0, frozenset({0}), planned=None) == 1

    asyncio.run(run())


def test_with_other_routers_each_frees_its_share_so_that_together_they_free_it_once():
    # Rank 0: 30 free, 250 wanted. Two routers hold half its KV each, the same requests' sizes.
    def of(router: str) -> list[Movable]:
        return [Movable(f"{router}{k}", 0, held, 400) for k, held in enumerate((120, 100, 80))]

    big = _room(4000, cap=4000)
    alone = plan_relief({0: _room(30), 1: big}, of("a"))
    assert alone == {0: [Move("a0", 1), Move("a1", 1)]}  # 250 free: what it wants
    # With the other router's half: each frees half of the 220 missing, 120 is one move each;
    # together they free 240 (without the share they would free 440).
    half = RankRoom(CAP, 30, share=0.5)
    assert plan_relief({0: half, 1: big}, of("a")) == {0: [Move("a0", 1)]}
    assert plan_relief({0: half, 1: big}, of("b")) == {0: [Move("b0", 1)]}
    # A router with a tenth of the rank's KV still moves one of its requests.
    assert plan_relief({0: RankRoom(CAP, 30, share=0.1), 1: big}, of("a")) == {0: [Move("a0", 1)]}


class _StatsHandle(_Handle):
    """... and its `stats`."""

    def __init__(self, calls: list[Any], stats: Any):
        super().__init__(calls)
        self.stats = self
        self.now = stats

    def remote(self, *moves: Any) -> Any:  # (`stats.remote()` or `migrate.remote(moves)`)
        if not moves:

            async def stats() -> Any:
                return self.now

            return stats()
        return super().remote(*moves)


def test_the_watch_sees_other_routers_moves_and_frees_its_share():
    """A rank that took another router's moves (its `num_moved_in` grew) hands none off for
    `COOLDOWN_LOOKS` looks; a pressed rank whose KV another router's requests share is asked
    to free this router's part only."""
    from dataclasses import replace
    from types import SimpleNamespace

    from orchestrator.kv_moves import KVMoves
    from orchestrator.kv_relief import COOLDOWN_LOOKS, KVReliefWatch
    from orchestrator.ranks import RankTable
    from orchestrator.routed import RoutedRequest
    from workers.engine.rank_reports import RankInfo, RankStats, RouterLoad

    pages = CAP // 16

    def stats(free_pages: int, moved_in: int = 0) -> RankStats:
        return RankStats(0, 0, pages, free_pages, 0, 0, num_moved_in=moved_in)

    async def run() -> None:
        calls: list[Any] = []
        handles = [_StatsHandle(calls, stats(pages)) for _ in range(2)]
        table = RankTable(handles)
        for i in range(2):
            table.infos[i] = RankInfo("m", "deepseek_v3", 1000, 4096, (0,), CAP, 16, pages,
                                      role="decode", instance=i, migrates=True)  # fmt: skip
        reqs = {
            f"r{k}#1": RoutedRequest(f"r{k}#1", 0, 300, 40, num_output_tokens=160 - 20 * k,
                                     client_rid=f"r{k}", num_input_tokens=40)
            for k in range(3)
        }  # fmt: skip
        for req in reqs.values():
            table.admit(req)
        router = SimpleNamespace(
            ranks=table, infos=table.infos, draining=False,
            moves=KVMoves(table, reqs, lambda client: f"{client}#2"),
        )  # fmt: skip
        watch = KVReliefWatch(router, 1.0)
        assert await watch.look() == 0  # the first look: nothing pressed
        # Rank 0 has 2 pages free (32 tokens: under its 50-token floor), rank 1 plenty; but
        # rank 0 just took a request another router moved there.
        handles[0].now = stats(2, moved_in=1)
        for _ in range(COOLDOWN_LOOKS):
            assert await watch.look() == 0
        assert calls == []
        # Then it is pressed; another router reserved as much there as this one (900 tokens):
        # this router frees half of the 218 tokens missing, one request (200 held) of three.
        table.peer_load[0] = RouterLoad(reserved_tokens=900, requests=3)
        assert await watch.look() == 1
        await asyncio.sleep(0)
        assert calls == [[("r0#1", "r0#2")]] and reqs["r0#1"].move_to == 1
        # Alone there, it would have freed all of it: two moves.
        table.peer_load[0] = RouterLoad()
        reqs["r0#1"].migrating = False
        watch2 = KVReliefWatch(router, 1.0)
        handles[0].now = replace(handles[0].now, num_moved_in=0)
        calls.clear()
        assert await watch2.look() == 2
        await asyncio.sleep(0)
        assert calls == [[("r0#1", "r0#2"), ("r1#1", "r1#2")]]

    asyncio.run(run())
