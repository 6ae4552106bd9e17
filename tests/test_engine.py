"""Engine bookkeeping: pages, scheduling, sampling, finishing and aborting requests."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.checkpoints import make_checkpoint
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.kv_cache import KVCache, PageAllocator
from workers.engine.kv_swap import KVSwap
from workers.engine.messages import FinishReason, GenerateRequest, SamplingParams
from workers.engine.prefix_cache import CachingAllocator
from workers.engine.sampling import filtered_probs, greedy_tokens, sample
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence

pytestmark = pytest.mark.timeout(120)


def test_page_allocator_all_or_nothing_and_double_free():
    alloc = PageAllocator(4)
    pages = alloc.allocate(3)
    assert sorted(pages) == [0, 1, 2] and alloc.num_free == 1
    with pytest.raises(MemoryError):
        alloc.allocate(2)
    assert alloc.num_free == 1
    alloc.free(pages)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free([pages[0]])
    assert alloc.num_free == 4


def _longest_free_run(free: set[int]) -> int:
    best = run = 0
    for p in range(max(free, default=-1) + 2):
        run = run + 1 if p in free else 0
        best = max(best, run)
    return best


def test_page_allocator_keeps_requests_on_consecutive_pages_through_churn():
    """Random allocations and frees against a plain set of free pages: pages are never handed
    out twice, the counts agree, an allocation is one run of consecutive pages whenever some
    free run can hold it, and freeing everything merges the free space back into one run."""
    rng = random.Random(0)
    num_pages = 200
    alloc = PageAllocator(num_pages)
    free = set(range(num_pages))
    held: list[list[int]] = []
    consecutive = fits = 0
    for _ in range(3000):
        if held and (rng.random() < 0.45 or alloc.num_free < 20):
            pages = held.pop(rng.randrange(len(held)))
            alloc.free(pages)
            free |= set(pages)
        else:
            n = rng.choice([1, 1, 2, 3, 5, 8, 13])
            if not alloc.can_allocate(n):
                continue
            could_fit = _longest_free_run(free) >= n
            pages = alloc.allocate(n)
            assert len(pages) == n and set(pages) <= free
            free -= set(pages)
            is_run = pages == list(range(pages[0], pages[0] + n))
            assert is_run or not could_fit, (pages, sorted(free))
            fits += could_fit
            consecutive += is_run
            held.append(pages)
        assert alloc.num_free == len(free)
    assert fits > 500 and consecutive >= fits
    for pages in held:
        alloc.free(pages)
    assert alloc.num_free == num_pages and alloc.num_free_runs == 1
    assert alloc.allocate(num_pages) == list(range(num_pages))


def _seq(rid: str, n: int, arrival: int, priority: int = 0) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(priority=priority), arrival)


def test_scheduler_budget_chunks_and_running_limit():
    sched = Scheduler(
        CachingAllocator(PageAllocator(100), 4), page_size=4, max_running=2, token_budget=10
    )
    for i, n in enumerate((6, 7, 3)):
        sched.add(_seq(f"r{i}", n, i))
    batch = sched.schedule()
    # r0 whole (6), r1 chunk of 4 (budget), r2 waits for the running limit.
    assert [(s.rid, n) for s, n in batch.prefills] == [("r0", 6), ("r1", 4)]
    assert [s.rid for s in sched.waiting] == ["r2"]
    for s, n in batch.prefills:
        s.num_computed += n
    sched.running[0].token_ids.append(1)  # r0 sampled a token: now decoding
    batch = sched.schedule()
    assert [s.rid for s in batch.decodes] == ["r0"]
    assert [(s.rid, n) for s, n in batch.prefills] == [("r1", 3)]


def test_scheduler_preempts_newest_when_pages_run_out():
    sched = Scheduler(
        CachingAllocator(PageAllocator(4), 2), page_size=2, max_running=8, token_budget=100
    )
    old, new = _seq("old", 4, 0), _seq("new", 3, 1)
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert len(batch.prefills) == 2 and sched.allocator.num_free == 0
    for s, n in batch.prefills:
        s.num_computed += n
        s.token_ids.append(1)
    # old needs a third page: new (the newest) is preempted and requeued at the front.
    batch = sched.schedule()
    assert [s.rid for s in batch.decodes] == ["old"]
    assert [s.rid for s in sched.waiting] == ["new"]
    assert new.num_computed == 0 and new.pages == [] and sched.num_preemptions == 1


def _swapping_scheduler(swap_tokens: int) -> tuple[Scheduler, KVCache, Sequence, Sequence]:
    """Two running requests on 4 pages of 2 tokens, both past their prefill ("new": 3 prompt
    tokens computed, its first output token drawn); `swap_tokens` of host swap."""
    cache = KVCache(2, 4, 2, 3, torch.float32, torch.device("cpu"))
    sched = Scheduler(cache.allocator, page_size=2, max_running=8, token_budget=100)
    sched.swap = KVSwap(cache, swap_tokens)
    old, new = _seq("old", 4, 0), _seq("new", 3, 1)
    sched.add(old)
    sched.add(new)
    for s, n in sched.schedule().prefills:
        s.num_computed += n
        s.token_ids.append(1)
    return sched, cache, old, new


def test_a_preempted_request_swaps_its_kv_out_and_resumes_decoding_from_it():
    sched, cache, old, new = _swapping_scheduler(swap_tokens=64)
    kv = torch.randn(2, 3, 3)
    cache.data[:, new.slots(3, 2)] = kv
    batch = sched.schedule()  # old needs a third page: new is preempted, its KV kept
    assert [s.rid for s in batch.decodes] == ["old"] and sched.num_preemptions == 1
    assert new.pages == [] and new.num_computed == 3 and sched.swap is not None
    assert sched.swap.holds(new) and sched.swap.num_tokens == 3
    cache.data.zero_()  # whatever runs meanwhile writes over its old pages
    sched.remove(old)
    batch = sched.schedule()
    # Admitted back as a decode of its drawn token, over its own KV in new pages.
    assert [s.rid for s in batch.decodes] == ["new"] and not batch.prefills
    assert torch.equal(cache.data[:, new.slots(3, 2)], kv)
    assert sched.swap.num_tokens == 0 and not sched.swap.holds(new)
    assert sched.swap.num_swapped_out == 1


def test_a_request_the_swap_cannot_hold_is_recomputed_and_one_that_ends_is_dropped():
    sched, cache, old, new = _swapping_scheduler(swap_tokens=2)  # new has 3 tokens of KV
    sched.schedule()
    assert new.num_computed == 0 and sched.swap is not None and sched.swap.num_tokens == 0
    sched.remove(old)
    batch = sched.schedule()
    assert [(s.rid, n) for s, n in batch.prefills] == [("new", 4)]  # prompt and output again
    sched, cache, old, new = _swapping_scheduler(swap_tokens=64)
    sched.schedule()
    assert sched.swap is not None and sched.swap.num_tokens == 3
    sched.remove(new)  # aborted while it waited
    assert sched.swap.num_tokens == 0 and not sched.swap.holds(new)
    sched.remove(old)
    assert cache.allocator.num_free == 4


def test_scheduler_orders_by_priority_then_arrival():
    sched = Scheduler(
        CachingAllocator(PageAllocator(100), 4), page_size=4, max_running=1, token_budget=100
    )
    sched.add(_seq("first", 4, 0))
    assert [s.rid for s, _ in sched.schedule().prefills] == ["first"]
    for i, (rid, priority) in enumerate([("b", 5), ("c", 0), ("d", -3), ("e", 0), ("f", 5)]):
        sched.add(_seq(rid, 4, i + 1, priority))
    assert [s.rid for s in sched.waiting] == ["d", "c", "e", "b", "f"]
    # Decode side: pages are reserved in the same order.
    for i, (rid, priority) in enumerate([("x", 2), ("y", -1), ("z", 2)]):
        sched.expect_kv(_seq(rid, 4, 10 + i, priority))
    assert [s.rid for s in sched.reserve_kv()] == ["y", "x", "z"]


def test_scheduler_preempts_the_least_important_first():
    sched = Scheduler(
        CachingAllocator(PageAllocator(4), 2), page_size=2, max_running=8, token_budget=100
    )
    old, new = _seq("old", 4, 0, priority=5), _seq("new", 3, 1, priority=0)
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert [s.rid for s, _ in batch.prefills] == ["new", "old"]  # admitted by priority
    for s, n in batch.prefills:
        s.num_computed += n
        s.token_ids.append(1)
    # old needs a third page: old itself (priority 5) goes, though new is the newer one.
    batch = sched.schedule()
    assert [s.rid for s in batch.decodes] == ["new"]
    assert [s.rid for s in sched.waiting] == ["old"] and old.num_preemptions == 1
    # Requeued before later requests of its priority, after more important ones.
    sched.add(_seq("later", 2, 2, priority=5))
    sched.add(_seq("urgent", 2, 3, priority=-1))
    sched._preempt(new)
    assert [s.rid for s in sched.waiting] == ["urgent", "new", "old", "later"]


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy], [None]) == [1]
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert sample(logits, [top1], [torch.Generator().manual_seed(0)]) == [1]
    probs = filtered_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])[0]
    assert probs[0] == 0 and probs[3] == 0 and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
    # top_p keeps the smallest prefix reaching the mass: here only the best token.
    nucleus = filtered_probs(logits, [SamplingParams(temperature=1.0, top_p=0.5)])[0]
    assert nucleus.tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_match_torch_argmax(dtype):
    """The CPU fast path (numpy) against `torch.argmax`: ties take the first, a NaN wins."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=g).to(dtype)
    logits[1] = 0.5  # all tied
    logits[2, [3, 40]] = 99.0  # a tie of two maxima
    logits[3, 7] = float("nan")
    logits[4, 11] = float("inf")
    expected = torch.argmax(logits, dim=-1).tolist()
    assert greedy_tokens(logits) == expected
    assert expected[1:5] == [0, 3, 7, 11]
    assert greedy_tokens(torch.empty(0, 50, dtype=dtype)) == []


