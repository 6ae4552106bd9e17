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

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PoolGroup:
    rank: int
    world_size: int
    data: dist.ProcessGroup
    control: dist.ProcessGroup

    def any_has_work(self, has_work: bool) -> bool:
        """Whether any rank of the instance has work this step (a collective: every rank calls
        it once per loop iteration)."""
        flag = torch.tensor([int(has_work)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())


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
) -> PoolGroup:
    """Join this process to its pool instance's group (once per process)."""
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
        timeout=timedelta(seconds=timeout_s),
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
    `join(rank, address)` returns rank 0's `(host, port)` once every rank has joined."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._joined: set[int] = set()
        self._master: tuple[str, int] | None = None
        self._all_joined = asyncio.Event()

    async def join(self, rank: int, address: tuple[str, int] | None) -> tuple[str, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a group of {self.world_size}")
        if rank == 0:
            if address is None:
                raise ValueError("rank 0 must give its address")
            self._master = address
        self._joined.add(rank)
        if len(self._joined) == self.world_size:
            self._all_joined.set()
        await self._all_joined.wait()
        assert self._master is not None
        return self._master
