"""Speculative decoding by n-gram lookup: the index against a brute-force search, and engines
that guess (from n-grams, from an oracle that knows the answer, from one that is always wrong)
giving exactly the tokens of an engine that does not, stop rules and all."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import FinishReason, GenerateRequest, SamplingParams, TokenLogprob
from workers.engine.model_inputs import decode_rows, row_samplers
from workers.engine.sequence import Sequence
from workers.engine.speculative import NgramIndex, SharedNgrams, can_speculate, num_accepted

pytestmark = pytest.mark.timeout(300)


def _brute_force(tokens: list[int], limit: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        tail = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):  # the most recent earlier occurrence
            if tokens[end + 1 - n : end + 1] == tail:
                return tokens[end + 1 : end + 1 + limit]
    return []


def test_ngram_index_proposes_what_a_brute_force_search_finds():
    rng = random.Random(0)
    for trial in range(300):
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        index = NgramIndex(min_n, max_n, max_guess=6)
        tokens = [rng.randrange(4) for _ in range(rng.randint(0, 5))]
        for _ in range(rng.randint(1, 30)):  # tokens come a few at a time, as steps add them
            tokens += [rng.randrange(4) for _ in range(rng.randint(1, 3))]
            limit = rng.randint(1, 6)
            want = _brute_force(tokens, limit, min_n, max_n)
            assert index.propose(tokens, limit) == want, (trial, tokens, min_n, max_n)
    index = NgramIndex(1, 2, max_guess=3)
    assert index.propose([1, 2, 3, 1, 2], 3) == [3, 1, 2]
    assert index.propose([7, 8], 3) == []  # the tokens were cut back: indexed afresh
    # The guesses' length follows how they fared: one more than were kept, up to max_guess.
    tokens = [1, 2, 3, 4, 5, 1, 2]
    index = NgramIndex(1, 2, max_guess=3)
    index.update(num_guessed=3, num_kept=0)
    assert index.propose(tokens, 3) == [3]
    index.update(num_guessed=1, num_kept=1)
    assert index.propose(tokens, 3) == [3, 4]
    index.update(num_guessed=2, num_kept=2)
    index.update(num_guessed=3, num_kept=3)
    assert index.propose(tokens, 5) == [3, 4, 5]


def test_a_long_prompt_indexed_in_bulk_proposes_what_a_brute_force_search_finds():
    """Past 64 new tokens (a prompt) the index is built with numpy, keyed as one token at a
    time keys it: the same guesses as a brute-force search, before and after tokens follow."""
    rng = random.Random(5)
    for trial in range(40):
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 6)
        vocab = rng.choice([3, 8, 50, 129280])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(65, 400))]
        index = NgramIndex(min_n, max_n, max_guess=8)
        for _ in range(6):
            want = _brute_force(tokens, 8, min_n, max_n)
            assert index.propose(tokens, 8) == want, (trial, min_n, max_n, vocab)
            tokens += [rng.randrange(vocab) for _ in range(rng.choice([1, 2, 70]))]


def test_the_shared_index_guesses_what_followed_in_earlier_requests():
    shared = SharedNgrams(2, 3, capacity=64)
    shared.add([1, 2, 3, 4, 5, 6])
    shared.add([9, 2, 3, 7, 8])
    assert shared.find([50, 2, 3], 4) == [7, 8]  # the latest occurrence; not past its end
    assert shared.find([1, 2, 3], 2) == [4, 5]  # the longest n-gram first (1 2 3)
    assert shared.find([5, 6], 4) == []  # nothing followed there (the next request did)
    assert shared.find([7, 7], 4) == []
    for i in range(40):  # past the capacity: the newer half stays, bounded
        shared.add([100 + i, 200 + i, 300 + i])
        assert len(shared.corpus) <= 64
    assert shared.find([139, 239], 3) == [339] and shared.find([1, 2, 3], 2) == []
    tiny = SharedNgrams(2, 3, capacity=1)  # (a half of 1 is no tokens: one is kept)
    for _ in range(50):
        tiny.add(list(range(10)))
        assert len(tiny.corpus) <= 1


def test_num_accepted_counts_the_guesses_each_choice_confirms():
    assert num_accepted([5, 6, 7], [5, 6, 7, 9]) == 3
    assert num_accepted([5, 6, 7], [5, 4, 7, 9]) == 1
    assert num_accepted([5], [1, 5]) == 0
    assert num_accepted([], [3]) == 0


def test_decode_rows_read_the_guesses_at_the_following_positions():
    seq = Sequence("s", list(range(10, 16)), SamplingParams(), 0)
    seq.add_pages([7, 3, 8])
    seq.num_computed = 5  # token 15 (position 5) is pending
    seq.draft = [40, 41, 42]
    other = Sequence("o", [1, 2, 3], SamplingParams(), 1)
    other.add_pages([9])
    other.num_computed = 2
    rows = decode_rows([seq, other], 4)
    assert rows.input_ids == [15, 40, 41, 42, 3]
    assert rows.positions == [5, 6, 7, 8, 2]
    assert rows.out_slots == [3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 8 * 4 + 0, 9 * 4 + 2]
    assert rows.block_rows == [[7, 3]] * 3 + [[7, 3, 8], [9]]
    assert [s.rid for s in row_samplers([seq, other])] == ["s"] * 4 + ["o"]


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    return make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("spec")).path


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    base = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 9, 17, 40)]
    return base + [p * 3 for p in base]  # repeats: the index finds guesses in the prompt


def _run(
    engine: Engine,
    reqs: dict[str, tuple[list[int], SamplingParams]],
    logprobs: dict[str, list[TokenLogprob]] | None = None,
):
    for rid, (prompt, sp) in reqs.items():
        engine.add(GenerateRequest(rid, prompt, sp))
    out: dict[str, list[int]] = {rid: [] for rid in reqs}
    finish: dict[str, FinishReason | None] = {}
    steps = 0
    while engine.has_work:
        for d in engine.step():
            out[d.rid] += d.token_ids
            if logprobs is not None and d.logprobs is not None:
                assert len(d.logprobs) == len(d.token_ids)
                logprobs.setdefault(d.rid, []).extend(d.logprobs)
            if d.finish_reason is not None:
                finish[d.rid] = d.finish_reason
        steps += 1
    assert engine.kv.allocator.num_free == engine.kv.num_pages  # every page back
    return out, finish, steps


def _engine(path: Path, **kw) -> Engine:
    cfg = {"page_size": 4, "chunked_prefill_size": 64, **kw}
    return Engine(path, EngineConfig(**cfg), progress=False)


GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)


def _record_guessers(engine: Engine) -> set[str]:
    """The requests `engine` gives guesses to, filled in as it runs."""
    guessers: set[str] = set()
    guess = engine.scheduler.speculate
    assert guess is not None

    def recording(seq: Sequence, limit: int) -> list[int]:
        draft = guess(seq, limit)
        if draft:
            guessers.add(seq.rid)
        return draft

    engine.scheduler.speculate = recording
    return guessers


def _sampled(**kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 40, "ignore_eos": True, **kw})


# Greedy and seeded sampled requests of every kind guess: each row draws with the draw plain
# decoding would make there, and its penalties and minimum length count the guesses before
# it, so they give plain decoding's tokens (and logprobs) exactly.
GUESSING = {
    "temp": _sampled(temperature=0.7, seed=1),
    "top-p-k": _sampled(temperature=1.1, top_p=0.8, top_k=20, seed=2),
    "min-p": _sampled(temperature=0.5, min_p=0.1, seed=3),
    "bias": _sampled(temperature=0.6, logit_bias=((7, 2.0), (9, -1.0)), seed=4),
    "scored": _sampled(temperature=0.0, logprobs=True, top_logprobs=3),
    "scored-sampled": _sampled(temperature=0.8, logprobs=True, top_logprobs=2, seed=5),
    # Token 7 made all but certain and a stop token: banned for 23 tokens, then the end.
    "min-length": _sampled(
        temperature=0.0, min_new_tokens=23, stop_token_ids=(7,), logit_bias=((7, 50.0),)
    ),  # fmt: skip
    "penalized": _sampled(temperature=0.0, repetition_penalty=1.3),
    "penalized-sampled": _sampled(
        temperature=0.9, frequency_penalty=0.5, presence_penalty=0.3, seed=6
    ),  # fmt: skip
}


def _mixed_requests() -> dict[str, tuple[list[int], SamplingParams]]:
    prompts = _prompts()
    reqs = {f"g{i}": (p, GREEDY) for i, p in enumerate(prompts)}
    for i, (name, sp) in enumerate(GUESSING.items()):
        reqs[name] = (prompts[4 + i % 4], sp)
    return reqs


def test_ngram_guesses_give_the_tokens_of_plain_decoding(ckpt_path):
    """Greedy and seeded sampled requests (temperature, top-p/k, min-p, logit bias, logprobs,
    a minimum length, penalties) guess and are verified in the same batches, giving plain
    decoding's tokens and logprobs."""
    reqs = _mixed_requests()
    plain_lp: dict[str, list[TokenLogprob]] = {}
    plain, _, plain_steps = _run(_engine(ckpt_path), reqs, plain_lp)
    guessing = _engine(ckpt_path, speculative_ngram=4)
    guessers = _record_guessers(guessing)
    spec_lp: dict[str, list[TokenLogprob]] = {}
    spec, _, spec_steps = _run(guessing, reqs, spec_lp)
    assert spec == plain
    assert len(plain["min-length"]) == 24 and plain["min-length"][-1] == 7
    assert guessers >= {rid for rid in reqs if rid.startswith("g")} | {"scored", "top-p-k"}
    assert set(spec_lp) == set(plain_lp) == {"scored", "scored-sampled"}
    for rid, lps in plain_lp.items():
        for a, b in zip(spec_lp[rid], lps, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    stats = guessing.stats()
    assert 0 < stats.num_spec_accepted_tokens < stats.num_spec_draft_tokens, stats
    assert spec_steps <= plain_steps


def test_constrained_requests_guess_what_their_constraint_forces(tiny_model_dir):
    """JSON-schema, JSON-object, regex and EBNF requests, greedy and seeded sampled, guess the
    text their constraint forces (and n-grams), each row masked by what the constraint allows
    after the guesses before it: the tokens of an engine that does not guess, stop and all."""
    import json

    from tests.test_structured_output import ANSWER, SCHEMA
    from workers.engine.messages import OutputConstraint

    schema = OutputConstraint("json_schema", json.dumps(SCHEMA))
    items = {"type": "array", "items": SCHEMA, "minItems": 2, "maxItems": 2}
    listed = OutputConstraint("json_schema", json.dumps(items))
    regex = OutputConstraint("regex", ANSWER)
    ebnf = OutputConstraint(
        "ebnf", 'root ::= "id-" [0-9] [0-9] ("!" | "?") " done, id-" [0-9] [0-9] "."'
    )
    reqs: dict[str, tuple[list[int], SamplingParams]] = {
        f"schema-{i}": ([10 + i, 20, 30], _sampled(temperature=0.9, seed=i, constraint=schema))
        for i in range(3)
    }
    reqs["schema"] = ([10, 20, 30], _sampled(temperature=0.0, constraint=schema))
    reqs["list"] = ([11, 21], _sampled(temperature=0.7, seed=9, constraint=listed))
    reqs["object"] = (
        [44, 45],
        _sampled(temperature=0.0, constraint=OutputConstraint("json_object")),
    )
    reqs["regex"] = ([7, 8, 9], _sampled(temperature=0.0, constraint=regex))
    reqs["ebnf"] = ([5, 6], _sampled(temperature=1.0, seed=4, constraint=ebnf))
    for rid, (prompt, sp) in reqs.items():  # long enough to end by the constraint (or not)
        reqs[rid] = (prompt, dataclasses.replace(sp, max_new_tokens=250, ignore_eos=False))
    cfg = {"page_size": 4, "kv_capacity_tokens": 4096}
    plain_engine = Engine(tiny_model_dir, EngineConfig(**cfg), progress=False)
    plain, plain_finish, plain_steps = _run(plain_engine, reqs)
    guessing = Engine(tiny_model_dir, EngineConfig(**cfg, speculative_ngram=6), progress=False)
    guessers = _record_guessers(guessing)
    got, finish, steps = _run(guessing, reqs)
    assert got == plain and finish == plain_finish
    assert guessers == set(reqs)
    stats = guessing.stats()
    assert 0 < stats.num_spec_accepted_tokens < stats.num_spec_draft_tokens, stats
    assert steps < plain_steps


def test_no_guesses_while_more_requests_run_than_the_cap(ckpt_path):
    """`speculative_max_running=2`: while more than 2 requests run nobody guesses; once the
    batch thins out (shorter requests end) the rest do; the tokens are plain decoding's."""
    reqs = {f"r{i}": (p, _sampled(temperature=0.0, max_new_tokens=8 + 6 * i))
            for i, p in enumerate(_prompts())}  # fmt: skip
    plain, _, _ = _run(_engine(ckpt_path), reqs)
    engine = _engine(ckpt_path, speculative_ngram=4, speculative_max_running=2)
    guess = engine.scheduler.speculate
    assert guess is not None
    running_at_guess: list[int] = []

    def counting(seq: Sequence, limit: int) -> list[int]:
        running_at_guess.append(len(engine.scheduler.running))
        return guess(seq, limit)

    engine.scheduler.speculate = counting
    got, _, _ = _run(engine, reqs)
    assert got == plain
    assert running_at_guess and max(running_at_guess) <= 2
    assert engine.stats().num_spec_accepted_tokens > 0


def test_a_request_asked_again_guesses_the_earlier_answer_from_the_shared_index(ckpt_path):
    """`speculative_ngram_shared`: prompts asked a second time guess the first answers from
    the rank's shared index — far fewer steps than guessing from their own tokens only, the
    same tokens as plain decoding."""
    prompts = {f"r{i}": (p, _sampled(temperature=0.0, max_new_tokens=40))
               for i, p in enumerate(_prompts()[:4])}  # fmt: skip
    plain, _, _ = _run(_engine(ckpt_path), prompts)
    steps = {}
    for shared in (0, 4096):
        engine = _engine(ckpt_path, speculative_ngram=6, speculative_ngram_shared=shared)
        first, _, _ = _run(engine, prompts)
        again, _, steps[shared] = _run(engine, {f"{rid}-again": r for rid, r in prompts.items()})
        assert first == plain and again == {f"{rid}-again": o for rid, o in plain.items()}
    assert steps[4096] * 2 < steps[0], steps


def _oracle(engine: Engine, answers: dict[str, list[int]], wrong: bool = False):
    """A `Scheduler.speculate` that guesses a request's true next tokens (or always misses)."""

    def guess(seq: Sequence, limit: int) -> list[int]:
        if not can_speculate(seq):
            return []
        limit = min(limit, 5, seq.sampling.max_new_tokens - seq.num_output_tokens - 1)
        done = seq.num_output_tokens
        nxt = answers[seq.rid][done : done + max(limit, 0)]
        return [t - 1 if t > 0 else 1 for t in nxt] if wrong else nxt

    engine.scheduler.speculate = guess


def test_right_and_wrong_guesses_give_the_same_tokens_and_stop_where_they_should(ckpt_path):
    """An oracle's guesses (all confirmed: up to 6 tokens a step) and guesses that always
    miss: the tokens of plain decoding, greedy and seeded sampled alike (a sampled request's
    generator stands where plain decoding's would after each step, or its next draws would
    differ); a stop token, EOS or the length limit inside a run of confirmed guesses ends the
    request right there."""
    prompts = _prompts()
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts)}
    reqs |= {name: (prompts[i % 8], sp) for i, (name, sp) in enumerate(GUESSING.items())}
    plain, _, plain_steps = _run(_engine(ckpt_path), reqs)
    # Stop rules that fire in the middle of runs: a stop token first seen at output 13, a
    # shorter max_new_tokens, and EOS honoured (the checkpoint's EOS made a stop token).
    tails = {}
    for i, (rid, out) in enumerate(sorted(o for o in plain.items() if o[0].startswith("r"))):
        stop_at = next(k for k in range(13, len(out)) if out[k] not in out[:k])
        sp = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True,
                            stop_token_ids=(out[stop_at],))  # fmt: skip
        tails[f"stop-{i}"] = (reqs[rid][0], sp, out[: stop_at + 1], FinishReason.STOP)
        short = SamplingParams(max_new_tokens=17, temperature=0.0, ignore_eos=True)
        tails[f"short-{i}"] = (reqs[rid][0], short, out[:17], FinishReason.LENGTH)
    answers = {**plain, **{rid: want for rid, (_, _, want, _) in tails.items()}}
    for wrong in (False, True):
        engine = _engine(ckpt_path, speculative_ngram=5)
        _oracle(engine, answers, wrong)
        got, _, steps = _run(engine, reqs)
        assert got == plain, wrong
        stats = engine.stats()
        if wrong:
            assert stats.num_spec_accepted_tokens == 0 < stats.num_spec_draft_tokens
        else:
            assert stats.num_spec_accepted_tokens == stats.num_spec_draft_tokens > 0
            assert steps * 2 < plain_steps  # up to 6 tokens a step (43 steps vs 14 seen)
        engine = _engine(ckpt_path, speculative_ngram=5)
        _oracle(engine, answers, wrong)
        got, finish, _ = _run(engine, {rid: (p, sp) for rid, (p, sp, _, _) in tails.items()})
        for rid, (_, _, want, reason) in tails.items():
            assert got[rid] == want and finish[rid] is reason, (rid, wrong)