def test_sampling_follows_distribution_and_seed():
    logits = torch.log(torch.tensor([[0.7, 0.3]]))
    p = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(123)
    draws = [sample(logits, [p], [gen])[0] for _ in range(4000)]
    assert abs(draws.count(0) / 4000 - 0.7) < 0.03

    def seeded(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, [p], [g])[0] for _ in range(50)]

    assert seeded(7) == seeded(7) and seeded(7) != seeded(8)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    ckpt = make_checkpoint("v3_noqlora_nonorm", tmp_path_factory.mktemp("engine"))
    return Engine(ckpt.path, EngineConfig(page_size=4, kv_capacity_tokens=256), progress=False)


def _drain(engine: Engine) -> dict[str, tuple[list[int], FinishReason | None]]:
    out: dict[str, tuple[list[int], FinishReason | None]] = {}
    while engine.has_work:
        for d in engine.step():
            toks, _ = out.get(d.rid, ([], None))
            out[d.rid] = (toks + d.token_ids, d.finish_reason)
    return out


def test_finish_reasons_and_seeded_requests(engine):
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add(GenerateRequest("len", [5, 6, 7], greedy))
    first = _drain(engine)["len"]
    assert first[1] is FinishReason.LENGTH and len(first[0]) == 5
    stop_at = first[0][2]
    stop = SamplingParams(max_new_tokens=5, temperature=0.0, stop_token_ids=(stop_at,))
    engine.add(GenerateRequest("stop", [5, 6, 7], stop))
    toks, reason = _drain(engine)["stop"]
    assert reason is FinishReason.STOP and toks == first[0][: first[0].index(stop_at) + 1]

    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, seed=42, ignore_eos=True)
    engine.add(GenerateRequest("a", [5, 6, 7], seeded))
    engine.add(GenerateRequest("noise", [9, 9, 9, 9], SamplingParams(max_new_tokens=3)))
    a = _drain(engine)["a"][0]
    engine.add(GenerateRequest("b", [5, 6, 7], seeded))
    assert _drain(engine)["b"][0] == a  # same seed, different batch company
    assert engine.kv.allocator.num_free == engine.kv.num_pages


