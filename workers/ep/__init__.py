"""Expert parallelism: expert placement over ranks, token dispatch/combine, local experts."""

from workers.ep.backends import available_backends, create_dispatcher
from workers.ep.dispatch import (
    Dispatcher,
    DispatchResult,
    Pending,
    TorchLowLatencyDispatcher,
    TorchNormalDispatcher,
)
from workers.ep.experts import run_local_experts
from workers.ep.placement import ExpertPlacement

__all__ = [
    "Dispatcher",
    "DispatchResult",
    "ExpertPlacement",
    "Pending",
    "TorchLowLatencyDispatcher",
    "TorchNormalDispatcher",
    "available_backends",
    "create_dispatcher",
    "run_local_experts",
]
