"""DeepSeekMoE: the router (gate), routed experts as stacked weights, and shared experts."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import cpu as cpu_kernels
from workers.kernels import triton_available
from workers.kernels.cpu import blocks as cpu_blocks
from workers.model.config import ModelConfig
from workers.model.layers import MLP, empty_param, transposed_storage


class Routing(NamedTuple):
    topk_ids: torch.Tensor  # [T, top_k] int64 logical expert ids
    topk_weights: torch.Tensor  # [T, top_k] float32, scaling factor applied


class Gate(nn.Module):
    """Scores tokens against experts and picks `num_experts_per_tok` of them.

    V3 (`noaux_tc`): sigmoid scores; choice by score + `e_score_correction_bias`, limited to the
    `topk_group` groups whose two best biased scores sum highest; weights are the unbiased scores.
    V2: softmax scores; `greedy` top-k, or `group_limited_greedy` limited to the groups with the
    highest single score.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_routed_experts
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.topk_method = cfg.topk_method
        self.scoring_func = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.is_v3 = cfg.model_type == "deepseek_v3"
        self.weight = empty_param(self.num_experts, cfg.hidden_size)
        self.e_score_correction_bias: torch.Tensor | None = None
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = empty_param(self.num_experts)
        # "torch", or "cpu": V3's routing after the GEMM in one call of workers.kernels.cpu.
        self.backend = "torch"

    @property
    def has_cpu_kernel(self) -> bool:
        return self.is_v3 and self.topk_method == "noaux_tc" and self.scoring_func == "sigmoid"

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """Bool `[T, num_experts]`: experts inside each token's `topk_group` best groups."""
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(1, group_idx, True)
        return group_mask.repeat_interleave(self.num_experts // self.n_group, dim=-1)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        if self.backend == "cpu" and self.has_cpu_kernel and logits.device.type == "cpu":
            assert self.e_score_correction_bias is not None
            return cpu_kernels.route_noaux_tc(
                logits, self.e_score_correction_bias.float(), self.n_group, self.topk_group,
                self.top_k, self.norm_topk_prob, self.routed_scaling_factor,
            )  # fmt: skip
        num_tokens = logits.shape[0]
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

        if self.topk_method == "noaux_tc":
            assert self.e_score_correction_bias is not None
            choice = scores + self.e_score_correction_bias.float()
            if self.n_group > 1:
                grouped = choice.view(num_tokens, self.n_group, self.num_experts // self.n_group)
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
                choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
            topk_ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
            topk_weights = scores.gather(1, topk_ids)
        elif self.topk_method == "group_limited_greedy" and self.n_group > 1:
            group_scores = scores.view(num_tokens, self.n_group, self.num_experts // self.n_group)
            group_scores = group_scores.max(dim=-1).values
            masked = scores.masked_fill(~self._group_mask(group_scores), 0.0)
            topk_weights, topk_ids = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)
        else:
            topk_weights, topk_ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)

        if self.is_v3:
            if self.norm_topk_prob:
                topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
            topk_weights = topk_weights * self.routed_scaling_factor
        elif self.top_k > 1 and self.norm_topk_prob:
            # DeepSeek-V2's own rule: normalized weights are not scaled.
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weights = topk_weights * self.routed_scaling_factor
        return Routing(topk_ids, topk_weights)


class ExpertLoad:
    """Tokens routed to each (layer, logical expert) since the last `take` (the EPLB service's
    input). Counting stays on the device: no host sync per step."""

    def __init__(self, num_layers: int, num_logical: int, device: torch.device):
        self.counts = torch.zeros(num_layers, num_logical, dtype=torch.int64, device=device)
        self.num_steps = 0
        # `[T]` int64 1/0 per token while set: a captured decode step's padding rows count 0.
        self.valid_rows: torch.Tensor | None = None

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        weight = torch.ones_like(topk_ids, dtype=torch.int64)
        if self.valid_rows is not None:
            weight = weight * self.valid_rows[: topk_ids.shape[0], None]
        self.counts[layer].index_add_(0, topk_ids.flatten(), weight.flatten())

    def take(self) -> torch.Tensor:
        """`[num_layers, num_logical]` int64 on the CPU; the window starts again."""
        out = self.counts.to("cpu", copy=True)
        self.counts.zero_()
        return out


def grouped_gemm_backends(
    device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> list[str]:
    """Grouped-GEMM implementations usable for weights on `device` in `dtype`, best first:
    `triton` (the fused MoE kernel, CUDA), `cpu` (the C kernel, float32 on a CPU),
    `grouped_mm`, `loop`."""
    device = device or torch.device("cpu")
    fused = []  # one call for sorting, both GEMMs and the activation
    if device.type == "cuda" and triton_available():
        fused = ["triton"]
    elif device.type == "cpu" and dtype == torch.float32 and cpu_kernels.available():
        fused = ["cpu"]
    usable = hasattr(torch, "_grouped_mm") and (
        device.type == "cpu"
        # The CUDA kernel wants bf16 and Hopper or newer.
        or (
            device.type == "cuda"
            and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (9, 0)
        )
    )
    return fused + (["grouped_mm"] if usable else []) + ["loop"]


class RoutedExperts(nn.Module):
    """All routed experts of a layer: `w13: [E, 2 * I, hidden]` (gate; up), `w2: [E, hidden, I]`.

    Tokens are sorted by expert and each expert's rows run as one GEMM of a grouped GEMM:
    `triton` (the fused MoE kernel of `workers.kernels.fused_moe`: sorting, both GEMMs and
    SiLU-and-mul on the device, no host sync), `cpu` (the C kernel of `workers.kernels.cpu`,
    the same in one call on the host, float32), `grouped_mm` (one `torch._grouped_mm` call for
    all experts, no host sync) or `loop` (one `linear` per expert with tokens). All give the
    same result to float tolerance.

    With FP8 weights kept as they are (`keep_fp8`), `w13`/`w2` are float8 and `w13_scale`/
    `w2_scale` hold the checkpoint's per-block scales; only the `triton` backend takes them.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.w13 = empty_param(num_experts, 2 * intermediate_size, hidden_size)
        self.w2 = empty_param(num_experts, hidden_size, intermediate_size)
        self.backend = grouped_gemm_backends()[0]
        # The logical expert whose weights each slot holds (all of them, in order, on a single
        # rank; a pool rank's own slots under expert parallelism).
        self.slot_experts: list[int] = list(range(num_experts))
        self.w13_scale: torch.Tensor | None  # [E, 2 * I / b0, ceil(hidden / b1)] float32
        self.w2_scale: torch.Tensor | None  # [E, ceil(hidden / b0), ceil(I / b1)] float32
        self.register_buffer("w13_scale", None)
        self.register_buffer("w2_scale", None)
        self.block_shape: tuple[int, int] = (128, 128)

    @property
    def is_fp8(self) -> bool:
        return self.w13.dtype == torch.float8_e4m3fn

    def hold_fp8(self, block_shape: tuple[int, int]) -> None:
        """Hold FP8 weights (`w13`, `w2` float8_e4m3fn) with per-block scales from now on;
        the loader fills both. Only the `triton` backend computes with them."""
        num_experts, two_i, hidden = self.w13.shape
        b0, b1 = block_shape
        self.block_shape = block_shape
        fp8 = torch.float8_e4m3fn
        self.w13 = nn.Parameter(torch.empty(self.w13.shape, dtype=fp8), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.w2.shape, dtype=fp8), requires_grad=False)
        self.w13_scale = torch.ones(num_experts, -(-two_i // b0), -(-hidden // b1))
        self.w2_scale = torch.ones(num_experts, -(-hidden // b0), -(-(two_i // 2) // b1))

    def transpose_storage(self) -> None:
        """Keep `w13` and `w2` in memory as their transposes (`[E, hidden, 2 * I]`, `[E, I,
        hidden]`, what the `cpu` kernel reads); the parameters keep their shapes as strided
        views, so loading, EPLB's slot copies and the torch backends work on them as before."""
        for p in (self.w13, self.w2):
            if not p.data.transpose(1, 2).is_contiguous():
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.backend == "cpu":
            self.transpose_storage()  # no-op unless the weights were replaced since
            w13t, w2t = self.w13.transpose(1, 2), self.w2.transpose(1, 2)
            return cpu_kernels.moe_experts(x, routing.topk_ids, routing.topk_weights, w13t, w2t)
        if self.backend == "triton":
            from workers.kernels.fused_moe import fused_moe

            return fused_moe(
                x, self.w13, self.w2, routing.topk_ids, routing.topk_weights,
                w13_scale=self.w13_scale, w2_scale=self.w2_scale, block_shape=self.block_shape,
            )  # fmt: skip
        top_k = routing.topk_ids.shape[1]
        flat_ids = routing.topk_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        x_sorted = x.index_select(0, token_of)
        # Each row's routing weight scales its expert's activation, before the down
        # projection (linear: the same product, on the narrower tensor).
        weights = routing.topk_weights.flatten().index_select(0, order).to(x.dtype)[:, None]
        if self.backend == "grouped_mm":
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            gate, up = torch._grouped_mm(x_sorted, self.w13.transpose(1, 2), offs=offs).chunk(2, -1)
            act = F.silu(gate).mul_(up).mul_(weights)
            out_sorted = torch._grouped_mm(act, self.w2.transpose(1, 2), offs=offs)
        else:
            out_sorted = self._loop(x_sorted, counts.tolist(), weights)
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, out_sorted)
        return out

    def _loop(
        self, x_sorted: torch.Tensor, counts: list[int], weights: torch.Tensor
    ) -> torch.Tensor:
        out_sorted = torch.empty_like(x_sorted)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            rows = slice(start, start + count)
            gate, up = F.linear(x_sorted[rows], self.w13[expert]).chunk(2, dim=-1)
            act = F.silu(gate).mul_(up).mul_(weights[rows])
            out_sorted[rows] = F.linear(act, self.w2[expert])
            start += count
        return out_sorted


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        assert cfg.n_routed_experts
        self.layer_idx = layer_idx
        self.load: ExpertLoad | None = None  # set to record the expert load
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(
            cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        )
        self.shared_experts: MLP | None = None
        if cfg.n_shared_experts:
            self.shared_experts = MLP(
                cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias
            )
        self.cpu_kernel = False  # the whole layer as one workers.kernels.cpu.blocks.moe_block call

    def use_cpu_kernel(self) -> None:
        """Run the whole layer as one `workers.kernels.cpu.blocks.moe_block` call where it applies:
        V3 routing (`Gate.has_cpu_kernel`), float32 routed experts on the `cpu` backend, shared
        experts without biases. The router weight is kept transposed (its parameter a view)."""
        shared = self.shared_experts
        if shared is not None:
            shared.use_cpu_kernel()
        self.cpu_kernel = (
            self.gate.has_cpu_kernel
            and self.experts.backend == "cpu"
            and self.experts.w13.dtype == torch.float32
            and (shared is None or shared.cpu_weights is not None)
        )
        if self.cpu_kernel:
            self.gate.weight.data = transposed_storage(self.gate.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padded static batches (`valid_rows`) count only their real rows: the per-op path.
        counting_all = self.load is None or self.load.valid_rows is None
        if self.cpu_kernel and x.dtype == torch.float32 and counting_all:
            return self._forward_cpu(x)
        routing = self.gate(x)
        if self.load is not None:
            self.load.record(self.layer_idx, routing.topk_ids)
        out = self.experts(x, routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        load = None if self.load is None else self.load.counts[self.layer_idx]
        return cpu_blocks.moe_block(x, self.cpu_ffn(), load)

    def cpu_ffn(self) -> cpu_blocks.MoEFFN:
        """The layer as the C MoE block reads it (after `use_cpu_kernel`)."""
        gate, experts = self.gate, self.experts
        assert self.cpu_kernel and gate.e_score_correction_bias is not None
        experts.transpose_storage()  # no-op unless the weights were replaced since
        shared = None if self.shared_experts is None else self.shared_experts.cpu_weights
        return cpu_blocks.MoEFFN(
            gate.weight.t(), gate.e_score_correction_bias.data, gate.n_group, gate.topk_group,
            gate.top_k, gate.norm_topk_prob, gate.routed_scaling_factor,
            experts.w13.transpose(1, 2), experts.w2.transpose(1, 2), shared,
        )  # fmt: skip
