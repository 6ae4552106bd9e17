"""Continuous batching with chunked prefill over a paged KV cache.

Each step spends a token budget: every running request that is decoding gets one token, then
running requests still in prefill get chunks, then waiting requests are admitted in order while
budget, pages and the running limit allow. When a running request needs a page and none is free,
the least important running request is preempted: its pages are freed and it goes back to the
front of its place in the queue. With a `KVSwap` its computed KV goes to host memory first and
comes back when it is admitted again (it decodes on as if it had not stopped); without one, or
when the swap is full, it is recomputed. Requests are never dropped or truncated for lack of
memory.

Order: by `SamplingParams.priority` (lower first), then arrival; "least important" is the
highest priority value, the newest of those. With every priority equal (the default) that is
first come, first served, and the newest is preempted.

A prefill rank of a disaggregated pair also knows which requests have decode pages waiting for
their KV (`targeted`: the decode rank reserved them and the router forwarded the target). Those
are admitted first within their priority, and one that lacks pages takes them back from requests
already computed whose decode pages are not reserved yet (`withdraw` says which it may take):
such a request is *parked* — pages freed, first token kept — and computed again only once its
target comes. Without this a prefill rank full of computed prompts waiting for decode pages,
and a decode rank full of pages reserved for prompts the prefill rank cannot fit, would wait on
each other until the transfer timeout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field

from workers.engine.kv_cache import pages_needed
from workers.engine.kv_swap import KVSwap
from workers.engine.prefix_cache import CachedPrefix, CachingAllocator
from workers.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (request, num tokens)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def remove(self, seq: Sequence) -> int:
        """Take `seq` out of the batch (it was preempted): the tokens it had."""
        for i, s in enumerate(self.decodes):
            if s is seq:
                del self.decodes[i]
                return 1 + len(seq.draft)
        for i, (s, num) in enumerate(self.prefills):
            if s is seq:
                del self.prefills[i]
                return num
        return 0


class Scheduler:
    def __init__(
        self,
        allocator: CachingAllocator,
        page_size: int,
        max_running: int,
        token_budget: int,
    ):
        self.allocator = allocator
        self.page_size = page_size
        self.max_running = max_running
        self.token_budget = token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_kv: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.swap: KVSwap | None = None  # where preempted requests' KV waits (None: recompute)
        # Speculative decoding: up to how many tokens (at most the given number) are guessed
        # to follow a decoding request's pending one (`workers.engine.speculative`); None: off.
        self.speculate: Callable[[Sequence, int], list[int]] | None = None
        self.speculate_max_running = 0  # no guesses while more run (0: however many)
        self._turn = 0  # where the decode rows' turns start (more than the budget: `schedule`)
        self.num_reused_tokens = 0  # decode side: prompt tokens whose pages were not sent
        # Decode side: requests moving here with their KV that found no free pages (the
        # engine fails them: `Engine.take_unplaced`).
        self.unplaced: list[Sequence] = []
        # Prefill side (see the module's doc): handed-off requests holding pages, oldest first;
        # the rids whose decode pages are reserved; whether a handed-off request's pages may be
        # taken back (its transfer has no target yet, and is withdrawn).
        self.handed_off: dict[str, Sequence] = {}
        self.targeted: Container[str] = frozenset()
        self.withdraw: Callable[[str], bool] | None = None
        self.num_parked = 0

    @property
    def has_work(self) -> bool:
        """Whether `schedule` or `reserve_kv` can make progress (requests whose KV is in
        transit wait for the transfer, not for a step)."""
        return bool(self.waiting or self.running or self.awaiting_kv)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        _enqueue(self.waiting, seq)

    def remove(self, seq: Sequence, keep_pages: bool = False) -> list[int]:
        """Take a request out (finished or aborted), whatever its state, and free its pages
        (`keep_pages`: return them still allocated, for the caller to free later)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
            if self.swap is not None:
                self.swap.drop(seq)
        elif seq.status is SeqStatus.AWAITING_KV:
            self.awaiting_kv.remove(seq)
        elif seq.status is SeqStatus.HANDOFF:
            del self.handed_off[seq.rid]
        pages = seq.release_pages()
        if not keep_pages:
            self.allocator.free(pages)
        seq.status = SeqStatus.FINISHED
        return pages

    # ---- disaggregation: the prefill side hands pages off, the decode side receives them --------

    def hand_off(self, seq: Sequence) -> None:
        """A prefill-only request is done computing: it leaves the batch, its pages stay held
        (status HANDOFF) until `remove` after they were sent."""
        self.running.remove(seq)
        seq.status = SeqStatus.HANDOFF
        self.handed_off[seq.rid] = seq

    def park(self, seq: Sequence) -> None:
        """Take a handed-off request's pages back (its transfer was withdrawn): it waits, its
        first token kept, until its target comes, then its prompt is computed again (mostly
        from the prefix cache when the pages were not reused meanwhile)."""
        del self.handed_off[seq.rid]
        self.allocator.free(seq.release_pages())
        seq.kept_first = (seq.token_ids.pop(), seq.first_logprob)
        seq.num_computed = 0
        seq.num_preemptions += 1  # the client is told its first run's cached tokens
        self.num_parked += 1
        seq.status = SeqStatus.WAITING
        _enqueue(self.waiting, seq, first=True)

    def _reclaim(self, need: int) -> bool:
        """Park handed-off requests without a target, newest first, until `need` pages are
        free; whether they are."""
        if self.withdraw is not None:
            for seq in reversed(list(self.handed_off.values())):
                if self.allocator.can_allocate(need):
                    break
                if self.withdraw(seq.rid):
                    self.park(seq)
        return self.allocator.can_allocate(need)

    def expect_kv(self, seq: Sequence) -> None:
        """Queue a decode-side request for the pages its prompt's KV will be written into."""
        seq.status = SeqStatus.AWAITING_KV
        _enqueue(self.awaiting_kv, seq)

    def _owed(self, seq: Sequence) -> int:
        """Pages a request arriving with its KV leaves free for the first waiting request when
        that one came earlier (or matters more): one preempted here resumes before newer
        arrivals take the pages it needs (they took every page freed, and it waited on;
        found by an audit)."""
        head = self.waiting[0] if self.waiting else None
        if head is None or (head.sampling.priority, head.arrival) > (
            seq.sampling.priority, seq.arrival,
        ):  # fmt: skip
            return 0
        if len(self.running) >= self.max_running or head.kept_first is not None:
            return 0  # it waits for a place in the batch, or its target: not for pages
        tokens = head.num_tokens if self.swap is not None and self.swap.holds(head) else (
            head.num_computed + min(head.num_pending, self.token_budget)
        )  # fmt: skip
        return max(0, pages_needed(tokens, self.page_size) - len(head.pages))

    def reserve_kv(self) -> list[Sequence]:
        """Give pages to queued decode-side requests in order, all or nothing each, while they
        fit; they become RECEIVING. A request starts with the published pages that hold the
        beginning of its prompt (`num_reused_pages`: the prefill rank need not send those;
        the page with the prompt's last token always comes from it)."""
        reserved = []
        while self.awaiting_kv:
            seq = self.awaiting_kv[0]
            # The page with the last token sent always comes from the sender.
            prefix = self.allocator.match(seq.token_ids, seq.num_sent_tokens - 1, record=False)
            need = pages_needed(seq.num_tokens, self.page_size) - len(prefix.pages)
            if not self.allocator.can_allocate(need + (0 if seq.migrated else self._owed(seq))):
                self.allocator.free(prefix.pages)
                if not seq.migrated:
                    break
                # A request moving here with its KV does not wait for pages (its sender would
                # time out meanwhile): refused now, it resumes elsewhere from its output.
                self.awaiting_kv.popleft()
                seq.status = SeqStatus.FINISHED  # in no queue now: `remove` has nothing to do
                self.unplaced.append(seq)
                continue
            self.awaiting_kv.popleft()
            seq.add_pages(prefix.pages + self.allocator.allocate(need))
            seq.num_reused_pages = seq.num_published = len(prefix.pages)
            seq.last_key = prefix.last_key
            self.num_reused_tokens += len(prefix.pages) * self.page_size
            seq.status = SeqStatus.RECEIVING
            reserved.append(seq)
        return reserved

    def admit_received(self, seq: Sequence) -> None:
        """The prompt's KV arrived (and a resumed request's output's): the request joins the
        running batch, decoding (a migrated request's last token still to compute)."""
        seq.num_computed = seq.num_sent_tokens
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.token_budget
        preempted: set[str] = set()  # this step: not admitted back in the same step
        cap = self.speculate_max_running
        guessing = self.speculate is not None and not (cap and len(self.running) > cap)
        order = sorted(self.running, key=_decodes_first)
        num_decoding = (
            sum(1 for seq in order if not _decodes_first(seq)[0])
            if guessing or len(order) > budget
            else 0
        )  # (counted only when it may matter: this runs every step)
        if num_decoding > budget:
            # More decode rows than a step takes (a decode rank's requests are not capped by
            # `max_running`; DeepEP's low-latency budget is small): they take turns, or the
            # ones after the first `budget` would get no token until those ended (found by
            # an audit).
            turn = self._turn % num_decoding
            order = order[turn:num_decoding] + order[:turn] + order[num_decoding:]
            self._turn += budget
        # Guesses take only what is left once every decode of the step has its token: the
        # first decodes' guesses took it all, step after step, and the others waited (found by
        # an audit).
        decodes_after = num_decoding
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted by an earlier request of this loop
            pending = len(seq.token_ids) - seq.num_computed
            num = pending if pending < budget else budget
            decoding = pending == 1 and seq.num_computed > 0  # `is_decoding`, inlined
            if decoding and guessing:
                decodes_after -= 1
                spare = budget - 1 - decodes_after
                if spare > 0:
                    seq.draft = self._guess(seq, spare)
                    num += len(seq.draft)
            fits, refund = self._reserve(seq, num, batch, preempted)
            budget += refund  # (a less important request's tokens, taken out of the batch)
            if not fits:
                continue  # it was preempted itself
            budget -= num
            if decoding:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, num))

        room = budget > 0 and len(self.running) < self.max_running
        for seq in self._admission_order() if self.waiting and room else ():
            if budget == 0 or len(self.running) >= self.max_running:
                break
            if seq.rid in preempted:
                break  # (not newer ones into the pages it gave up)
            swapped = self.swap is not None and self.swap.holds(seq)
            found = self._take_cached_prefix(seq) if not seq.pages and not swapped else None
            cached = seq.num_computed if found is not None else 0
            num = min(seq.num_pending, budget)
            need = pages_needed(seq.num_computed + num, self.page_size) - len(seq.pages)
            if not self.allocator.can_allocate(need) and not (
                seq.rid in self.targeted and self._reclaim(need)
            ):
                if cached:  # not admitted after all: let go of the cached pages again
                    self.allocator.free(seq.release_pages())
                    seq.num_computed = 0
                break
            if found is not None:  # counted once it is admitted, not at every try
                self.allocator.count_lookup(len(seq.token_ids), found)
            if seq.num_preemptions == 0:  # what the client is told: its prompt's first run
                seq.num_cached_tokens = min(cached, seq.num_prompt_tokens)
            if seq is self.waiting[0]:
                self.waiting.popleft()
            else:
                self.waiting.remove(seq)
            seq.add_pages(self.allocator.allocate(need))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            budget -= num
            if swapped:
                assert self.swap is not None
                self.swap.swap_in(seq)
                if num == 1 and seq.num_pending == 1:  # its next token, as a decode again
                    batch.decodes.append(seq)
                    continue
            batch.prefills.append((seq, num))
        return batch

    def _admission_order(self) -> Iterator[Sequence]:
        """Waiting requests in the order they are admitted: by priority, and within one
        priority those with decode pages reserved (`targeted`) first, then the others in
        queue order; a parked request only once its target came."""
        queue = list(self.waiting)  # the caller takes admitted requests out of the deque
        if not self.targeted:
            yield from (seq for seq in queue if seq.kept_first is None)
            return
        start = 0
        while start < len(queue):
            end, priority = start + 1, queue[start].sampling.priority
            while end < len(queue) and queue[end].sampling.priority == priority:
                end += 1
            group = queue[start:end]
            yield from (seq for seq in group if seq.rid in self.targeted)
            yield from (
                seq for seq in group if seq.rid not in self.targeted and seq.kept_first is None
            )
            start = end

    def _take_cached_prefix(self, seq: Sequence) -> CachedPrefix | None:
        """Start a request being admitted after the published pages that match its tokens
        (all but the last token at most: that one is computed for its logits); what was
        found (None: not looked up)."""
        if seq.sampling.prompt_logprobs:
            return None  # every prompt token is scored: all of them are computed
        prefix = self.allocator.match(seq.token_ids, seq.num_tokens - 1, record=False)
        if prefix.pages:
            seq.add_pages(prefix.pages)
            seq.num_published, seq.last_key = len(prefix.pages), prefix.last_key
            seq.num_computed = len(prefix.pages) * self.page_size
        return prefix

    def publish(self, seq: Sequence) -> None:
        """Publish the pages `seq` has filled with computed KV (call after a step)."""
        if seq.cacheable and (seq.num_published + 1) * self.page_size <= seq.num_computed:
            seq.num_published, seq.last_key = self.allocator.publish(
                seq.token_ids, seq.pages, seq.num_published, seq.last_key, seq.num_computed
            )

    def hold_ahead(self, seq: Sequence, num_positions: int) -> int:
        """Pages for `seq`'s positions below `num_positions`, taken as guesses take them
        (only while a page per running request stays free): how many positions its pages
        then cover. (The MTP module writes its KV ahead when it guesses on its guesses.)"""
        need = pages_needed(num_positions, self.page_size) - len(seq.pages)
        if need > 0 and self.allocator.can_allocate(need + len(self.running)):
            seq.add_pages(self.allocator.allocate(need))
        return len(seq.pages) * self.page_size

    def _reserve(
        self, seq: Sequence, num: int, batch: ScheduledBatch, preempted: set[str]
    ) -> tuple[bool, int]:
        """Pages for `num` more tokens of `seq`, preempting the least important running
        request (the newest of the lowest priority; possibly `seq` itself) until they fit —
        also one already in this step's batch, which then leaves it (decodes are scheduled
        first: an older or more important request's prompt preempted itself rather than a
        newer decode, step after step; found by an audit). Whether `seq` fits, and the
        tokens of the batch's requests preempted (given back to the budget)."""
        need = pages_needed(seq.num_computed + num, self.page_size) - len(seq.pages)
        if need <= 0:  # the common decode step: the token fits the last page
            return True, 0
        if seq.rid in self.targeted:
            self._reclaim(need)  # the pages of requests without a target go first
        refund = 0
        while not self.allocator.can_allocate(need):
            victim = max(self.running, key=lambda s: (s.sampling.priority, s.arrival))
            refund += batch.remove(victim)
            self._preempt(victim)
            preempted.add(victim.rid)
            if victim is seq:
                return False, refund
        seq.add_pages(self.allocator.allocate(need))
        return True, refund

    def _guess(self, seq: Sequence, limit: int) -> list[int]:
        """The tokens guessed to follow `seq`'s pending one, at most `limit`. Guesses take new
        pages only while a page per running request stays free (so that no request's next
        token has to preempt anyone for them); else they are cut to the pages it has."""
        assert self.speculate is not None
        draft = self.speculate(seq, limit)
        if draft:
            ps = self.page_size
            held = max(pages_needed(seq.num_computed + 1, ps), len(seq.pages))
            extra = pages_needed(seq.num_computed + 1 + len(draft), ps) - held
            reserve = len(self.running)
            if extra > 0 and not self.allocator.can_allocate(
                held - len(seq.pages) + extra + reserve
            ):
                draft = draft[: held * ps - seq.num_computed - 1]
        return draft

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft = []
        if self.swap is None or not self.swap.swap_out(seq):
            seq.num_computed = 0  # computed again when admitted back
        self.allocator.free(seq.release_pages())
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        _enqueue(self.waiting, seq, first=True)


