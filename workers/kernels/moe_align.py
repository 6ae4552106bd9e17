"""The sorted-token layout of a routing, which the fused MoE kernels read
(`workers.kernels.fused_moe` states the contract): flattened `(token, k)` ids grouped by expert,
each expert's group padded to a multiple of `BLOCK_M`, in buffers of static worst-case size.
Torch ops only, on the device, with no host synchronization.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton


class AlignedTokens(NamedTuple):
    """The sorted-token layout of a routing (see `workers.kernels.fused_moe`).

    `sorted_ids: [max_rows]` int32 flattened ids grouped by expert, padded with `T * top_k`;
    `block_expert: [max_rows // block_m]` int32 (-1 past the end);
    `num_rows_padded: [1]` int32, the number of used rows (a multiple of `block_m`).
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_rows_padded: torch.Tensor


def max_aligned_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """The static size of `sorted_ids`: every expert may add up to `block_m - 1` pad rows."""
    worst = num_rows + num_experts * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedTokens:
    """Group the flattened ids of `topk_ids: [T, top_k]` (int32/int64) by expert, each expert's
    group padded to a multiple of `block_m` with the sentinel `T * top_k`.

    Ids outside `[0, num_experts)` (e.g. -1) are dropped. Returns `AlignedTokens` with
    `sorted_ids: [max_rows]`, `block_expert: [max_rows // block_m]`, `num_rows_padded: [1]`
    (all int32, on `topk_ids`' device), `max_rows = max_aligned_rows(T * top_k, E, block_m)`.
    Torch ops only, no host synchronization and no data-dependent shapes.
    """
    if num_experts < 1 or block_m < 1:
        raise ValueError("need num_experts >= 1 and block_m >= 1")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    max_rows = max_aligned_rows(n, num_experts, block_m)
    valid = (flat >= 0) & (flat < num_experts)
    keys = torch.where(valid, flat, torch.full_like(flat, num_experts))  # invalid sort last

    order = torch.sort(keys, stable=True).indices  # [n], flattened ids grouped by expert
    sorted_keys = keys[order]
    # torch.bincount syncs on CUDA (it sizes its output from the max); scatter_add does not.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts

    # The j-th sorted entry (expert e) goes to row padded_start[e] + (j - start[e]); the
    # invalid entries go to a dump row max_rows that is cut off afterwards.
    e_safe = sorted_keys.clamp(max=num_experts - 1)
    j = torch.arange(n, device=device)
    row = padded_start[e_safe] + (j - start[e_safe])
    row = torch.where(sorted_keys < num_experts, row, torch.full_like(row, max_rows))
    buf = torch.full((max_rows + 1,), n, dtype=torch.int32, device=device)
    buf.scatter_(0, row, order.to(torch.int32))
    sorted_ids = buf[:max_rows]

    # Block b starts at row b * block_m; its expert is the first one whose padded group ends
    # after that row (empty experts end where the previous one ends, so they are skipped).
    block_start = torch.arange(0, max_rows, block_m, device=device, dtype=torch.int64)
    expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(expert < num_experts, expert, torch.full_like(expert, -1))
    num_rows_padded = padded_end[-1:]
    return AlignedTokens(sorted_ids, block_expert.to(torch.int32), num_rows_padded.to(torch.int32))
