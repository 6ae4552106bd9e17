"""The per-step agreement of an expert-parallel pool's ranks (`PoolGroup.agree`), over a real
gloo group of three processes, and how often an idle rank joins it (`group_poll_s`)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.engine.rank_setup import (
    GROUP_ASLEEP_AFTER_S,
    GROUP_IDLE_AFTER_S,
    GROUP_POLL_ASLEEP_S,
    GROUP_POLL_BUSY_S,
    GROUP_POLL_IDLE_S,
    group_poll_s,
)
from workers.ep.group import PoolGroup

# Per case, each rank's (has_work, stopping, swap_ready, pending).
CASES = [
    lambda r: (False, False, False, False),
    lambda r: (r == 1, False, True, r == 2),  # one rank has work, another has some coming
    lambda r: (False, r == 0, r != 1, False),  # one stops; not every rank has a swap armed
    lambda r: (False, False, False, r == 0),  # only work in transit
]
EXPECTED = [
    [False, False, False, False],
    [True, False, True, True],
    [False, True, False, False],
    [False, False, False, True],
]


def _agree(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        group = PoolGroup(rank, world_size, dist.group.WORLD, dist.group.WORLD)
        agreed = [list(group.agree(*case(rank))) for case in CASES]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(agreed))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_every_rank_reaches_the_same_agreement(tmp_path: Path) -> None:
    mp.spawn(_agree, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == EXPECTED, rank


@pytest.mark.timeout(10)
def test_an_idle_rank_joins_less_often_the_longer_its_pool_is_idle() -> None:
    busy, idle, asleep = GROUP_POLL_BUSY_S, GROUP_POLL_IDLE_S, GROUP_POLL_ASLEEP_S
    assert busy < idle < asleep
    assert group_poll_s(0.0) == group_poll_s(0.99) == busy
    assert group_poll_s(GROUP_IDLE_AFTER_S) == idle
    assert group_poll_s(GROUP_ASLEEP_AFTER_S - 0.01) == idle
    assert group_poll_s(GROUP_ASLEEP_AFTER_S) == group_poll_s(3600) == asleep
