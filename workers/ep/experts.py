"""This rank's routed experts (SiLU(gate) * up, then down) over a dispatcher's layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.ep.dispatch import DispatchResult
from workers.kernels import cpu as cpu_kernels
from workers.model.moe import grouped_gemm_backends


def run_local_experts(
    result: DispatchResult, w13_local: torch.Tensor, w2_local: torch.Tensor
) -> torch.Tensor:
    """Expert outputs in `result.x`'s layout and shape, for `combine`.

    w13_local: `[num_local_slots, 2 * I, hidden]` (gate; up), w2_local:
    `[num_local_slots, hidden, I]`, slot `s` holding the weights of its physical slot's
    logical expert. Padding rows of the masked layout come out unspecified.
    """
    x = result.x
    if "triton" in grouped_gemm_backends(x.device, x.dtype) and x.numel():
        return _fused(x, result, w13_local, w2_local)
    if result.layout == "masked":
        return _masked(x, w13_local, w2_local)
    return _contiguous(x, result.num_tokens_per_expert, w13_local, w2_local)


def _fused(
    x: torch.Tensor, result: DispatchResult, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The fused MoE kernel (CUDA), the same one a single rank runs: each row is one token
    of top-k 1 with weight 1, its expert the slot it sits in."""
    from workers.kernels.fused_moe import fused_moe

    num_slots = w13.shape[0]
    slots = torch.arange(num_slots, device=x.device)
    if result.layout == "masked":
        rows = x.view(-1, x.shape[-1])  # [S * max_rows, hidden]; padding rows skipped (-1)
        real = torch.arange(x.shape[1], device=x.device) < result.num_tokens_per_expert[:, None]
        ids = torch.where(real, slots[:, None], -1).flatten()
    else:
        rows = x
        ids = slots.repeat_interleave(result.num_tokens_per_expert, output_size=x.shape[0])
    ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    return fused_moe(rows, w13, w2, ids[:, None], ones).view(x.shape[:-1] + (w2.shape[1],))


def _masked(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    # x: [S, max_rows, hidden]; one batched GEMM over all slots, padding included.
    gate, up = torch.bmm(x, w13.transpose(1, 2).to(x.dtype)).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, w2.transpose(1, 2).to(x.dtype))


def _contiguous(
    x: torch.Tensor, num_tokens_per_expert: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    # x: [num_rows, hidden], sorted by slot.
    if not x.shape[0]:
        return x.new_empty(0, w2.shape[1])
    backends = grouped_gemm_backends(x.device, x.dtype)
    w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)
    if backends[0] == "cpu" and w13t.is_contiguous() and w2t.is_contiguous():
        # The single rank's C kernel, each row one token of top-k 1 with weight 1.
        slots = torch.arange(w13.shape[0]).repeat_interleave(
            num_tokens_per_expert.cpu(), output_size=x.shape[0]
        )
        ones = torch.ones(x.shape[0], 1)
        return cpu_kernels.moe_experts(x, slots[:, None], ones, w13t, w2t)
    if "grouped_mm" in backends:
        offs = torch.cumsum(num_tokens_per_expert, 0, dtype=torch.int32)
        gate, up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    out = torch.empty(x.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for slot, count in enumerate(num_tokens_per_expert.tolist()):
        rows = slice(start, start + count)
        if count:
            gate, up = F.linear(x[rows], w13[slot]).chunk(2, dim=-1)
            out[rows] = F.linear(F.silu(gate) * up, w2[slot])
        start += count
    return out
