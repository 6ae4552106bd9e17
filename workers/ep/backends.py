"""Choosing a `Dispatcher`: which backends this process can use, and building one."""

from __future__ import annotations

from typing import Literal

import torch.distributed as dist

from workers.ep.deepep import DeepEPDispatcher, deepep_available
from workers.ep.dispatch import (
    Dispatcher,
    Mode,
    TorchLowLatencyDispatcher,
    TorchNormalDispatcher,
)

Backend = Literal["torch", "deepep"]


def available_backends() -> list[str]:
    """Usable dispatcher backends, best first: `deepep` needs `import deep_ep` and CUDA."""
    return (["deepep"] if deepep_available() else []) + ["torch"]


def create_dispatcher(
    backend: Backend,
    mode: Mode,
    group: dist.ProcessGroup | None,
    num_local_slots: int,
    *,
    hidden_size: int | None = None,
    capacity_per_expert: int = 128,
) -> Dispatcher:
    """A dispatcher over `group` for ranks of `num_local_slots` expert slots each.

    mode: `normal` (exact-size exchange, contiguous layout; prefill) or `low_latency`
    (fixed-capacity exchange, masked layout; decode). `capacity_per_expert`: rows per slot and
    source rank in one round (low_latency only). `hidden_size` sizes DeepEP's buffers.
    """
    if mode not in ("normal", "low_latency"):
        raise ValueError(f"mode must be 'normal' or 'low_latency', got {mode!r}")
    if backend == "torch":
        if mode == "normal":
            return TorchNormalDispatcher(group, num_local_slots)
        return TorchLowLatencyDispatcher(group, num_local_slots, capacity_per_expert)
    if backend == "deepep":
        if not deepep_available():
            raise ValueError("backend 'deepep' needs the deep_ep package and a CUDA device")
        if hidden_size is None:
            raise ValueError("backend 'deepep' needs hidden_size to size its buffers")
        return DeepEPDispatcher(group, num_local_slots, mode, hidden_size, capacity_per_expert)
    raise ValueError(f"backend must be one of {available_backends()}, got {backend!r}")