def test_guessing_on_a_tight_kv_cache_preempts_and_swaps_with_the_same_tokens(ckpt_path):
    """Guesses never take pages another request needs: on a cache too small for the batch
    (queueing, preemption, KV swapped out and back) the tokens stay those of a roomy engine."""
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(_prompts())}
    roomy, _, _ = _run(_engine(ckpt_path), reqs)
    tight = _engine(ckpt_path, kv_capacity_tokens=192, chunked_prefill_size=24,
                    speculative_ngram=4)  # fmt: skip
    got, _, _ = _run(tight, reqs)
    assert got == roomy
    assert tight.scheduler.num_preemptions > 0 and tight.stats().num_spec_accepted_tokens > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"speculative_ngram": -1}, "--speculative-ngram must be >= 0"),
        ({"speculative_ngram_min": 0}, "--speculative-ngram-min and --speculative-ngram-max"),
        ({"speculative_ngram_min": 5, "speculative_ngram_max": 3}, "1 <= min <= max, got 5 and 3"),
        (
            {"speculative_ngram": 4, "speculative_max_running": -2},
            "--speculative-max-running must be >= 0, got -2",
        ),
        (
            {"speculative_ngram": 4, "speculative_ngram_shared": -1},
            "--speculative-ngram-shared must be >= 0, got -1",
        ),
        ({"speculative_ngram_shared": 4096}, "goes with --speculative-ngram"),
        ({"speculative_max_running": 8}, "goes with --speculative-ngram"),
    ],
)
def test_speculative_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)