def test_higher_priority_requests_run_first(tiny_model_dir_engine):
    engine = tiny_model_dir_engine
    sp = dict(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add(GenerateRequest("a", [5, 6, 7], SamplingParams(**sp)))
    engine.step()  # a is running: the one slot is taken
    for rid, priority in [("b", 5), ("c", 0), ("d", -3)]:
        engine.add(GenerateRequest(rid, [5, 6, 7], SamplingParams(priority=priority, **sp)))
    order = []
    while engine.has_work:
        order += [d.rid for d in engine.step() if d.finish_reason is not None]
    assert order == ["a", "d", "c", "b"]


@pytest.fixture
def tiny_model_dir_engine(tmp_path_factory):
    ckpt = make_checkpoint("v3_noqlora_nonorm", tmp_path_factory.mktemp("prio"))
    config = EngineConfig(page_size=4, kv_capacity_tokens=256, max_running_requests=1)
    return Engine(ckpt.path, config, progress=False)


def test_abort_frees_pages(engine):
    engine.add(GenerateRequest("x", list(range(3, 40)), SamplingParams(max_new_tokens=50)))
    engine.step()
    assert engine.kv.allocator.num_free < engine.kv.num_pages
    delta = engine.abort("x")
    assert delta is not None and delta.finish_reason is FinishReason.ABORT
    assert engine.abort("x") is None  # idempotent
    assert engine.kv.allocator.num_free == engine.kv.num_pages and not engine.has_work


@pytest.mark.parametrize(
    ("ids", "sampling", "field"),
    [
        ([], SamplingParams(), "input_ids"),
        ([10**6], SamplingParams(), "input_ids"),
        ([-1], SamplingParams(), "input_ids"),
        ([3], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([3], SamplingParams(max_new_tokens=10**6), "max_new_tokens"),
        ([3] * 250, SamplingParams(max_new_tokens=10), "max_new_tokens"),  # > KV capacity
        ([3], SamplingParams(temperature=-1), "temperature"),
        ([3], SamplingParams(top_p=0.0), "top_p"),
        ([3], SamplingParams(top_p=1.5), "top_p"),
        ([3], SamplingParams(top_k=-2), "top_k"),
    ],
)
def test_validation_names_the_field(engine, ids, sampling, field):
    with pytest.raises(ValueError, match=field):
        engine.add(GenerateRequest("bad", ids, sampling))
    assert "bad" not in engine.requests


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"num_threads": 0}, "--num-threads"),
        ({"page_size": 0}, "--page-size"),
        ({"kv_capacity_tokens": 4, "page_size": 16}, "--kv-capacity-tokens"),
        ({"kv_memory_fraction": 0.99}, "--kv-memory-fraction"),
        ({"gpu_memory_share": 0.0}, "gpu_memory_share"),  # set by the launcher: no flag
    ],
)
def test_engine_config_refuses_bad_settings_naming_them(settings, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**settings)
