"""KV-cache transfer between a prefill rank and a decode rank (`base` holds the contract;
`state_machine` the hooks a backend implements)."""

from __future__ import annotations

import torch

from workers.transfer.base import KVTransferEngine
from workers.transfer.handles import KVReceiver, KVSender
from workers.transfer.messages import (
    AgentInfo,
    KVLayout,
    TransferResult,
    TransferState,
    TransferTarget,
)

BACKENDS = ("nixl", "local")


def create_transfer_engine(
    backend: str, name: str, kv: torch.Tensor, page_size: int, poke_host: str | None = None
) -> KVTransferEngine:
    """The rank's transfer engine over its KV pool `kv: [num_layers, num_slots, kv_dim]`
    (contiguous; `num_slots = num_pages * page_size`). `name` must be unique among the ranks
    that exchange KV. `backend`: "nixl" (ranks in any processes) or "local" (one process, for
    tests of the state machine). `poke_host`: the address peers reach this rank at, for the
    datagram that wakes its thread when a write into it starts (`workers.transfer.wake`;
    None: it polls)."""
    if backend == "nixl":
        from workers.transfer.nixl import NixlTransferEngine

        return NixlTransferEngine(name, kv, page_size, poke_host=poke_host)
    if backend == "local":
        from workers.transfer.local import LocalTransferEngine

        return LocalTransferEngine(name, kv, page_size, poke_host=poke_host)
    raise ValueError(f"transfer backend must be one of {BACKENDS}, got {backend!r}")


__all__ = [
    "AgentInfo", "KVLayout", "KVReceiver", "KVSender", "KVTransferEngine", "TransferResult",
    "TransferState", "TransferTarget", "create_transfer_engine", "BACKENDS",
]  # fmt: skip
