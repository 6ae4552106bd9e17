"""The collective group of one pool instance: its ranks step together at MoE layers.

`PoolGroup` is per-process state, set once by `init_pool_group` and read through `pool_group()`,
which fails loudly before it is set. Two process groups over the same ranks:

- `data`: the experts' all-to-all (NCCL on CUDA, gloo on CPU);
- `control`: small CPU tensors every step (gloo): whether any rank has work.

Rendezvous: rank 0 of the instance listens on a free port of its node; the others learn the
address through `Rendezvous`, a small Ray actor per pool instance, so no port is fixed.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist


class Agreement(NamedTuple):
    any_has_work: bool
    any_stopping: bool
    all_swap_ready: bool = False  # every rank has an expert rebalance armed to execute
    any_pending: bool = False  # a rank holds requests not runnable yet (their KV in transit)


@dataclass(frozen=True)
class PoolMember:
    """What a rank needs to join its pool instance's group (picklable)."""

    rank: int
    world_size: int
    rendezvous: Any  # a `Rendezvous` actor handle


@dataclass(frozen=True)
class PoolGroup:
    rank: int
    world_size: int
    data: dist.ProcessGroup
    control: dist.ProcessGroup

    def any_has_work(self, has_work: bool) -> bool:
        """Whether any rank of the instance has work this step (a collective: every rank calls
        it once per loop iteration)."""
        return self.agree(has_work, False).any_has_work

    def agree(
        self, has_work: bool, stopping: bool, swap_ready: bool = False, pending: bool = False
    ) -> Agreement:
        """What the ranks decide together each loop iteration (a collective over `control`):
        step if any rank has work, stop if any rank is stopping, execute an expert rebalance
        if every rank has one armed; `pending` (requests waiting for their KV) tells the others
        that work is coming."""
        flags = [int(has_work), int(stopping), int(swap_ready), int(pending)]
        summed = torch.tensor(flags, dtype=torch.int32)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.control)
        return Agreement(
            bool(summed[0]), bool(summed[1]), int(summed[2]) == self.world_size, bool(summed[3])
        )


_group: PoolGroup | None = None


def pool_group() -> PoolGroup:
    if _group is None:
        raise RuntimeError("the pool group is not initialized (init_pool_group first)")
    return _group


def has_pool_group() -> bool:
    return _group is not None


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_pool_group(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device,
    timeout_s: float = 120.0,
    store_timeout_s: float | None = None,
) -> PoolGroup:
    """Join this process to its pool instance's group (once per process). `timeout_s`: of
    the collectives; `store_timeout_s` (default the same): of meeting at rank 0's store."""
    global _group
    if _group is not None:
        raise RuntimeError("the pool group is already initialized in this process")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    store = dist.TCPStore(
        master_addr,
        master_port,
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=store_timeout_s or timeout_s),
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    data = dist.group.WORLD
    assert data is not None
    control = dist.new_group(backend="gloo") if backend != "gloo" else data
    _group = PoolGroup(rank, world_size, data, control)
    return _group


class Rendezvous:
    """Ray actor (async): the ranks of one pool instance meet here to learn rank 0's address.
    `join(rank, address)` returns rank 0's `(host, port)` once every rank has joined this round.

    Rounds: a round ends when all `world_size` ranks have joined; the next join opens a new
    one. When a rank dies, the pool's other ranks leave too (their collectives fail), Ray
    restarts them all, and they meet again in the next round with rank 0's new address. A
    rank that joins again in an open round (it died and was restarted while the round waited)
    replaces its earlier join. One that dies after its round ended leaves its peers unable to
    reach it: they give up after `EngineConfig.pool_formation_timeout_s` and are
    restarted too, and the next round forms the pool. The actor itself is restarted by Ray
    when it dies; the ranks waiting in it then fail their join and are restarted alike."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.num_rounds = 0
        self._new_round()

    def _new_round(self) -> None:
        self._joined: set[int] = set()
        self._master: tuple[str, int] | None = None
        self._all_joined = asyncio.Event()
        self._result: list[tuple[str, int]] = []

    def open_round(self) -> tuple[list[int], tuple[str, int] | None]:
        """The ranks that joined the round still open, and rank 0's address in it (for
        diagnostics; an ended round counts as none joined)."""
        if self._all_joined.is_set():
            return [], None
        return sorted(self._joined), self._master

    async def join(self, rank: int, address: tuple[str, int] | None) -> tuple[str, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a group of {self.world_size}")
        if self._all_joined.is_set():
            self._new_round()
        if rank == 0:
            if address is None:
                raise ValueError("rank 0 must give its address")
            self._master = address
        self._joined.add(rank)
        event, result = self._all_joined, self._result
        if len(self._joined) == self.world_size:
            assert self._master is not None, "rank 0 has not joined"
            result.append(self._master)
            self.num_rounds += 1
            event.set()
        await event.wait()
        return result[0]
