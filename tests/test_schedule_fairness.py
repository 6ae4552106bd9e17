"""The scheduler's fairness under a small step budget (an audit's findings): speculative
guesses take only what is left once every decode of the step has its token — the first
decodes' guesses took the whole budget, step after step, and the rest got nothing."""

from __future__ import annotations

from collections import Counter

import pytest

from workers.engine.kv_cache import PageAllocator
from workers.engine.messages import SamplingParams
from workers.engine.prefix_cache import CachingAllocator
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence

pytestmark = pytest.mark.timeout(60)


def _step(batch: ScheduledBatch) -> None:
    """What a step does to the scheduled requests' state: their tokens computed (the guesses
    all rejected), a new token drawn where a prompt ends."""
    for seq in batch.decodes:
        seq.num_computed += 1
        seq.draft = []
    for seq, num in batch.prefills:
        seq.num_computed += num
    for seq in [*batch.decodes, *(s for s, _ in batch.prefills)]:
        if seq.num_computed == len(seq.token_ids):
            seq.token_ids.append(7)


@pytest.mark.parametrize(("num_requests", "budget"), [(40, 64), (16, 20), (64, 64)])
def test_guesses_leave_every_decode_its_token(num_requests, budget):
    page = 16
    scheduler = Scheduler(CachingAllocator(PageAllocator(4096), page, enabled=False), page,
                          max_running=256, token_budget=1000)  # fmt: skip
    scheduler.speculate = lambda seq, limit: [5] * min(limit, 3)  # always 3 guesses
    sampling = SamplingParams(max_new_tokens=1000)
    for i in range(num_requests):
        scheduler.add(Sequence(f"r{i}", [1, 2, 3, 4], sampling, i))
    _step(scheduler.schedule())  # every prompt at once: all decode from now on
    scheduler.token_budget = budget
    served: Counter[str] = Counter()
    for _ in range(30):
        batch = scheduler.schedule()
        rows = len(batch.decodes) + sum(len(seq.draft) for seq in batch.decodes)
        assert rows <= budget
        served.update(seq.rid for seq in batch.decodes)
        _step(batch)
    assert all(served[f"r{i}"] == 30 for i in range(num_requests)), served


def test_a_more_important_prompt_preempts_a_less_important_decode_not_itself():
    """L (priority 10) decodes; H (priority 0) comes later with a prompt that needs L's
    pages: L is preempted, also though it was already in the step's batch — H used to
    preempt itself step after step (decodes are scheduled first), its chunk computed and
    thrown away each time, until L ended. The preempted one is not admitted back in the
    same step."""
    page = 4
    allocator = CachingAllocator(PageAllocator(8), page, enabled=False)
    scheduler = Scheduler(allocator, page, max_running=8, token_budget=8)
    low = Sequence("L", list(range(1, 16)), SamplingParams(max_new_tokens=10, priority=10), 0)
    scheduler.add(low)
    for _ in range(2):
        _step(scheduler.schedule())
    assert low.is_decoding
    high = Sequence("H", list(range(1, 25)), SamplingParams(max_new_tokens=4, priority=0), 1)
    scheduler.add(high)
    for _ in range(4):
        batch = scheduler.schedule()
        assert sum(n for _, n in batch.prefills) + len(batch.decodes) <= 8
        _step(batch)
        if high.is_decoding:
            break
    assert high.is_decoding and high.num_preemptions == 0
    assert low.num_preemptions >= 1


def test_preempted_requests_resume_oldest_first_before_newer_arrivals_take_their_pages():
    """A decode rank under a steady inflow of requests whose KV arrives: pages that free up
    go first to the oldest request preempted here, not to the newest arrival, and preempted
    requests resume oldest first (they resumed newest first, and the oldest waited on while
    arrivals took every page)."""
    page = 4
    allocator = CachingAllocator(PageAllocator(16), page, enabled=False)
    scheduler = Scheduler(allocator, page, max_running=64, token_budget=64)
    sampling = SamplingParams(max_new_tokens=12)
    arrivals = iter(range(10_000))
    preempted_at: dict[str, int] = {}
    waited: list[int] = []
    finished = 0
    for step in range(300):
        if step % 2 == 0:  # a little more than the rank can serve
            i = next(arrivals)
            scheduler.expect_kv(Sequence(f"r{i}", [1] * 7, sampling, i))
        for seq in scheduler.reserve_kv():  # its KV comes at once
            scheduler.admit_received(seq)
            seq.token_ids.append(7)
        order = [seq.arrival for seq in scheduler.waiting]
        assert order == sorted(order)  # oldest first
        _step(scheduler.schedule())
        for seq in list(scheduler.running):
            if seq.num_output_tokens >= 12:
                scheduler.remove(seq)
                finished += 1
                if seq.rid in preempted_at:
                    waited.append(step - preempted_at[seq.rid])
        for seq in scheduler.waiting:
            preempted_at.setdefault(seq.rid, step)
    oldest = max(300 - preempted_at[seq.rid] for seq in scheduler.waiting)
    assert finished > 50 and waited, (finished, waited)
    assert max(waited) < 120 and oldest < 120  # (they were 200+: the oldest never resumed)


def test_an_arrival_with_kv_leaves_the_older_waiting_request_its_pages():
    page = 4
    scheduler = Scheduler(CachingAllocator(PageAllocator(4), page, enabled=False), page,
                          max_running=8, token_budget=64)  # fmt: skip
    sampling = SamplingParams(max_new_tokens=4)
    older = Sequence("older", list(range(1, 13)), sampling, 0)  # 3 pages, waiting
    scheduler.add(older)
    newer = Sequence("newer", list(range(1, 8)), sampling, 1)  # 2 pages, its KV arriving
    scheduler.expect_kv(newer)
    assert scheduler.reserve_kv() == []  # 2 + 3 > 4: it waits
    batch = scheduler.schedule()
    assert [seq.rid for seq, _ in batch.prefills] == ["older"]


def test_an_arrival_is_not_held_for_a_waiting_request_the_batch_has_no_place_for():
    page = 4
    scheduler = Scheduler(CachingAllocator(PageAllocator(4), page, enabled=False), page,
                          max_running=1, token_budget=64)  # fmt: skip
    sampling = SamplingParams(max_new_tokens=4)
    running = Sequence("running", [1, 2, 3], sampling, 0)
    scheduler.add(running)
    _step(scheduler.schedule())  # running: 1 page, the batch full (max_running 1)
    waiting = Sequence("waiting", list(range(1, 9)), sampling, 1)  # 2 pages, no place
    scheduler.add(waiting)
    newer = Sequence("newer", list(range(1, 8)), sampling, 2)  # 2 pages, its KV arriving
    scheduler.expect_kv(newer)
    assert [seq.rid for seq in scheduler.reserve_kv()] == ["newer"]  # not held back