def _decodes_first(seq: Sequence) -> tuple[bool, int]:
    """Sort key of the running batch: decoding requests first, then by priority."""
    decoding = seq.num_computed > 0 and len(seq.token_ids) - seq.num_computed == 1
    return not decoding, seq.sampling.priority


def _enqueue(queue: deque[Sequence], seq: Sequence, first: bool = False) -> None:
    """Put `seq` in `queue` (kept in priority order) after every request of its priority, or
    with `first` (a preempted request) by its arrival among them: before those that came
    later, after the earlier ones (preempted too), so that the oldest resumes first — not the
    last preempted, which left older ones waiting behind each newer one (found by an audit)."""
    priority = seq.sampling.priority
    if not first and (not queue or queue[-1].sampling.priority <= priority):
        queue.append(seq)  # the common case: every priority the same
        return
    key = (priority, seq.arrival)
    for i, other in enumerate(queue):
        if other.sampling.priority > priority or (
            first and (other.sampling.priority, other.arrival) > key
        ):
            queue.insert(i, seq)
            return
    queue.append(seq)


def split_batch(batch: ScheduledBatch) -> tuple[ScheduledBatch, ScheduledBatch]:
    """Two micro-batches of about equal tokens (two-batch overlap): the decodes halved, each
    prefill chunk to the lighter one. Either may be empty."""
    half = (len(batch.decodes) + 1) // 2
    a, b = ScheduledBatch(batch.decodes[:half]), ScheduledBatch(batch.decodes[half:])
    for seq, num in batch.prefills:
        (a if a.num_tokens <= b.num_tokens else b).prefills.append((seq, num))
    return a, b
