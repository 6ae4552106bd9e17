"""Prefix caching: the page bookkeeping against a plain model of it under random churn, and
engines that share prefixes giving the tokens of engines that do not (and of transformers)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tests.checkpoints import make_checkpoint
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.kv_cache import KVCache, PageAllocator
from workers.engine.messages import GenerateRequest, SamplingParams
from workers.engine.prefix_cache import CachingAllocator
from workers.engine.sequence import Sequence

pytestmark = pytest.mark.timeout(300)

PS = 4


def test_pages_under_churn_match_a_plain_model():
    """Requests come and go with prompts over a tiny alphabet (so prefixes repeat), publish
    their full pages, and match earlier ones. Checked after every operation: a page is held,
    idle or free, never two of them; a matched page holds exactly the tokens asked for; held
    pages are never reclaimed."""
    rng = random.Random(0)
    num_pages = 40
    pages = CachingAllocator(PageAllocator(num_pages), PS)
    content: dict[int, tuple[int, ...]] = {}  # published page -> the whole prefix it ends
    live: dict[int, tuple[list[int], list[int], int, bytes]] = {}  # id -> tokens, pages, ...
    held: dict[int, int] = {}
    hits = 0
    for step in range(4000):
        if live and (rng.random() < 0.45 or pages.num_free < 8):
            rid = rng.choice(list(live))
            tokens, owned, num_published, _ = live.pop(rid)
            pages.free(owned)
            for p in owned:
                held[p] -= 1
        else:
            tokens = [rng.randrange(2) for _ in range(rng.randint(1, 6 * PS))]
            prefix = pages.match(tokens, len(tokens) - 1)
            for i, p in enumerate(prefix.pages):
                assert content[p] == tuple(tokens[: (i + 1) * PS]), f"step {step}: wrong page"
            hits += len(prefix.pages)
            need = -(-len(tokens) // PS) - len(prefix.pages)
            if not pages.can_allocate(need):
                pages.free(prefix.pages)
                continue
            before = {p for p, n in held.items() if n}
            fresh = pages.allocate(need)
            assert not before & set(fresh), "a held page was handed out again"
            for p in fresh:  # reclaimed if it was published: its old content is gone
                assert p not in pages._key_of
                content.pop(p, None)
            owned = prefix.pages + fresh
            for p in owned:
                held[p] = held.get(p, 0) + 1
            # Computed: everything (a finished prefill); publish the full pages.
            num_published, last = pages.publish(
                tokens, owned, len(prefix.pages), prefix.last_key, len(tokens)
            )
            for i in range(len(prefix.pages), num_published):
                if owned[i] in pages._key_of and owned[i] not in content:
                    content[owned[i]] = tuple(tokens[: (i + 1) * PS])  # newly published
            live[step] = (tokens, owned, num_published, last)
        # A reclaimed page is no longer published: forget its content.
        for p in [p for p in content if p not in pages._key_of]:
            del content[p]
        num_held = sum(1 for n in held.values() if n)
        assert num_held + pages.num_free == num_pages
        assert pages.num_idle == sum(1 for p in content if not held.get(p))
        assert pages.allocator.num_free + pages.num_idle == pages.num_free
    assert hits > 200  # the churn really shared pages
    for _, owned, _, _ in live.values():
        pages.free(owned)
    assert pages.num_free == num_pages and pages.allocator.num_free + pages.num_idle == num_pages
    with pytest.raises(RuntimeError, match="freed twice"):
        pages.free([0])


def test_reclaiming_takes_a_prefix_from_its_end():
    pages = CachingAllocator(PageAllocator(3), PS)
    tokens = list(range(3 * PS + 1))
    owned = pages.allocate(3)
    pages.publish(tokens, owned, 0, b"", 3 * PS)
    pages.free(owned)
    assert pages.num_idle == 3 and pages.allocator.num_free == 0
    (taken,) = pages.allocate(1)  # nothing free: one idle page is reclaimed
    assert taken == owned[2]
    assert pages.match(tokens, len(tokens) - 1).pages == owned[:2]  # the rest still matches


def _run(engine: Engine, prompts: list[list[int]], num_new: int, waves: int = 1):
    """Greedy outputs of every prompt; `waves` > 1 sends the prompts again after each wave
    has finished, so that later waves can find the earlier ones' pages."""
    outs: list[list[list[int]]] = []
    greedy = SamplingParams(max_new_tokens=num_new, temperature=0.0, ignore_eos=True)
    for w in range(waves):
        tokens: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            engine.add(GenerateRequest(f"w{w}-{i}", p, greedy))
            tokens[f"w{w}-{i}"] = []
        while engine.has_work:
            for d in engine.step():
                tokens[d.rid] += d.token_ids
        outs.append([tokens[f"w{w}-{i}"] for i in range(len(prompts))])
        assert engine.kv.allocator.num_free == engine.kv.num_pages  # held by nobody
    return outs


