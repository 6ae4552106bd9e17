"""Prefill-only and decode-only engines, with the KV pages copied between them by hand, give
the same tokens as one engine doing both (the transfer itself is tested in test_transfer.py)."""

from __future__ import annotations

import pytest

from tests.checkpoints import make_checkpoint
from tests.test_parity import _prompts, _run_engine
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import FinishReason, GenerateRequest, SamplingParams

pytestmark = pytest.mark.timeout(180)


def _copy_pages(src: Engine, src_pages: list[int], dst: Engine, dst_pages: list[int]) -> None:
    ps = src.kv.page_size
    for s, d in zip(src_pages, dst_pages, strict=True):
        dst.kv.data[:, d * ps : (d + 1) * ps] = src.kv.data[:, s * ps : (s + 1) * ps]


@pytest.mark.parametrize("name", ["v3_qlora_groups", "v2_group_limited"])
def test_disaggregated_engines_match_one_engine(name, tmp_path_factory):
    ckpt = make_checkpoint(name, tmp_path_factory.mktemp(name))
    prompts = _prompts(256)
    _, expected, _ = _run_engine(ckpt.path, prompts)

    prefill = Engine(ckpt.path, EngineConfig(page_size=4, chunked_prefill_size=24), progress=False)
    # A small decode cache: reservations must queue until earlier requests free their pages.
    decode = Engine(ckpt.path, EngineConfig(page_size=4, kv_capacity_tokens=160), progress=False)
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        prefill.add(GenerateRequest(f"r{i}", p, greedy), mode="prefill")
        decode.add(GenerateRequest(f"r{i}", p, greedy), mode="decode")

    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    handed: dict[str, tuple[list[int], int]] = {}
    targets: dict[str, list[int]] = {}
    finished = 0
    while finished < len(prompts):
        assert not prefill.step()  # a prefill-only rank reports nothing itself
        for seq in prefill.take_handoffs():
            handed[seq.rid] = (seq.pages, seq.token_ids[-1])
        for d in decode.step():
            tokens[d.rid] += d.token_ids
            finished += d.finish_reason is not None
        for seq in decode.take_reserved():
            targets[seq.rid] = seq.pages
        for rid in [r for r in handed if r in targets]:
            (src_pages, first), dst_pages = handed.pop(rid), targets.pop(rid)
            _copy_pages(prefill, src_pages, decode, dst_pages)
            prefill.release(rid)
            delta = decode.admit_received(rid, first)
            assert delta is not None
            tokens[rid] += delta.token_ids
    assert tokens == expected
    for engine in (prefill, decode):
        assert engine.kv.allocator.num_free == engine.kv.num_pages and not engine.requests


