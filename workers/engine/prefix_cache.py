"""Prefix caching: full pages of computed KV shared between requests whose tokens begin alike.

A page whose `page_size` tokens are all computed is published under a key that hashes its
tokens together with the key of the page before it (BLAKE2b, so a key names the whole prefix up
to and including the page, and two different prefixes cannot be made to collide). A new request
takes the longest run of published pages that matches its prompt, so its prefill starts after
them.

Every page is in one of three states: held (by one or more requests: `refs > 0`; it may also be
published), idle (published, held by nobody; kept in LRU order and reclaimed only when a
request needs a page and none is free) or free (in the `PageAllocator`). Idle pages count as
free to everyone outside (`num_free`), so the scheduler, the stats and the router's view of
capacity do not change. A published page is never written again: only full pages are published,
and a request writes only past its computed tokens.

With a host tier (`HostPageCache`) a reclaimed page's KV is kept in host memory under its key,
and `match` follows a prefix on from the device's pages into the host's, copying each page it
finds there into a newly allocated device page (published again).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from workers.engine.host_cache import HostPageCache
    from workers.engine.kv_cache import PageAllocator

_ROOT = b""  # the key before a request's first page


class CachedPrefix(NamedTuple):
    """Published pages matching the start of a prompt (now held for the caller) and the key of
    the last one (the chain goes on from there)."""

    pages: list[int]
    last_key: bytes
    num_loaded: int = 0  # of `pages`, those copied back from the host tier


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a page holding `tokens`, after the page whose key is `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class CachingAllocator:
    """The pages of one KV cache with prefix caching on top of a `PageAllocator`: the same
    `num_free` / `can_allocate` / `allocate` / `free` calls (where `free` drops the caller's
    hold), plus `match` and `publish`. With `enabled=False` it is the plain allocator; `host`:
    the host tier reclaimed pages go to (and `match` takes them back from)."""

    def __init__(
        self, allocator: PageAllocator, page_size: int, enabled: bool = True,
        host: HostPageCache | None = None,
    ):  # fmt: skip
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self.host = host if enabled else None
        self.num_pages = allocator.num_pages
        self._refs = [0] * allocator.num_pages
        self._page_of: dict[bytes, int] = {}  # key -> published page
        self._key_of: dict[int, bytes] = {}  # published page -> key
        self._idle: OrderedDict[int, None] = OrderedDict()  # published, unheld; oldest first
        self.num_queried_tokens = 0  # prompt tokens looked up
        self.num_hit_tokens = 0  # of those, found computed
        self.num_host_hit_tokens = 0  # of those, found in the host tier (copied back)

    @property
    def num_free(self) -> int:
        return self.allocator.num_free + len(self._idle)

    @property
    def num_idle(self) -> int:
        """Published pages nobody holds (reclaimable)."""
        return len(self._idle)

    @property
    def num_free_runs(self) -> int:
        return self.allocator.num_free_runs

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """`n` pages held once each, reclaiming the least recently used idle pages when the
        free ones are too few. All or nothing (MemoryError).

        Reclaiming goes on past the shortfall, up to `4 n` more pages, until `n` consecutive
        pages are free: a request's pages went idle together and lie side by side, so this
        keeps a new request's pages consecutive (one transfer descriptor per layer) instead
        of gathering single pages from all over the pool."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV pages, {self.num_free} free")
        short = n - self.allocator.num_free
        if short > 0 or (self._idle and not self.allocator.has_run(n)):
            self._reclaim(max(short, 0))
            extra = 4 * n
            while extra > 0 and self._idle and not self.allocator.has_run(n):
                self._reclaim(min(extra, n))
                extra -= n
        pages = self.allocator.allocate(n)
        for page in pages:
            self._refs[page] = 1
        return pages

    def flush(self) -> int:
        """Forget every published page: idle ones are freed, held ones stay their holders'
        (and are freed as usual). Returns the pages freed."""
        idle = list(self._idle)
        self._idle.clear()
        self._page_of.clear()
        self._key_of.clear()
        if idle:
            self.allocator.free(idle)
        return len(idle) + (self.host.clear() if self.host is not None else 0)

    def _reclaim(self, num: int) -> None:
        """Unpublish the `num` least recently used idle pages and free them."""
        evicted = [self._idle.popitem(last=False)[0] for _ in range(min(num, len(self._idle)))]
        keys = [self._key_of.pop(page) for page in evicted]
        for key in keys:
            del self._page_of[key]
        if evicted:
            if self.host is not None:
                self.host.save(keys, evicted)
            self.allocator.free(evicted)

    def free(self, pages: list[int]) -> None:
        """Drop one hold on each page: a page nobody holds goes idle if published, else back
        to the allocator. RuntimeError for a page that was not held."""
        freed = []
        # Last page first: a request's deeper pages go idle before (are older than) the ones
        # they follow, so the LRU end reclaims a prefix from its end, never leaving a page
        # whose parent is gone (unreachable) behind.
        for page in reversed(pages):
            refs = self._refs[page]
            if refs <= 0:
                raise RuntimeError(f"KV page {page} freed twice")
            self._refs[page] = refs - 1
            if refs == 1:
                if page in self._key_of:
                    self._idle[page] = None
                else:
                    freed.append(page)
        if freed:
            self.allocator.free(freed)

    def match(self, token_ids: Sequence[int], max_tokens: int, record: bool = True) -> CachedPrefix:
        """The published pages that hold the first tokens of `token_ids`, at most `max_tokens`
        of them (a prompt's last token is always computed again, for its logits); each page
        is now held for the caller (drop it with `free`). Past the device's pages the prefix
        goes on in the host tier while pages can be allocated for it. `record`: count the
        lookup in the hit statistics (prompt tokens spared computation)."""
        ps = self.page_size
        if not self.enabled:
            if record:
                self.num_queried_tokens += len(token_ids)
            return CachedPrefix([], _ROOT)
        pages: list[int] = []
        key = _ROOT
        num_loaded = 0
        for start in range(0, max_tokens - ps + 1, ps):
            nxt = page_key(key, token_ids[start : start + ps])
            page = self._page_of.get(nxt)
            if page is not None:  # held now, so that loading the next ones cannot reclaim it
                if self._refs[page] == 0:
                    del self._idle[page]
                self._refs[page] += 1
            elif self.host is not None and nxt in self.host and self.can_allocate(1):
                slot = self.host.take(nxt)  # out first: the allocation may fill the tier
                page = self.allocate(1)[0]
                self.host.load(nxt, slot, page)
                self._page_of[nxt], self._key_of[page] = page, nxt
                num_loaded += 1
            else:
                break
            pages.append(page)
            key = nxt
        found = CachedPrefix(pages, key, num_loaded)
        if record:
            self.count_lookup(len(token_ids), found)
        return found

    def count_lookup(self, num_tokens: int, found: CachedPrefix) -> None:
        """Count a lookup of `num_tokens` prompt tokens that found `found` in the hit
        statistics (`match(record=False)` leaves it to the caller: a request that is not
        admitted after all is looked up again at its next try)."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += len(found.pages) * self.page_size
        self.num_host_hit_tokens += found.num_loaded * self.page_size

    def publish(
        self, token_ids: Sequence[int], pages: Sequence[int], num_published: int, last_key: bytes,
        num_computed: int,
    ) -> tuple[int, bytes]:  # fmt: skip
        """Publish a request's pages that are full and computed (`num_computed` tokens), from
        page `num_published` on; returns the new `(num_published, last_key)`. A page whose
        prefix is already published elsewhere (two requests computed it at once) stays the
        request's own and is freed as usual."""
        ps = self.page_size
        if not self.enabled:
            return num_published, last_key
        while (num_published + 1) * ps <= num_computed:
            start = num_published * ps
            key = page_key(last_key, token_ids[start : start + ps])
            page = pages[num_published]
            if key not in self._page_of and page not in self._key_of:
                self._page_of[key] = page
                self._key_of[page] = key
            num_published += 1
            last_key = key
        return num_published, last_key