def test_a_server_that_guesses_answers_as_one_that_does_not(
    launch_tiny, tiny_server, tiny_model_dir
):
    """`--speculative-ngram 4` through HTTP on the disaggregated tiny server (the decode rank
    guesses): batched, streamed and stop-string requests give the shared server's tokens and
    text; the counts reach /v1/stats and /metrics."""
    import asyncio

    import httpx

    from orchestrator.bench import BenchConfig, run_bench
    from tests.conftest import tiny_serve_config
    from tests.http_calls import _greedy, _sse

    rng = random.Random(3)
    prompts = []
    for n in (5, 12, 30):
        base = [rng.randrange(3, 900) for _ in range(n)]
        prompts += [base, base * 4]
    engine = dataclasses.replace(tiny_serve_config(tiny_model_dir).engine, speculative_ngram=4)
    server = launch_tiny(engine=engine, grpc_port=0)
    try:
        body = {"input_ids": prompts, "sampling_params": _greedy(48)}
        want = httpx.post(f"{tiny_server}/generate", json=body, timeout=120).json()
        got = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
        assert [g["text"] for g in got] == [w["text"] for w in want]
        # SGLang's `spec_verify_ct`: the decode steps each took (after its first token, which
        # the prefill rank drew); fewer than its tokens where guesses held. None without.
        steps = [g["meta_info"]["spec_verify_ct"] for g in got]
        assert all(
            0 < n <= g["meta_info"]["completion_tokens"] - 1
            for n, g in zip(steps, got, strict=True)
        )
        assert any(
            n < g["meta_info"]["completion_tokens"] - 1 for n, g in zip(steps, got, strict=True)
        )
        assert not any("spec_verify_ct" in w["meta_info"] for w in want)
        # gRPC: the same tokens, and the steps in `Usage.spec_verify_ct`.
        import grpc

        from proto import pdserve_pb2 as pb
        from proto import pdserve_pb2_grpc as pb_grpc

        sampling = pb.SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)
        call = pb.GenerateRequest(input_ids=pb.TokenIds(ids=prompts[3]), sampling=sampling)
        with grpc.insecure_channel(server.grpc_address) as channel:
            final = list(pb_grpc.GenerationStub(channel).Generate(call, timeout=60))[-1].final
        assert list(final.output_ids) == got[3]["output_ids"]
        assert 0 < final.usage.spec_verify_ct < len(final.output_ids) - 1  # its guesses held
        # Seeded sampled requests, with logprobs: the same tokens, guessing or not.
        sampled = _greedy(48, temperature=0.5, top_p=0.9, seed=11)
        body = {"input_ids": prompts, "sampling_params": sampled, "return_logprob": True}
        want_s = httpx.post(f"{tiny_server}/generate", json=body, timeout=120).json()
        got_s = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
        assert [g["output_ids"] for g in got_s] == [w["output_ids"] for w in want_s]
        for g, w in zip(got_s, want_s, strict=True):
            lp_got = [lp for lp, *_ in g["meta_info"]["output_token_logprobs"]]
            lp_want = [lp for lp, *_ in w["meta_info"]["output_token_logprobs"]]
            assert lp_got == pytest.approx(lp_want, abs=1e-4)
        one = {"input_ids": prompts[3], "stream": True, "sampling_params": _greedy(48)}
        with httpx.stream("POST", f"{server.url}/generate", json=one, timeout=120) as r:
            last = [e for e in _sse(r) if e != "[DONE]"][-1]
        assert last["output_ids"] == want[3]["output_ids"]
        text = want[3]["text"]
        stop = next(text[i : i + 3] for i in range(8, len(text) - 3) if text[i : i + 3].strip())
        cut = {"input_ids": prompts[3], "sampling_params": _greedy(48, stop=[stop])}
        out = httpx.post(f"{server.url}/generate", json=cut, timeout=120).json()
        assert out["text"] == text[: text.index(stop)]
        stats = httpx.get(f"{server.url}/v1/stats", timeout=30).json()
        ranks = [r["stats"] for r in stats["ranks"] if r["stats"]]
        assert sum(s["num_spec_accepted_tokens"] for s in ranks) > 0, ranks
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert "pdserve_spec_accepted_tokens_total" in metrics
        # `pdserve bench` reports the guesses of its run.
        bench = asyncio.run(run_bench(BenchConfig(server.url, 8, 16, 96, 4)))
        assert bench.num_failed == 0 and bench.spec_draft_tokens
        assert 0 < (bench.spec_accepted_tokens or 0) <= bench.spec_draft_tokens
        assert "guesses kept" in bench.table()
    finally:
        server.stop()