def test_the_decode_rank_reuses_its_cached_pages_and_receives_only_the_rest(tmp_path_factory):
    """Multi-turn: the second prompt is the first one, its output and a new message. The
    decode rank holds those pages (it received the prompt and computed the output), so only
    the pages after them are copied from the prefill rank: the tokens still equal one
    engine's that computed everything."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("reuse"))
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    config = EngineConfig(page_size=4, kv_capacity_tokens=512)
    single = Engine(ckpt.path, config, progress=False)
    prefill = Engine(ckpt.path, config, progress=False)
    decode = Engine(ckpt.path, config, progress=False)

    def run_single(rid: str, prompt: list[int]) -> list[int]:
        single.add(GenerateRequest(rid, prompt, greedy))
        out: list[int] = []
        while single.has_work:
            out += [t for d in single.step() for t in d.token_ids]
        return out

    def run_pair(rid: str, prompt: list[int]) -> tuple[list[int], int]:
        prefill.add(GenerateRequest(rid, prompt, greedy), mode="prefill")
        decode.add(GenerateRequest(rid, prompt, greedy), mode="decode")
        while not (handed := prefill.take_handoffs()):
            prefill.step()
        decode.step()  # reserves the pages
        (seq,) = decode.take_reserved()
        reused = seq.num_reused_pages
        src = handed[0]
        _copy_pages(prefill, src.pages[reused:], decode, seq.pages[reused:])
        prefill.release(rid)
        delta = decode.admit_received(rid, src.token_ids[-1])
        assert delta is not None
        out = list(delta.token_ids)
        while decode.has_work:
            out += [t for d in decode.step() for t in d.token_ids]
        return out, reused

    first = list(range(3, 40))  # 37 tokens
    out1, reused1 = run_pair("t1", first)
    assert reused1 == 0 and out1 == run_single("s1", first)
    second = first + out1 + [7, 8, 9, 10, 11]
    out2, reused2 = run_pair("t2", second)
    # 37 prompt + 11 computed output tokens = 12 full pages of 4 held by the decode rank.
    assert reused2 == 12 and decode.stats().num_transfer_skipped_tokens == 48
    assert out2 == run_single("s2", second)
    assert prefill.stats().num_prefix_hit_tokens == 36  # the prefill rank's own hit: 9 pages
    for engine in (prefill, decode):
        assert engine.kv.allocator.num_free == engine.kv.num_pages and not engine.requests


def test_failed_transfer_and_abort_free_pages(tmp_path_factory):
    ckpt = make_checkpoint("v3_noqlora_nonorm", tmp_path_factory.mktemp("fail"))
    decode = Engine(ckpt.path, EngineConfig(page_size=4, kv_capacity_tokens=64), progress=False)
    sp = SamplingParams(max_new_tokens=4, temperature=0.0)
    decode.add(GenerateRequest("a", list(range(3, 20)), sp), mode="decode")
    decode.add(GenerateRequest("b", list(range(3, 20)), sp), mode="decode")
    decode.step()
    assert {s.rid for s in decode.take_reserved()} == {"a", "b"}
    delta = decode.fail("a", "transfer timed out")
    assert delta is not None and delta.finish_reason is FinishReason.ERROR
    assert decode.admit_received("a", 5) is None  # too late: it is gone
    decode.abort("b")
    assert decode.kv.allocator.num_free == decode.kv.num_pages and not decode.has_work


def _decode_until(engine: Engine, rid: str, num_tokens: int, out: list[int]) -> None:
    """Step `engine` until `rid` has `num_tokens` output tokens (others run along)."""
    while len(out) < num_tokens:
        for d in engine.step():
            if d.rid == rid:
                out += d.token_ids


@pytest.mark.parametrize("seeded", [False, True])
def test_a_request_migrated_between_decode_engines_goes_on_with_the_same_tokens(
    seeded, tmp_path_factory
):
    """A request decoding on one decode engine moves to another with its KV — at every
    offset within a page, the last page full or not, the receiver holding part of the
    prompt in its prefix cache — and goes on there: the same tokens as one engine that did
    it all (greedy, or seeded: its draws go on where they stood), nothing computed again,
    every page free at the end."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("migrate"))
    sampling = (
        SamplingParams(max_new_tokens=20, temperature=0.8, seed=11, ignore_eos=True)
        if seeded
        else SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    )
    config = EngineConfig(page_size=4, kv_capacity_tokens=512)
    single, prefill, old, new = (Engine(ckpt.path, config, progress=False) for _ in range(4))
    prompt = list(range(5, 22))  # 17 tokens
    single.add(GenerateRequest("s", prompt, sampling))
    want: list[int] = []
    while single.has_work:
        want += [t for d in single.step() for t in d.token_ids]
    # The new decode engine holds the prompt's first pages (an earlier turn went there).
    new.add(GenerateRequest("warm", prompt, SamplingParams(max_new_tokens=1, temperature=0.0)))
    while new.has_work:
        new.step()
    for moved_at in range(1, 9):  # output tokens when it moves: 8 offsets over 2 pages
        rid = f"r{moved_at}"
        prefill.add(GenerateRequest(rid, prompt, sampling), mode="prefill")
        old.add(GenerateRequest(rid, prompt, sampling), mode="decode")
        while not (handed := prefill.take_handoffs()):
            prefill.step()
        old.reserve_kv()
        (seq,) = old.take_reserved()
        _copy_pages(prefill, handed[0].pages, old, seq.pages)
        prefill.release(rid)
        first = old.admit_received(rid, handed[0].token_ids[-1])
        assert first is not None
        out = list(first.token_ids)
        _decode_until(old, rid, moved_at, out)
        assert old.migrate_out("nope", "x") is None  # not there: nothing happens

        moved = old.migrate_out(rid, f"{rid}#2")
        assert moved is not None
        src, last = moved
        assert last.finish_reason is FinishReason.ERROR and last.resumable
        assert last.moved_to == f"{rid}#2" and last.token_ids == []
        assert not old.step()  # it left the batch: the engine has nothing to run
        new.add(
            GenerateRequest(f"{rid}#2", prompt, sampling, output_ids=out, migrated=True),
            mode="decode",
        )
        new.reserve_kv()
        (dst,) = new.take_reserved()
        reused = dst.num_reused_pages
        sent = (len(prompt) + len(out) - 1 + 3) // 4
        # The first time: the prompt's 4 full pages; later, those of earlier moves' tokens
        # too. The page with the last token sent always comes from the sender.
        assert reused == 4 if moved_at == 1 else 4 <= reused < sent
        _copy_pages(old, src.pages[reused:sent], new, dst.pages[reused:sent])
        old.release(f"{rid}#2")
        arrived = new.admit_received(f"{rid}#2", src.token_ids[-1])
        assert arrived is not None and arrived.kv_arrived and arrived.token_ids == []  # no token
        made_before = new.num_generated_tokens
        rest: list[int] = []
        _decode_until(new, f"{rid}#2", 20 - moved_at, rest)
        assert out + rest == want, moved_at
        assert new.num_generated_tokens - made_before == 20 - moved_at  # none made twice
    for engine in (prefill, old, new):
        assert not engine.requests
        assert engine.kv.allocator.num_free == engine.kv.num_pages


