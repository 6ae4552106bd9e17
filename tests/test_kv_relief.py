"""`plan_relief`: which requests leave a rank whose KV runs out, and where they go."""

from __future__ import annotations

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


def test_the_requests_with_most_to_make_leave_until_what_it_wants_is_free():
    reqs = [
        Movable("short", 0, 120, 20),
        Movable("long", 0, 120, 700),
        Movable("mid", 0, 120, 300),
        Movable("other", 1, 120, 900),  # on a rank that is not pressed
    ]
    # 30 free: 220 more wanted, two requests of 120 tokens each.
    assert plan_relief({0: _room(30), 1: _room(800)}, reqs) == {
        0: [Move("long", 1), Move("mid", 1)]
    }
    # Growing 100 tokens a look, it wants 400 free: the third one goes too.
    assert plan_relief({0: _room(30, growth=100), 1: _room(800)}, reqs) == {
        0: [Move("long", 1), Move("mid", 1), Move("short", 1)]
    }


def test_a_request_about_to_end_stays():
    reqs = [Movable("ending", 0, 400, MIN_GAIN_TOKENS - 1)]
    assert plan_relief({0: _room(0), 1: _room(900)}, reqs) == {}
    reqs = [Movable("going", 0, 400, MIN_GAIN_TOKENS)]
    assert plan_relief({0: _room(0), 1: _room(900)}, reqs) == {0: [Move("going", 1)]}


def test_each_goes_to_the_rank_with_most_free_kv_that_keeps_what_it_wants_free():
    reqs = [Movable(f"r{k}", 0, 150, 500 - k) for k in range(4)]
    rooms = {0: _room(0), 1: _room(500), 2: _room(400), 3: _room(300)}
    # Rank 1 takes the first (500 -> 350), rank 2 the second (400 -> 250): 300 free on rank 0.
    assert plan_relief(rooms, reqs) == {0: [Move("r0", 1), Move("r1", 2)]}
    # Rank 3 could take one only by going under what it wants itself: the rest stay.
    assert plan_relief({0: _room(0), 3: _room(340)}, reqs) == {}
    # A receiver growing fast wants more free: rank 1 (two looks of 150) takes none.
    rooms = {0: _room(0), 1: _room(500, growth=150), 2: _room(400)}
    assert plan_relief(rooms, reqs) == {0: [Move("r0", 2)]}


def test_receivers_by_their_own_capacity_and_a_smaller_request_may_still_fit():
    reqs = [Movable("big", 0, 600, 900), Movable("small", 0, 100, 100)]
    # The big one fits nowhere; the small one does (rank 1 keeps 25% of its 2000).
    rooms = {0: _room(10), 1: _room(650, cap=2000)}
    assert plan_relief(rooms, reqs) == {0: [Move("small", 1)]}


def test_the_most_pressed_rank_is_relieved_first():
    reqs = [Movable("a", 0, 300, 500), Movable("b", 1, 300, 500)]
    rooms = {0: _room(40), 1: _room(0), 2: _room(550)}
    # Room for one move only: rank 1 (nothing free) gets it.
    assert plan_relief(rooms, reqs) == {1: [Move("b", 2)]}


def test_a_rank_that_preempted_is_relieved_up_to_what_it_wants():
    reqs = [Movable("a", 0, 100, 500), Movable("b", 0, 100, 400)]
    # 150 free (over its floor), but it preempted: one move makes the 250 it wants.
    assert plan_relief({0: _room(150, preempted=True), 1: _room(900)}, reqs) == {0: [Move("a", 1)]}
