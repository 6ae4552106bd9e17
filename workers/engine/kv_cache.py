"""Paged latent KV cache: a page allocator and the cache tensor it indexes."""

from __future__ import annotations

import bisect

import psutil
import torch

from workers.engine.config import EngineConfig
from workers.engine.host_cache import HostPageCache
from workers.engine.prefix_cache import CachingAllocator


class PageAllocator:
    """Hands out fixed-size pages by index; all-or-nothing allocation, loud on double free.

    The free pages are kept as sorted runs of consecutive pages (merged on free), and an
    allocation takes the first run that holds it whole: a request's pages are consecutive
    whenever the free space allows, so its KV moves between ranks as one block per layer (one
    transfer descriptor per run and layer, not per page and layer). Only when no run is long
    enough does it take the lowest free pages, run by run.
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._starts: list[int] = [0]  # first page of each free run, ascending
        self._lengths: dict[int, int] = {0: num_pages}  # run start -> pages in it
        self._num_free = num_pages
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_free_runs(self) -> int:
        return len(self._starts)

    def has_run(self, n: int) -> bool:
        """Whether `n` consecutive pages are free."""
        return any(length >= n for length in self._lengths.values())

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate(self, n: int) -> list[int]:
        if n > self._num_free:
            raise MemoryError(f"asked for {n} KV pages, {self._num_free} free")
        if n <= 0:
            return []
        lengths = self._lengths
        fit = next((i for i, start in enumerate(self._starts) if lengths[start] >= n), None)
        if fit is not None:
            pages = self._take(fit, n)
        else:  # fragmented: the lowest free pages
            pages = []
            while len(pages) < n:
                pages += self._take(0, min(n - len(pages), lengths[self._starts[0]]))
        for p in pages:
            self._is_free[p] = False
        self._num_free -= n
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise RuntimeError(f"KV page {p} freed twice")
            self._is_free[p] = True
        self._num_free += len(pages)
        run_start = run_end = -1
        for p in sorted(pages):
            if p == run_end:
                run_end += 1
                continue
            if run_end > run_start:
                self._add_run(run_start, run_end - run_start)
            run_start, run_end = p, p + 1
        if run_end > run_start:
            self._add_run(run_start, run_end - run_start)

    def _take(self, index: int, n: int) -> list[int]:
        """The first `n` pages of free run `index` (which holds at least `n`)."""
        start = self._starts[index]
        length = self._lengths.pop(start)
        if length > n:
            self._starts[index] = start + n
            self._lengths[start + n] = length - n
        else:
            del self._starts[index]
        return list(range(start, start + n))

    def _add_run(self, start: int, length: int) -> None:
        """Insert a run of free pages, merging it with the free runs it touches."""
        starts, lengths = self._starts, self._lengths
        i = bisect.bisect_left(starts, start)
        if i > 0 and starts[i - 1] + lengths[starts[i - 1]] == start:  # extends the previous
            i -= 1
            start = starts[i]
            length += lengths.pop(start)
            del starts[i]
        if i < len(starts) and start + length == starts[i]:  # reaches the next
            length += lengths.pop(starts[i])
            del starts[i]
        starts.insert(i, start)
        lengths[start] = length


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
        prefix_caching: bool = False,
        host_pages: int = 0,
    ):
        """`host_pages`: pages of the prefix cache's host tier (0: none)."""
        self.page_size = page_size
        self.num_pages = num_pages
        self.data = torch.zeros(
            num_layers, (num_pages + 1) * page_size, kv_dim, dtype=dtype, device=device
        )
        host = HostPageCache(self.data, page_size, host_pages) if host_pages > 0 else None
        self.allocator = CachingAllocator(PageAllocator(num_pages), page_size, prefix_caching, host)
        self.scratch_slot = num_pages * page_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @staticmethod
    def bytes_per_token(num_layers: int, kv_dim: int, dtype: torch.dtype) -> int:
        return num_layers * kv_dim * torch.finfo(dtype).bits // 8


def num_kv_pages(
    config: EngineConfig, num_layers: int, kv_cache_dim: int, dtype: torch.dtype,
    device: torch.device,
) -> int:  # fmt: skip
    """How many KV pages a rank gets: `kv_capacity_tokens` when set; else, on CUDA, what fits in
    `kv_memory_fraction` (default 0.85) of the rank's share of its GPU beside the weights
    already loaded there (ValueError, with what to change, when not two pages fit); on CPU,
    `kv_memory_fraction` (default 0.1) of the host memory. One page more is kept as scratch."""
    if config.kv_capacity_tokens is not None:
        return pages_needed(config.kv_capacity_tokens, config.page_size)
    per_page = config.page_size * KVCache.bytes_per_token(num_layers, kv_cache_dim, dtype)
    if device.type == "cuda":
        # Weights + KV within the fraction of this rank's share of the device (ranks sharing a
        # GPU each get theirs, whatever order they load in).
        fraction = config.kv_memory_fraction or 0.85
        total = torch.cuda.get_device_properties(device).total_memory
        share = total * config.gpu_memory_share
        weights = torch.cuda.memory_allocated(device)
        budget = share * fraction - weights
        if budget < 2 * per_page:
            gib = 1 << 30
            raise ValueError(
                f"no room for a KV cache: the weights take {weights / gib:.1f} GiB of this "
                f"rank's {share / gib:.1f} GiB GPU share x kv_memory_fraction {fraction}; "
                "raise --kv-memory-fraction, give each rank more GPU memory, or set "
                "--kv-capacity-tokens"
            )
    else:
        budget = psutil.virtual_memory().total * (config.kv_memory_fraction or 0.1)
    return max(1, int(budget // per_page) - 1)  # one page is scratch
