"""A deployment's routers count each other's requests when they pick ranks
(`orchestrator.peer_load`): what a rank reports per router (`loads_by_router`), the other
routers' share of it, and the picks made with it. End to end, through a primary and a front
router: tests/test_front.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.peer_load import peer_share
from orchestrator.ranks import RankTable
from workers.engine.rank_reports import RankInfo, RouterLoad, loads_by_router

pytestmark = pytest.mark.timeout(60)


def _held(rid: str, prompt: int, max_new: int, output: int) -> SimpleNamespace:
    return SimpleNamespace(
        rid=rid, num_prompt_tokens=prompt, token_ids=[1] * (prompt + output),
        sampling=SimpleNamespace(max_new_tokens=max_new),
    )  # fmt: skip


def test_a_rank_reports_what_each_routers_requests_hold():
    held = [
        _held("a#0", 10, 100, 0),  # the primary's, its prompt not started
        _held("b#3", 20, 50, 5),  # the primary's
        _held("c#1@f00dcafe", 7, 30, 0),  # a front router's
        _held("d#2@f00dcafe", 9, 40, 2),
        _held("tool-made", 4, 8, 1),  # not made by a router: counted as the primary's
    ]
    assert loads_by_router(held) == {
        "": RouterLoad(10 + 100 + 20 + 50 + 4 + 8, 10, 3),
        "f00dcafe": RouterLoad(7 + 30 + 9 + 40, 7, 2),
    }
    assert loads_by_router([]) == {}
    # KV transfers in flight count by the router their id names.
    assert loads_by_router(held[:1], ["x#4@f00dcafe", "y#5", "z#6@f00dcafe"]) == {
        "": RouterLoad(110, 10, 1, 1), "f00dcafe": RouterLoad(0, 0, 0, 2),
    }  # fmt: skip


def test_a_router_takes_the_other_routers_share():
    by_router = {
        "": RouterLoad(100, 10, 2, 1), "aa": RouterLoad(40, 4, 1), "bb": RouterLoad(7, 0, 1, 2),
    }  # fmt: skip
    assert peer_share(by_router, "", "colocated") == RouterLoad(47, 4, 2, 2)
    # As the router counts its own: a decode rank's prompts wait for a prefill rank (they
    # count as its reservations only), and a prefill rank holds no reservation.
    assert peer_share(by_router, "aa", "decode") == RouterLoad(107, 0, 3, 3)
    assert peer_share(by_router, "aa", "prefill") == RouterLoad(0, 10, 3, 3)
    assert peer_share({"aa": RouterLoad(5, 5, 1)}, "aa", "decode") == RouterLoad()


def test_picks_count_the_other_routers_load():
    table = RankTable([object(), object(), object()])
    for i, role in enumerate(("prefill", "decode", "decode")):
        table.infos[i] = RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role=role)
    assert table.pick() == (1, 0)  # a tie: the first decode rank
    table.peer_load[1] = RouterLoad(300, 0, 1)
    assert table.pick() == (2, 0)  # the other routers' request holds the first
    loads = table.loads()
    assert loads[1].num_reserved_tokens == 300 and loads[1].num_running == 1
    table.reserved_tokens[2] = 400  # this router's own, more than the others' there
    assert table.pick() == (1, 0)
    table.peer_load[0] = RouterLoad(0, 50, 1)
    assert table.loads()[0].num_queued_prefill_tokens == 50
    table.remove([1])
    assert table.peer_load[1] == RouterLoad()
    assert table.pick() == (2, 0)
