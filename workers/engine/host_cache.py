"""`HostPageCache`: the prefix cache's second tier, full pages of KV kept in host memory.

The prefix cache (`prefix_cache.py`) keeps published pages on the device until a request needs
their room; then the least recently used go, and a later request with that prefix computes it
again. With a host tier (`--prefix-cache-host-space` GiB) a page the device lets go is copied
here first, under the same key (which names the whole prefix up to it), and a request whose
prefix goes on past the device's pages takes the next ones from here: each is copied into a new
device page and published there again. Multi-turn conversations and long shared prompts then
outlive the device's KV capacity.

Pages are kept whole in one slab allocated up front, `[capacity, layers, page_size, kv_dim]`
(pinned when the KV cache is on a GPU, so that copies go by DMA at full speed and nothing is
allocated as pages come and go), least recently used first out when the tier is full; a page
loaded back stays here too (written once, read many times), so letting it go from the device
again costs no copy. A page being loaded is taken out of the tier while its device page is
allocated (that allocation may reclaim device pages into the tier and evict its oldest entry);
its slot stays reserved until it is loaded. Copies are synchronous: a batch of evicted pages is
gathered on the device in one copy and goes out a contiguous page at a time; a loaded page
comes back in one copy.
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
        layers, _, dim = data.shape
        self._slab = torch.empty(
            (capacity_pages, layers, page_size, dim), dtype=data.dtype,
            pin_memory=data.device.type == "cuda",
        )  # fmt: skip
        self._free = list(range(capacity_pages - 1, -1, -1))  # slots of the slab not in use
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, oldest first
        self.num_saved = 0  # pages copied here so far
        self.num_loaded = 0  # pages copied back to the device so far

    @property
    def num_pages(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: bytes) -> bool:
        return key in self._slot_of

    def _device_pages(self) -> torch.Tensor:
        """The device KV cache by page: `[layers, pages, page_size, kv_dim]`."""
        layers, _, dim = self.data.shape
        return self.data.view(layers, -1, self.page_size, dim)

    def _slot(self) -> int | None:
        """A free slot, the least recently used page's when none is; None when every slot
        is reserved (`take`: a tier of one page whose page is being loaded)."""
        if not self._free:
            if not self._slot_of:
                return None
            self._free.append(self._slot_of.popitem(last=False)[1])
        return self._free.pop()

    def save(self, keys: Sequence[bytes], pages: Sequence[int]) -> None:
        """Keep the KV of device `pages`, published under `keys`, before their room is reused
        (one that is here already is only marked recently used)."""
        new = []
        for key, page in zip(keys, pages, strict=True):
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
            elif self.capacity_pages > 0:
                new.append((key, page))
        new = new[-self.capacity_pages :]  # (empty when the capacity is 0)
        if not new:
            return
        index = torch.tensor([page for _, page in new], device=self.data.device)
        # [pages, layers, page_size, kv_dim]: each page one contiguous block.
        gathered = self._device_pages().index_select(1, index).transpose(0, 1).contiguous()
        for i, (key, _) in enumerate(new):
            slot = self._slot()
            if slot is None:
                return  # no room: the page is let go, as without a tier
            self._slab[slot].copy_(gathered[i])
            self._slot_of[key] = slot
            self.num_saved += 1

    def take(self, key: bytes) -> int:
        """Take the page kept under `key` out (before a device page is allocated for it: that
        allocation may reclaim pages into this tier, which would evict the oldest entry); its
        slot, reserved until `load`."""
        return self._slot_of.pop(key)

    def load(self, key: bytes, slot: int, page: int) -> None:
        """Copy the page in `slot` (from `take`) into device `page` and keep it here again, as
        the most recently used."""
        self._device_pages()[:, page].copy_(self._slab[slot])
        self._slot_of[key] = slot
        self.num_loaded += 1

    def clear(self) -> int:
        """Forget every page; returns how many there were."""
        num = len(self._slot_of)
        self._free.extend(self._slot_of.values())
        self._slot_of.clear()
        return num
