"""`orchestrator.scaling.plan` and the check before instances leave, on pool sets built by hand:
an instance with a rank dead for good serves nothing, so it neither counts for its role nor
keeps a live one from being the last of it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator import scaling
from orchestrator.placement import PoolSpec
from orchestrator.pool_instance import PoolInstance

pytestmark = pytest.mark.timeout(30)

BUNDLE = {"CPU": 1.0}


def _instance(number: int, index: int) -> PoolInstance:
    return PoolInstance(PoolSpec("decode", number, 1, BUNDLE), None, indices=[index],
                        state="serving")  # fmt: skip


def _pools(*instances: PoolInstance) -> Any:
    return SimpleNamespace(shapes={"decode": (1, BUNDLE)}, bounds={}, instances=list(instances),
                           next_number={"decode": len(instances)})  # fmt: skip


def test_a_scale_down_takes_the_dead_instance_before_the_newest():
    d0, d1 = _instance(0, 0), _instance(1, 1)
    pools = _pools(d0, d1)
    assert scaling.plan(pools, {"decode": 1}, []) == ([], [d1])  # all alive: the newest
    # decode-0's rank is dead for good (no replacement, or one waiting behind this scale).
    assert scaling.plan(pools, {"decode": 1}, [], gone={0}) == ([], [d0])


def test_no_role_is_left_without_a_live_instance():
    d0, d1 = _instance(0, 0), _instance(1, 1)
    pools = _pools(d0, d1)
    # decode-1 named to go, its replacement (decode-2) did not start, decode-0 is dead: it
    # stays; the dead one may always go.
    report = scaling.ScaleReport()
    assert scaling._keep_one_per_role(pools, [d1], report, gone={0}) == []
    assert report.failed == [{"pool": "decode-1", "error": "kept: its replacement did not start"}]
    assert scaling._keep_one_per_role(pools, [d0, d1], scaling.ScaleReport(), gone={0}) == [d0]
    assert scaling._keep_one_per_role(pools, [d1], scaling.ScaleReport(), gone=set()) == [d1]
