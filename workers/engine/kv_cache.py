"""Paged latent KV cache: a page allocator and the cache tensor it indexes."""

from __future__ import annotations

import torch


class PageAllocator:
    """Hands out fixed-size pages by index; all-or-nothing allocation, loud on double free."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low indices first
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise RuntimeError(f"KV page {p} freed twice")
            self._is_free[p] = True
            self._free.append(p)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVCache:
    """`data: [num_layers, (num_pages + 1) * page_size, kv_dim]`; slot `p * page_size + i` is
    token `i` of page `p`. One contiguous region, so a transfer engine can register it once.

    The page after the last allocatable one is scratch: padding rows of a captured decode batch
    write their KV to `scratch_slot`, which no request ever reads."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.page_size = page_size
        self.num_pages = num_pages
        self.data = torch.zeros(
            num_layers, (num_pages + 1) * page_size, kv_dim, dtype=dtype, device=device
        )
        self.allocator = PageAllocator(num_pages)
        self.scratch_slot = num_pages * page_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @staticmethod
    def bytes_per_token(num_layers: int, kv_dim: int, dtype: torch.dtype) -> int:
        return num_layers * kv_dim * torch.finfo(dtype).bits // 8
