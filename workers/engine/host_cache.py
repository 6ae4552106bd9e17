"""`HostPageCache`: the prefix cache's second tier, full pages of KV kept in host memory.

The prefix cache (`prefix_cache.py`) keeps published pages on the device until a request needs
their room; then the least recently used go, and a later request with that prefix computes it
again. With a host tier (`--prefix-cache-host-space` GiB) a page the device lets go is copied
here first, under the same key (which names the whole prefix up to it), and a request whose
prefix goes on past the device's pages takes the next ones from here: each is copied into a new
device page and published there again. Multi-turn conversations and long shared prompts then
outlive the device's KV capacity.

Pages are kept whole, one tensor `[layers, page_size, kv_dim]` each, least recently used first
out when the tier is full; a page loaded back stays here too (written once, read many times), so
letting it go from the device again costs no copy. A page being loaded is taken out of the tier
while its device page is allocated (that allocation may reclaim device pages into the tier and
evict its oldest entry). Copies are synchronous: a batch of evicted
pages goes out in one gather, a loaded page comes back in one copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


class HostPageCache:
    def __init__(self, data: torch.Tensor, page_size: int, capacity_pages: int):
        """`data`: the device KV cache `[layers, slots, kv_dim]` pages are copied from and to."""
        self.data = data
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self._pages: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> KV, oldest first
        self.num_saved = 0  # pages copied here so far
        self.num_loaded = 0  # pages copied back to the device so far

    @property
    def num_pages(self) -> int:
        return len(self._pages)

    def __contains__(self, key: bytes) -> bool:
        return key in self._pages

    def save(self, keys: Sequence[bytes], pages: Sequence[int]) -> None:
        """Keep the KV of device `pages`, published under `keys`, before their room is reused
        (one that is here already is only marked recently used)."""
        new = []
        for key, page in zip(keys, pages, strict=True):
            if key in self._pages:
                self._pages.move_to_end(key)
            elif self.capacity_pages > 0:
                new.append((key, page))
        new = new[-self.capacity_pages :]  # (empty when the capacity is 0)
        if not new:
            return
        ps = self.page_size
        slots = torch.cat([torch.arange(p * ps, (p + 1) * ps) for _, p in new])
        gathered = self.data.index_select(1, slots.to(self.data.device)).cpu()
        for i, (key, _) in enumerate(new):
            while len(self._pages) >= self.capacity_pages:
                self._pages.popitem(last=False)
            self._pages[key] = gathered[:, i * ps : (i + 1) * ps].clone()
        self.num_saved += len(new)

    def take(self, key: bytes) -> torch.Tensor:
        """Take the KV kept under `key` out (before a device page is allocated for it: that
        allocation may reclaim pages into this tier, which would evict the oldest entry)."""
        return self._pages.pop(key)

    def load(self, key: bytes, kv: torch.Tensor, page: int) -> None:
        """Copy `kv` (from `take`) into device `page` and keep it here again, as the most
        recently used."""
        ps = self.page_size
        self.data[:, page * ps : (page + 1) * ps].copy_(kv)
        while len(self._pages) >= self.capacity_pages:
            self._pages.popitem(last=False)
        self._pages[key] = kv
        self.num_loaded += 1

    def clear(self) -> int:
        """Forget every page; returns how many there were."""
        num = len(self._pages)
        self._pages.clear()
        return num
