"""Inputs and error measures shared by the C kernel tests (`test_cpu_kernels`,
`test_cpu_blocks`): a paged MLA decode case, and the relative error against a reference."""

from __future__ import annotations

import torch


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _paged_case(lens: list[int], heads: int, kv_lora: int, rope: int, page_size: int, seed: int):
    """q, a cache holding each request's tokens on shuffled pages (every other slot NaN), the
    block table (unused entries point at a NaN page) and lengths."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per) + 2
    perm = torch.randperm(num_pages, generator=g).tolist()
    cache = torch.full((num_pages * page_size, kv_lora + rope), float("nan"))
    table = torch.full((len(lens), max(pages_per + [1]) + 1), perm[-1], dtype=torch.int32)
    for b, n in enumerate(lens):
        for p in range(pages_per[b]):
            page = perm.pop(0)
            table[b, p] = page
            used = min(page_size, n - p * page_size)
            start = page * page_size
            cache[start : start + used] = torch.randn(used, kv_lora + rope, generator=g)
    q = torch.randn(len(lens), heads, kv_lora + rope, generator=g)
    return q, cache, table, torch.tensor(lens, dtype=torch.int32)
