"""`KVSwap`: the KV of preempted requests kept in host memory, so they resume where they were.

A rank out of KV pages preempts a running request (`Scheduler._reserve`). Without a swap the
request's pages are freed and, when it is admitted back, its prompt and output are computed
again: a long request costs a second prefill of everything it had, in a step that every other
request of the batch waits for. With a swap, the computed tokens' KV is copied to host memory
(pinned on CUDA) before the pages are freed, and copied back into new pages when the request
is admitted again: it goes on decoding from the KV it had, bit for bit, with nothing computed
twice.

The copies are synchronous (the step waits for them): preemption is the rare path, and a copy
of a request's KV takes far less than computing it again. The host memory is bounded
(`capacity_tokens`, from `--kv-swap-space` GiB); a request that does not fit there is
recomputed as before. Each request's KV is one tensor, allocated when it is swapped out and
freed when it is swapped in or ends, so the budget costs nothing until it is used.
"""

from __future__ import annotations

import torch

from workers.engine.kv_cache import KVCache
from workers.engine.sequence import Sequence


class KVSwap:
    def __init__(self, cache: KVCache, capacity_tokens: int):
        self.cache = cache
        self.capacity_tokens = capacity_tokens
        self.num_tokens = 0  # tokens whose KV is held here now
        self.num_swapped_out = 0  # requests swapped out so far
        self._held: dict[str, torch.Tensor] = {}  # rid -> [layers, tokens, kv_dim] on the host
        self._pin = cache.data.device.type == "cuda"

    def holds(self, seq: Sequence) -> bool:
        return seq.rid in self._held

    def swap_out(self, seq: Sequence) -> bool:
        """Copy the KV of `seq`'s computed tokens to host memory (its pages still hold it);
        whether it was (False: nothing computed, or no room: the request is recomputed)."""
        num = seq.num_computed
        if num == 0 or self.num_tokens + num > self.capacity_tokens or seq.rid in self._held:
            return False
        data = self.cache.data
        slots = seq.slots(num, self.cache.page_size).to(data.device)
        host = torch.empty(
            (data.shape[0], num, data.shape[2]), dtype=data.dtype, pin_memory=self._pin
        )
        host.copy_(data.index_select(1, slots))
        self._held[seq.rid] = host
        self.num_tokens += num
        self.num_swapped_out += 1
        return True

    def swap_in(self, seq: Sequence) -> int:
        """Copy `seq`'s KV back into its (new) pages, which hold at least as many tokens;
        returns how many tokens it holds (the request's computed tokens again)."""
        host = self._held.pop(seq.rid)
        num = host.shape[1]
        self.num_tokens -= num
        data = self.cache.data
        slots = seq.slots(num, self.cache.page_size).to(data.device)
        data.index_copy_(1, slots, host.to(data.device))
        return num

    def drop(self, seq: Sequence) -> None:
        """Forget `seq`'s KV (it ended while swapped out)."""
        host = self._held.pop(seq.rid, None)
        if host is not None:
            self.num_tokens -= host.shape[1]
