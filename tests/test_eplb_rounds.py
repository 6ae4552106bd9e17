"""A rebalance that would stage more expert weights on a rank than `--eplb-max-staging-gib`
goes in rounds of whole layers, each through load / prepare / execute; a failure keeps the
rounds done. (An audit found every moved expert staged at once: for V3, tens of GiB.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from eplb.service import EPLBService, PoolHandle, staging_rounds
from workers.ep.rebalance import PhaseReport

pytestmark = pytest.mark.timeout(60)


def test_rounds_keep_each_rank_within_its_budget_and_never_split_a_layer():
    old = torch.tensor([[0, 1, 2, 3]] * 5)  # 5 layers, 2 ranks x 2 slots
    new = old.clone()
    new[0] = torch.tensor([1, 0, 2, 3])  # rank 0: 2 moves
    new[1] = torch.tensor([0, 1, 3, 2])  # rank 1: 2 moves
    new[3] = torch.tensor([0, 2, 1, 3])  # ranks 0 and 1: 1 move each
    new[4] = torch.tensor([1, 0, 3, 2])  # both: 2 moves each
    assert staging_rounds(old, new, 2, None) == [[0, 1, 3, 4]]
    assert staging_rounds(old, new, 2, 2) == [[0, 1], [3], [4]]
    assert staging_rounds(old, new, 2, 3) == [[0, 1, 3], [4]]
    assert staging_rounds(old, new, 2, 4) == [[0, 1, 3], [4]]
    assert staging_rounds(old, new, 2, 1) == [[0], [1], [3], [4]]  # a layer over it: alone
    assert staging_rounds(old, old, 2, 1) == []
    for budget in (1, 2, 3, 4, None):  # every changed layer exactly once, in order
        rounds = staging_rounds(old, new, 2, budget)
        assert [layer for r in rounds for layer in r] == [0, 1, 3, 4]


class _Call:
    def __init__(self, fn: Any):
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        async def run() -> Any:
            return self.fn(*args)

        return run()


class _Rank:
    """Records the placements it is asked to load and executes them (a fake: the phases on
    real ranks are tested in test_eplb_service.py and test_ep_rebalance)."""

    def __init__(self, index: int, placement: torch.Tensor, fail_round: int | None = None):
        self.placement = placement
        self.loaded: list[torch.Tensor] = []
        self.executed = 0
        self.aborts = 0
        self.fail_round = fail_round
        self.expert_load = _Call(lambda: torch.ones(placement.shape[0], 4, dtype=torch.int64))
        self.expert_placement = _Call(lambda: self.placement.clone())
        self.eplb_slot_bytes = _Call(lambda: 100)
        self.eplb_load = _Call(self._load)
        self.eplb_prepare = _Call(lambda: PhaseReport(index, "prepare", 0, 0, 0.01))
        self.eplb_execute = _Call(self._execute)
        self.eplb_abort = _Call(self._abort)
        self.index = index

    def _load(self, phy2log: torch.Tensor) -> PhaseReport:
        if self.fail_round is not None and len(self.loaded) == self.fail_round:
            raise RuntimeError("injected failure in the load phase")
        self.loaded.append(phy2log.clone())
        return PhaseReport(self.index, "load", 1, 100, 0.01)

    def _execute(self, timeout_s: float) -> PhaseReport:
        self.placement = self.loaded[-1]
        self.executed += 1
        return PhaseReport(self.index, "execute", 1, 100, 0.002 * self.executed)

    def _abort(self) -> None:
        self.aborts += 1


def _pool(fail_round: int | None = None) -> tuple[list[_Rank], torch.Tensor]:
    old = torch.tensor([[0, 1, 2, 3]] * 4)
    ranks = [_Rank(0, old, fail_round), _Rank(1, old)]
    new = torch.tensor([[1, 0, 3, 2], [0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 3, 2]])
    return ranks, new


def _rebalance(service: EPLBService, new: torch.Tensor) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        (report,) = await service.rebalance(placements={"decode-0": new.tolist()})
        return report

    return asyncio.run(run())


def test_a_rebalance_over_the_staging_budget_goes_in_rounds_of_layers():
    ranks, new = _pool()
    # 100 bytes an expert, 200 a round: two experts per rank per round.
    service = EPLBService([PoolHandle("decode-0", ranks)], max_staging_bytes=200)
    report = _rebalance(service, new)
    assert report["ok"] and report["num_rounds"] == 2, report
    assert report["num_experts_moved"] == 8
    assert report["execute_s"] == pytest.approx(0.004)  # the longest pause, not the sum
    old = torch.tensor([[0, 1, 2, 3]] * 4)
    first = old.clone()
    first[0] = new[0]  # layer 0 moves 2 on each rank; layer 2 would add 2 more on rank 0
    assert [p.tolist() for p in ranks[0].loaded] == [first.tolist(), new.tolist()]
    assert service.pools["decode-0"].phy2log.tolist() == new.tolist()

    ranks, new = _pool()
    service = EPLBService([PoolHandle("decode-0", ranks)])  # no budget: one round
    assert _rebalance(service, new)["num_rounds"] == 1 and len(ranks[0].loaded) == 1


def test_a_failed_round_keeps_the_rounds_before_it():
    ranks, new = _pool(fail_round=1)
    service = EPLBService([PoolHandle("decode-0", ranks)], max_staging_bytes=200)
    report = _rebalance(service, new)
    assert not report["ok"] and report["num_rounds"] == 1, report
    assert "injected failure" in report["error"] and "after 1 of 2 rounds" in report["error"]
    assert ranks[0].aborts == 1 and ranks[1].aborts == 1
    kept = service.pools["decode-0"].phy2log
    assert kept.tolist() == ranks[1].placement.tolist()  # what the pool now serves with
    assert kept[0].tolist() == new[0].tolist() and kept[2].tolist() == [0, 1, 2, 3]
    # What moved is counted: layer 0's four slots, not the plan's eight.
    state = service.pools["decode-0"]
    assert report["num_experts_moved"] == 4 and state.num_experts_moved == 4
    assert state.num_rebalances == 1 and report["balancedness_after"] > 0