def test_shared_prefixes_give_the_tokens_of_transformers(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("prefix"))
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 256, (37,), generator=g).tolist()
    prompts = [system + torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 6, 19)]
    prompts.append(list(system))  # the whole prompt cached but its last token
    cfg = EngineConfig(page_size=PS, chunked_prefill_size=16)
    cached = Engine(ckpt.path, cfg, progress=False)
    uncached = EngineConfig(page_size=PS, chunked_prefill_size=16, enable_prefix_caching=False)
    plain = Engine(ckpt.path, uncached, progress=False)
    first, second, third = _run(cached, prompts, 12, waves=3)
    (ref,) = _run(plain, prompts, 12)
    assert first == second == third == ref
    alloc = cached.kv.allocator
    # Waves 2 and 3 found every full page of every prompt but the last token's.
    full = sum((len(p) - 1) // PS * PS for p in prompts)
    assert alloc.num_hit_tokens >= 2 * full and alloc.num_idle > 0
    assert plain.kv.allocator.num_hit_tokens == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.hf_path, dtype=torch.float32)
    for p, ours in zip(prompts, third, strict=True):
        with torch.no_grad():
            want = hf.eval().generate(
                torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )[0, len(p) :].tolist()  # fmt: skip
        assert ours == want


def test_generated_tokens_are_cached_too_and_a_small_cache_reclaims_idle_pages(
    tmp_path_factory,
):
    """A chat's next turn starts with the previous answer: its pages are found. With too few
    pages for everything, idle cached pages are reclaimed (oldest first) and the tokens stay
    those of an engine without caching."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("prefix2"))
    g = torch.Generator().manual_seed(4)
    turn1 = torch.randint(3, 256, (10,), generator=g).tolist()
    cached = Engine(ckpt.path, EngineConfig(page_size=PS), progress=False)
    ((answer,),) = _run(cached, [turn1], 16)
    before = cached.kv.allocator.num_hit_tokens
    turn2 = turn1 + answer + [7, 8, 9]
    _run(cached, [turn2], 4)
    # The prompt and all but the answer's last token (never computed: sampled last) hit.
    assert cached.kv.allocator.num_hit_tokens - before == (len(turn1) + 15) // PS * PS

    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 30, 17, 23, 5)]
    tight = EngineConfig(page_size=PS, kv_capacity_tokens=48, chunked_prefill_size=16)
    small = Engine(ckpt.path, tight, progress=False)
    uncached = dataclasses.replace(tight, enable_prefix_caching=False)
    plain = Engine(ckpt.path, uncached, progress=False)
    outs = _run(small, prompts, 8, waves=2)
    (ref,) = _run(plain, prompts, 8)
    assert outs[0] == outs[1] == ref
    assert small.kv.allocator.num_idle <= small.kv.num_pages


def test_host_tier_keeps_reclaimed_pages_and_gives_them_back():
    """Pages the device reclaims go to the host tier with their KV; a later match follows the
    prefix on into it, copying each page into a new device page, bit for bit; a full tier keeps
    the most recently let go."""
    cache = KVCache(2, 6, PS, 3, torch.float32, torch.device("cpu"), True, host_pages=8)
    pages = cache.allocator
    assert pages.host is not None
    tokens = list(range(100, 113))  # 3 full pages and one token
    owned = pages.allocate(4)
    kv = torch.randn(2, 13, 3)
    slots = torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in owned])[:13]
    cache.data[:, slots] = kv
    assert pages.publish(tokens, owned, 0, b"", 13)[0] == 3
    pages.free(owned)
    everything = pages.allocate(6)  # the 3 idle pages are reclaimed: to the host
    assert pages.host.num_pages == 3 and pages.num_idle == 0
    cache.data.zero_()
    pages.free(everything)
    found = pages.match(tokens, 12)
    assert len(found.pages) == 3 and pages.num_host_hit_tokens == 12
    found_slots = torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in found.pages])
    assert torch.equal(cache.data[:, found_slots], kv[:, :12])
    pages.free(found.pages)
    again = pages.match(tokens, 12)  # published on the device again: no copy
    assert again.pages == found.pages and pages.host.num_loaded == 3
    pages.free(again.pages)
    # A prefix half on the device, half in the host tier, is found whole.
    held = pages.allocate(4)  # reclaims what it must (deepest pages first)
    assert 0 < pages.num_idle < 3
    pages.free(held[:2])  # room for the pages to come back into
    held = held[2:]
    deep = pages.match(tokens, 12)
    assert len(deep.pages) == 3
    deep_slots = torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in deep.pages])
    assert torch.equal(cache.data[:, deep_slots], kv[:, :12])
    pages.free(deep.pages + held)
    # A tier of 2 pages keeps the 2 let go last: the first two (the deepest goes first).
    small = KVCache(2, 4, PS, 3, torch.float32, torch.device("cpu"), True, host_pages=2)
    owned = small.allocator.allocate(4)
    small.allocator.publish(tokens, owned, 0, b"", 13)
    small.allocator.free(owned)
    small.allocator.free(small.allocator.allocate(4))
    assert len(small.allocator.match(tokens, 12).pages) == 2
    assert small.allocator.flush() == 2 and small.allocator.host is not None
    assert small.allocator.host.num_pages == 0


def test_a_host_tier_outlives_the_device_cache_with_the_same_tokens(tmp_path_factory):
    """Prompts sharing long prefixes, more than the device's KV holds: the second wave finds
    what the device let go in the host tier; tokens are those of an engine without caching."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("hostcache"))
    g = torch.Generator().manual_seed(5)
    systems = [torch.randint(3, 256, (33,), generator=g).tolist() for _ in range(4)]
    prompts = [
        s + torch.randint(3, 256, (n,), generator=g).tolist() for s in systems for n in (2, 7)
    ]
    tight = EngineConfig(page_size=PS, kv_capacity_tokens=96, chunked_prefill_size=32)
    hosted = Engine(ckpt.path, dataclasses.replace(tight, prefix_cache_host_space=0.01),
                    progress=False)  # fmt: skip
    device_only = Engine(ckpt.path, tight, progress=False)
    plain = Engine(ckpt.path, dataclasses.replace(tight, enable_prefix_caching=False),
                   progress=False)  # fmt: skip
    (ref,) = _run(plain, prompts, 6)
    assert _run(hosted, prompts, 6, waves=2) == [ref, ref]
    assert _run(device_only, prompts, 6, waves=2) == [ref, ref]
    host_hits = hosted.kv.allocator.num_host_hit_tokens
    assert host_hits > 0 and hosted.stats().num_prefix_host_hit_tokens == host_hits
    assert hosted.stats().num_host_cached_pages > 0
    assert hosted.kv.allocator.num_hit_tokens > device_only.kv.allocator.num_hit_tokens
    assert device_only.kv.allocator.host is None


