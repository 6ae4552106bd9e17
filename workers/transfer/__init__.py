"""KV-cache transfer between a prefill rank and a decode rank (see `base` for the contract)."""

from __future__ import annotations

import torch

from workers.transfer.base import (
    AgentInfo,
    KVLayout,
    KVReceiver,
    KVSender,
    KVTransferEngine,
    TransferResult,
    TransferState,
    TransferTarget,
)

BACKENDS = ("nixl", "local")


def create_transfer_engine(
    backend: str, name: str, kv: torch.Tensor, page_size: int
) -> KVTransferEngine:
    """The rank's transfer engine over its KV pool `kv: [layers, slots, dim]`."""
    if backend == "nixl":
        from workers.transfer.nixl import NixlTransferEngine

        return NixlTransferEngine(name, kv, page_size)
    if backend == "local":
        from workers.transfer.local import LocalTransferEngine

        return LocalTransferEngine(name, kv, page_size)
    raise ValueError(f"transfer backend must be one of {BACKENDS}, got {backend!r}")


__all__ = [
    "AgentInfo", "KVLayout", "KVReceiver", "KVSender", "KVTransferEngine", "TransferResult",
    "TransferState", "TransferTarget", "create_transfer_engine", "BACKENDS",
]  # fmt: skip
