"""Building a rank's expert-parallel context from the engine config and its pool group."""

from __future__ import annotations

import torch.distributed as dist

from workers.engine.config import EngineConfig
from workers.ep.backends import available_backends, create_dispatcher
from workers.ep.dispatch import Mode
from workers.ep.moe import EPContext
from workers.ep.placement import ExpertPlacement
from workers.model.config import ModelConfig


def dispatch_mode(config: EngineConfig, role: str) -> Mode:
    """`deepep_mode`, where `auto` means normal (exact-size exchange) for prefill and colocated
    pools and low_latency (fixed-size exchange) for decode pools."""
    if config.deepep_mode == "normal":
        return "normal"
    if config.deepep_mode == "low_latency":
        return "low_latency"
    return "low_latency" if role == "decode" else "normal"


def dispatch_backend(config: EngineConfig) -> str:
    backends = available_backends()
    if config.moe_a2a_backend == "auto":
        return backends[0]
    if config.moe_a2a_backend not in backends:
        raise ValueError(
            f"moe_a2a_backend {config.moe_a2a_backend!r} is not available here "
            f"(available: {backends}; deepep needs the deep_ep package and CUDA)"
        )
    return config.moe_a2a_backend


def build_ep_context(
    model_config: ModelConfig,
    config: EngineConfig,
    role: str,
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None,
    placement: ExpertPlacement | None = None,
) -> EPContext:
    """The EP context of `rank` in a pool of `world_size` over `group` (the pool's data group;
    `torch.distributed` must be initialized). Without `placement`: the default one with
    `config.num_redundant_experts` redundant slots."""
    num_experts = model_config.n_routed_experts
    if not num_experts:
        raise ValueError("expert parallelism needs a MoE model (n_routed_experts > 0)")
    if placement is None:
        placement = ExpertPlacement.default(
            model_config.num_hidden_layers, num_experts, config.num_redundant_experts, world_size
        )
    if placement.num_ranks != world_size:
        raise ValueError(f"the placement is for {placement.num_ranks} ranks, not {world_size}")
    dispatcher = create_dispatcher(
        dispatch_backend(config),  # type: ignore[arg-type]
        dispatch_mode(config, role),
        group,
        placement.slots_per_rank,
        hidden_size=model_config.hidden_size,
        capacity_per_expert=config.low_latency_capacity,
    )
    return EPContext(rank, world_size, placement, dispatcher)
