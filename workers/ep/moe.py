"""The MoE layer of an expert-parallel pool, and the expert-load recorder.

Each rank holds the router (gate), the shared experts and only its own physical expert slots.
A layer runs in three stages so that two micro-batches can interleave them (two-batch overlap):

    stage = moe.dispatch(x)        # route, pick replicas, start the all-to-all
    stage = moe.run_experts(stage) # wait for the rows, run the local experts, start the combine
    y = moe.finish(stage)          # wait for the combine, add the shared experts

`forward(x)` runs the three in a row. Every rank of the pool must call the same stages in the
same order (they hold collectives), with its own number of tokens (0 allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.ep.deep_gemm_experts import DeepGemmExperts, Kernels, deep_gemm_available
from workers.ep.dispatch import Dispatcher, Pending
from workers.ep.experts import run_local_experts
from workers.ep.placement import ExpertPlacement
from workers.model.config import ModelConfig
from workers.model.layers import MLP
from workers.model.moe import ExpertLoad, Gate, RoutedExperts


@dataclass
class EPContext:
    """What the MoE layers of one rank share: its place in the pool, the expert placement (may
    be swapped between steps by a rebalance), the dispatcher and the load recorder."""

    rank: int
    world_size: int
    placement: ExpertPlacement
    dispatcher: Dispatcher
    load: ExpertLoad | None = None


@dataclass
class _Stage:
    x: torch.Tensor
    pending: Pending[Any]
    shared: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class EPMoE(nn.Module):
    """DeepSeekMoE with the routed experts spread over the pool (`experts` holds this rank's
    slots: `experts.slot_experts[s]` is the logical expert of local slot `s`)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, ep: EPContext):
        super().__init__()
        assert cfg.n_routed_experts
        self.layer_idx = layer_idx
        self.ep = ep
        self.gate = Gate(cfg)
        placement = ep.placement
        self.experts = RoutedExperts(
            placement.slots_per_rank, cfg.hidden_size, cfg.moe_intermediate_size
        )
        self.experts.slot_experts = placement.local_experts(layer_idx, ep.rank).tolist()
        self.fp8_experts: DeepGemmExperts | None = None  # set by `use_deep_gemm`
        self.shared_experts: MLP | None = None
        if cfg.n_shared_experts:
            self.shared_experts = MLP(
                cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias
            )

    def use_deep_gemm(self, kernels: Kernels | None = None) -> None:
        """Run the routed experts as FP8 DeepGEMM grouped GEMMs from now on (weights quantized
        to FP8 with 128x128 block scales once, here). `kernels`: stand-ins for tests."""
        self.fp8_experts = DeepGemmExperts(self.experts.w13, self.experts.w2, kernels)

    def dispatch(self, x: torch.Tensor) -> _Stage:
        routing = self.gate(x)
        if self.ep.load is not None:
            self.ep.load.record(self.layer_idx, routing.topk_ids)
        topk_phys = self.ep.placement.choose_replicas(
            self.layer_idx, routing.topk_ids, self.ep.rank
        )
        pending = self.ep.dispatcher.dispatch_async(x, topk_phys, routing.topk_weights)
        return _Stage(x, pending)

    def run_experts(self, stage: _Stage) -> _Stage:
        result = stage.pending.wait()
        if self.fp8_experts is not None:
            out = self.fp8_experts(result)
        else:
            out = run_local_experts(result, self.experts.w13, self.experts.w2)
        stage.pending = self.ep.dispatcher.combine_async(out, result.handle)
        # The shared experts run while the combine is in flight.
        if self.shared_experts is not None:
            stage.shared = self.shared_experts(stage.x)
        return stage

    def finish(self, stage: _Stage) -> torch.Tensor:
        out: torch.Tensor = stage.pending.wait()
        return out if stage.shared is None else out + stage.shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.run_experts(self.dispatch(x)))


def select_grouped_gemm(
    model: nn.Module, choice: str, expert_parallel: bool, dtype: torch.dtype, device: torch.device
) -> str:
    """The grouped-GEMM backend of an expert-parallel pool's `EPMoE` layers in `model`, set on
    them: `deep_gemm` (FP8 experts) on Hopper with bf16 weights, when `choice` is `deep_gemm`
    or `auto` and it imports (ValueError when `deep_gemm` is chosen and cannot run); `torch`
    otherwise."""
    usable = (
        expert_parallel and dtype == torch.bfloat16
        and deep_gemm_available(device if device.type == "cuda" else None)
    )  # fmt: skip
    if choice == "deep_gemm" and not usable:
        raise ValueError(
            "grouped_gemm_backend deep_gemm needs the deep_gemm package, a Hopper GPU, "
            "dtype bfloat16 and an expert-parallel pool"
        )
    if choice == "torch" or not usable:
        return "torch"
    for module in model.modules():
        if isinstance(module, EPMoE):
            module.use_deep_gemm()
    return "deep_gemm"
