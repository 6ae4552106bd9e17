"""The per-step agreement of an expert-parallel pool's ranks (`PoolGroup.agree`), over a real
gloo group of three processes, and how often an idle rank joins it (`group_poll_s`)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

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


@pytest.mark.timeout(120)
def test_a_rank_that_cannot_meet_its_pool_says_so_within_the_formation_timeout(ray_session):
    """A round that never completes (the other rank died before joining), and a round whose
    rank 0 died after joining (its store is not there): the rank gives up with
    `PoolFormationError` after `pool_formation_timeout_s` instead of waiting forever; the
    worker then exits to be restarted. A rank joining again in an open round replaces its
    earlier join."""
    import socket
    import time

    import ray
    import torch

    from workers.engine.config import EngineConfig
    from workers.engine.rank_setup import PoolFormationError, join_pool
    from workers.ep.group import PoolMember, Rendezvous

    config = EngineConfig(device="cpu", pool_formation_timeout_s=2.0)
    cpu = torch.device("cpu")
    alone = ray.remote(Rendezvous).options(num_cpus=0).remote(2)
    started = time.monotonic()
    with pytest.raises(PoolFormationError, match="rank 1 of 2 could not form"):
        join_pool("unused", config, "colocated", PoolMember(1, 2, alone), cpu)
    assert time.monotonic() - started < 120  # (2 s, and Ray calls on a loaded host)
    with socket.socket() as s:  # a port nobody listens on: rank 0's store, gone with it
        s.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", s.getsockname()[1])
    # `alone` still has rank 1's join open: rank 0 (dead) completes that round; a new round
    # starts with the next join, which a dead rank 0 joined first and then once more.
    assert ray.get(alone.join.remote(0, dead)) == dead
    gone = ("127.0.0.1", 1)
    # An async actor may run one caller's calls in any order: each join is seen in the open
    # round before the next is made (else rank 1 could end the round before the restart
    # joined it, and the restart would wait in a new round for good: CI hung so).
    orphan = alone.join.remote(0, gone)  # a rank 0 that died while it waited
    _wait_open_round(alone, ([0], gone))
    replaced = alone.join.remote(0, dead)  # its restart joins the same, still open round
    _wait_open_round(alone, ([0], dead))
    started = time.monotonic()
    with pytest.raises(PoolFormationError, match="could not form"):
        join_pool("unused", config, "colocated", PoolMember(1, 2, alone), cpu)
    assert time.monotonic() - started < 120
    # One round, one address: the later join's.
    assert ray.get([orphan, replaced], timeout=60) == [dead, dead]
    assert ray.get(alone.open_round.remote()) == ([], None)
    ray.kill(alone)


def _wait_open_round(rendezvous: Any, want: tuple[list[int], tuple[str, int] | None]) -> None:
    import time

    import ray

    deadline = time.monotonic() + 60
    while (seen := ray.get(rendezvous.open_round.remote(), timeout=60)) != want:
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)