def static_graphs(engine: Engine, max_batch: int = 32) -> list[int]:
    """Give `engine` `DecodeGraphs` on their static-buffer path (run eagerly: how the CPU
    checks what CUDA captures); the rows of each decode step that went through them."""
    from workers.engine.cuda_graph import DecodeGraphs
    from workers.engine.kv_cache import pages_needed

    graphs = DecodeGraphs(
        engine.model, engine.kv, max_batch,
        pages_needed(engine.max_context_len, engine.kv.page_size), engine.expert_load,
        capture=False,
    )  # fmt: skip
    engine.graphs = graphs
    rows: list[int] = []
    real_run = graphs.run
    graphs.run = lambda *a: rows.append(len(a[0])) or real_run(*a)  # type: ignore[method-assign]
    return rows


def test_guess_rows_go_through_the_static_decode_buffers(ckpt_path):
    """Decode steps with guess rows through `DecodeGraphs`' static buffers (eagerly on CPU,
    as CUDA replays them): the tokens of an eager engine that does not guess."""
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(_prompts())}
    plain, _, _ = _run(_engine(ckpt_path), reqs)
    engine = _engine(ckpt_path, speculative_ngram=4)
    rows = static_graphs(engine)
    got, _, _ = _run(engine, reqs)
    assert got == plain
    assert rows and max(rows) > len(reqs)  # some steps read more rows than requests
    assert engine.stats().num_spec_accepted_tokens > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guessing_on_cuda_with_captured_graphs(ckpt_path):
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(_prompts())}
    plain, _, _ = _run(_engine(ckpt_path, device="cuda", cuda_graph_max_batch=0), reqs)
    engine = _engine(ckpt_path, device="cuda", cuda_graph_max_batch=48, speculative_ngram=4)
    assert engine.graphs is not None
    got, _, _ = _run(engine, reqs)
    assert got == plain and engine.stats().num_spec_accepted_tokens > 0


@pytest.mark.parametrize(("num_pages", "want"), [(6, []), (7, [5, 6])])
def test_guesses_take_a_new_page_only_while_one_per_running_request_stays_free(num_pages, want):
    """Two decoding requests on 2 pages each; "a" guesses 2 tokens, which need a third page:
    with 2 pages free (one per running request) the guess is cut to its pages, with 3 it
    gets the page."""
    from workers.engine.kv_cache import PageAllocator
    from workers.engine.prefix_cache import CachingAllocator
    from workers.engine.scheduler import Scheduler

    sched = Scheduler(CachingAllocator(PageAllocator(num_pages), 4), page_size=4, max_running=8,
                      token_budget=100)  # fmt: skip
    for rid in ("a", "b"):
        sched.add(Sequence(rid, list(range(3, 10)), SamplingParams(temperature=0.0), 0))
    for seq, num in sched.schedule().prefills:
        seq.num_computed += num
        seq.token_ids.append(1)  # position 7: the last slot of its second page
    sched.speculate = lambda seq, limit: [5, 6] if seq.rid == "a" else []
    batch = sched.schedule()
    assert [(s.rid, s.draft) for s in batch.decodes] == [("a", want), ("b", [])]
    assert sched.num_preemptions == 0