def test_a_request_waiting_for_pages_is_counted_in_the_hit_statistics_once():
    """A request at the head of the queue that does not fit is looked up at every step; only
    the lookup that admits it counts (an audit saw 4.57M tokens 'queried' for ~8k sent)."""
    from workers.engine.scheduler import Scheduler

    pages = CachingAllocator(PageAllocator(4), PS)
    sched = Scheduler(pages, page_size=PS, max_running=8, token_budget=100)
    first = Sequence("first", list(range(11)), SamplingParams(), 0)
    sched.add(first)
    sched.schedule()  # 3 of the 4 pages
    first.num_computed = 11
    first.token_ids.append(5)  # decoding now, within its pages
    waiting = Sequence("waiting", list(range(10)), SamplingParams(), 1)  # 3 pages: no room
    sched.add(waiting)
    for _ in range(5):
        assert not sched.schedule().prefills
    assert pages.num_queried_tokens == 11
    sched.remove(first)
    assert [s.rid for s, _ in sched.schedule().prefills] == ["waiting"]
    assert pages.num_queried_tokens == 21


@pytest.mark.parametrize("host_pages", [1, 2])
def test_a_page_loaded_from_a_full_host_tier_is_not_evicted_by_its_own_allocation(host_pages):
    """Loading a page back allocates a device page, which may reclaim an idle page into the
    full host tier and evict the tier's oldest entry: the very page being loaded (an audit
    crashed a rank so: KeyError). It is taken out first, and comes back whole; a tier of one
    page, its slot reserved for the page being loaded, lets the reclaimed page go."""
    cache = KVCache(2, 2, PS, 3, torch.float32, torch.device("cpu"), True, host_pages=host_pages)
    pages = cache.allocator

    def fill(tokens: list[int]) -> list[int]:
        owned = pages.allocate(len(tokens) // PS)
        cache.data[:, owned[0] * PS : (owned[-1] + 1) * PS] = float(tokens[0])
        pages.publish(tokens, owned, 0, b"", len(tokens))
        pages.free(owned)
        return owned

    fill([1, 2, 3, 4])
    fill([5, 6, 7, 8])  # the device: two idle pages
    fill([9, 10, 11, 12, 13, 14, 15, 16])  # both to the host tier, oldest first: [1..4]
    assert pages.host is not None and pages.allocator.num_free == 0
    assert pages.host.num_pages == host_pages
    first = [1, 2, 3, 4] if host_pages == 2 else [5, 6, 7, 8]  # the tier's oldest
    found = pages.match([*first, 99], 5)
    assert len(found.pages) == 1 and found.num_loaded == 1
    page = found.pages[0]
    want = torch.full((2, PS, 3), float(first[0]))
    assert torch.equal(cache.data[:, page * PS : (page + 1) * PS], want)
    assert pages.host.num_pages == host_pages  # still bounded
    pages.free(found.pages)
    assert pages.num_free == 2
