"""This rank's routed experts (SiLU(gate) * up, then down) over a dispatcher's layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.ep.dispatch import DispatchResult
from workers.model.moe import grouped_gemm_backends


def run_local_experts(
    result: DispatchResult, w13_local: torch.Tensor, w2_local: torch.Tensor
) -> torch.Tensor:
    """Expert outputs in `result.x`'s layout and shape, for `combine`.

    w13_local: `[num_local_slots, 2 * I, hidden]` (gate; up), w2_local:
    `[num_local_slots, hidden, I]`, slot `s` holding the weights of its physical slot's
    logical expert. Padding rows of the masked layout come out unspecified.
    """
    if result.layout == "masked":
        return _masked(result.x, w13_local, w2_local)
    return _contiguous(result.x, result.num_tokens_per_expert, w13_local, w2_local)


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
    if grouped_gemm_backends(x.device, x.dtype)[0] == "grouped_mm":
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