def test_only_a_decoding_request_migrates(tmp_path_factory):
    """A request whose KV is still arriving, or one queued, stays where it is; a migrated
    request needs output and a decode engine; KV of other tokens fails it."""
    ckpt = make_checkpoint("v3_noqlora_nonorm", tmp_path_factory.mktemp("nomigrate"))
    config = EngineConfig(page_size=4, kv_capacity_tokens=64)
    decode = Engine(ckpt.path, config, progress=False)
    sp = SamplingParams(max_new_tokens=4, temperature=0.0)
    decode.add(GenerateRequest("a", list(range(3, 20)), sp), mode="decode")
    assert decode.migrate_out("a", "a#2") is None  # awaiting pages
    decode.reserve_kv()
    assert decode.migrate_out("a", "a#2") is None  # receiving
    with pytest.raises(ValueError, match="migrated: a request moves"):
        decode.add(GenerateRequest("b", [3, 4], sp, migrated=True), mode="decode")
    with pytest.raises(ValueError, match="migrated: a request moving with its KV"):
        decode.add(GenerateRequest("b", [3, 4], sp, output_ids=[5], migrated=True))
    decode.add(GenerateRequest("c", [3, 4, 5], sp, output_ids=[6], migrated=True), mode="decode")
    decode.reserve_kv()
    failed = decode.admit_received("c", 7)  # not its last token
    assert failed is not None and failed.finish_reason is FinishReason.ERROR
    assert "other tokens" in (failed.error or "")
    decode.abort("a")
    assert decode.kv.allocator.num_free == decode.kv.num_pages and not decode.requests


def test_a_migrated_request_without_room_is_refused_at_once_not_queued(tmp_path_factory):
    """A decode engine with no free pages for a request moving in with its KV fails it at
    once (its sender would otherwise time out waiting), and the requests queued behind it
    still get pages when there are some."""
    ckpt = make_checkpoint("v3_noqlora_nonorm", tmp_path_factory.mktemp("unplaced"))
    decode = Engine(ckpt.path, EngineConfig(page_size=4, kv_capacity_tokens=48), progress=False)
    sp = SamplingParams(max_new_tokens=4, temperature=0.0)
    decode.add(GenerateRequest("big", list(range(3, 40)), sp), mode="decode")  # 10 of 12 pages
    decode.add(GenerateRequest("moving", list(range(3, 20)), sp, output_ids=[5],
                               migrated=True), mode="decode")  # fmt: skip
    decode.add(GenerateRequest("small", [3, 4, 5], sp), mode="decode")  # 1 page: fits
    decode.reserve_kv()
    assert {s.rid for s in decode.take_reserved()} == {"big", "small"}
    (refused,) = decode.take_unplaced()
    assert refused.rid == "moving" and refused.finish_reason is FinishReason.ERROR
    assert "no free KV pages" in (refused.error or "")
    assert "moving" not in decode.requests and not decode.take_unplaced()
    decode.abort("big")
    decode.abort("small")
    assert decode.kv.allocator.num_free == decode.kv.num_pages
