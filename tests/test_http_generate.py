"""SGLang's `/generate` end to end on the shared tiny server (a real server on loopback,
real engine ranks as Ray actors): text and token-id prompts and batches, seeded sampling,
cumulative and incremental streaming, stop strings and stop token ids, the prefill rank's
prefix cache, `/tokenize`, `/detokenize` and `/abort_request`, and concurrent requests
that must come out as they do one at a time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import time
from typing import Any

import httpx
import pytest

from tests.http_calls import _client, _greedy, _rank, _ranks, _sse, _wait_idle


@pytest.mark.timeout(120)
def test_generate_text_and_input_ids(tiny_server):
    with _client(tiny_server) as c:
        r = c.post("/generate", json={"text": "Hello world", "sampling_params": _greedy(8)})
        assert r.status_code == 200, r.text
        out = r.json()
        assert isinstance(out["text"], str) and len(out["output_ids"]) == 8
        meta = out["meta_info"]
        assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] == 8
        assert meta["finish_reason"] == {"type": "length", "length": 8}
        assert meta["id"] and meta["e2e_latency"] > 0
        again = c.post("/generate", json={"text": "Hello world", "sampling_params": _greedy(8)})
        assert again.json()["output_ids"] == out["output_ids"]  # greedy is deterministic
        ids = c.post("/generate", json={"input_ids": [3, 4, 5, 6], "sampling_params": _greedy(5)})
        assert ids.status_code == 200 and ids.json()["meta_info"]["prompt_tokens"] == 4
        batch = c.post(
            "/generate", json={"input_ids": [[3, 4, 5, 6], [7, 8]], "sampling_params": _greedy(5)}
        )
        assert batch.status_code == 200 and len(batch.json()) == 2
        assert batch.json()[0]["output_ids"] == ids.json()["output_ids"]
        # SGLang's batch form: one sampling_params per prompt (found by an audit: a 400).
        each = c.post("/generate", json={
            "input_ids": [[3, 4, 5, 6], [7, 8]], "sampling_params": [_greedy(5), _greedy(2)],
        })  # fmt: skip
        assert each.status_code == 200, each.text
        assert [len(o["output_ids"]) for o in each.json()] == [5, 2]
        assert each.json()[0]["output_ids"] == ids.json()["output_ids"]
        short = c.post("/generate", json={"input_ids": [[3, 4], [7, 8]],
                                          "sampling_params": [_greedy(5)]})  # fmt: skip
        assert short.status_code == 400 and "one per prompt" in short.json()["error"]["message"]


@pytest.mark.timeout(120)
def test_seeded_sampling_is_reproducible(tiny_server):
    def sample(seed: int) -> list[int]:
        sp = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "seed": seed}
        r = httpx.post(f"{tiny_server}/generate", json={"text": "Hi", "sampling_params": sp})
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]

    assert sample(7) == sample(7)


@pytest.mark.timeout(120)
def test_generate_stream_is_cumulative_and_matches(tiny_server):
    body = {"text": "Once upon a time", "sampling_params": _greedy(12)}
    with _client(tiny_server) as c:
        full = c.post("/generate", json=body).json()
        with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for prev, cur in zip(chunks, chunks[1:], strict=False):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.timeout(180)
def test_incremental_streaming_output_sends_only_what_is_new(launch_tiny):
    server = launch_tiny(colocated=True, incremental_streaming_output=True)
    try:
        body = {"text": "Once upon a time", "sampling_params": _greedy(24)}
        with _client(server.url) as c:
            full = c.post("/generate", json=body).json()  # not streamed: whole, as before
            with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = _sse(r)
            scoring = {**body, "stream": True, "return_logprob": True, "logprob_start_len": 0}
            with c.stream("POST", "/generate", json=scoring) as r:
                scored = [e for e in _sse(r) if e != "[DONE]"]
    finally:
        server.stop()
    # Logprobs are incremental too: the prompt's come once, each output token's once.
    with_prompt = [e for e in scored if "input_token_logprobs" in e["meta_info"]]
    assert len(with_prompt) == 1 and with_prompt[0] is scored[0]
    assert sum(len(e["meta_info"]["output_token_logprobs"]) for e in scored) == 24
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 2
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]
    assert all(len(c["output_ids"]) < len(full["output_ids"]) for c in chunks)
    counts = [c["meta_info"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 24  # totals, not per event
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.timeout(120)
def test_stop_strings_and_stop_token_ids(tiny_server):
    with _client(tiny_server) as c:
        base = c.post("/generate", json={"text": "The quick", "sampling_params": _greedy(24)})
        text, ids = base.json()["text"], base.json()["output_ids"]
        # A stop string from the middle of the greedy text (visible, not at the very start).
        cut = next(
            i
            for i in range(2, len(text) - 2)
            if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2]
        )
        stop = text[cut : cut + 2]
        expected = text[: text.index(stop)]
        for stream in (False, True):
            body = {"text": "The quick", "sampling_params": _greedy(24, stop=[stop])}
            if stream:
                with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                    out = _sse(r)[-2]
            else:
                out = c.post("/generate", json=body).json()
            assert out["text"] == expected
            assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
            # The tokens end with the one that completed the stop string, whatever the rank
            # made after it; the count says the same.
            kept = out["output_ids"]
            assert kept == ids[: len(kept)] and out["meta_info"]["completion_tokens"] == len(kept)
            shown = [
                c.post("/detokenize", json={"tokens": t}).json()["prompt"]
                for t in (kept, kept[:-1])
            ]
            assert shown[0].startswith(expected + stop) and stop not in shown[1], shown
        stop_id = ids[5]
        first = ids.index(stop_id)
        body = {"text": "The quick", "sampling_params": _greedy(24, stop_token_ids=[stop_id])}
        out = c.post("/generate", json=body).json()
        assert out["output_ids"] == ids[: first + 1]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    _wait_idle(tiny_server)


@pytest.mark.timeout(120)
def test_a_repeated_prefix_is_found_in_the_prefill_ranks_cache(tiny_server):
    rng = random.Random(7)
    system = [rng.randrange(3, 1000) for _ in range(40)]  # 2 full pages of 16, and 8 tokens
    first = {"input_ids": system + [5], "sampling_params": _greedy(6)}
    with _client(tiny_server) as c:
        one = c.post("/generate", json=first).json()
        two = c.post("/generate", json=first).json()
        assert one["meta_info"]["cached_tokens"] == 0
        assert two["meta_info"]["cached_tokens"] == 32 and two["output_ids"] == one["output_ids"]
        # Another request sharing only the system prompt finds its full pages too.
        other = c.post("/v1/completions", json={
            "prompt": system + [9, 9], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
        }).json()  # fmt: skip
        assert other["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
        metrics = c.get("/metrics").text
        prefill = [r for r in _ranks(tiny_server) if r["info"]["role"] == "prefill"]
    assert prefill and sum(r["stats"]["num_prefix_hit_tokens"] for r in prefill) >= 64
    # The decode rank held those pages too (it received them the first time): the prefill
    # rank sent only the page with the prompt's last token.
    decode = [r for r in _ranks(tiny_server) if r["info"]["role"] == "decode"]
    assert decode and sum(r["stats"]["num_transfer_skipped_tokens"] for r in decode) >= 64
    skipped = [line for line in metrics.splitlines()
               if line.startswith("pdserve_kv_transfer_skipped_tokens_total")]  # fmt: skip
    assert skipped and float(skipped[0].split()[-1]) >= 64
    hits = [line for line in metrics.splitlines()
            if line.startswith("pdserve_prefix_cache_hit_tokens_total")]  # fmt: skip
    assert hits and float(hits[0].split()[-1]) >= 64
    _wait_idle(tiny_server)


@pytest.mark.timeout(120)
def test_tokenize_detokenize_and_abort_request(tiny_server):
    with _client(tiny_server) as c:
        r = c.post("/tokenize", json={"prompt": "Hello there"}).json()
        assert r["count"] == len(r["tokens"]) > 1 and r["max_model_len"] > 0
        back = c.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
        assert back.endswith("Hello there")
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["count"] > 2
        gen = c.post("/generate", json={"input_ids": chat["tokens"],
                                        "sampling_params": _greedy(1)}).json()  # fmt: skip
        assert gen["meta_info"]["prompt_tokens"] == chat["count"]
        assert c.post("/tokenize", json={"text": "x"}).status_code == 400
        both = c.post(
            "/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
        bad = c.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]

        assert c.post("/abort_request", json={"rid": "no-such-request"}).json()["found"] is False
        assert c.post("/abort_request", json={}).status_code == 400
        body = {"input_ids": [5] * 8, "rid": "to-abort", "stream": True,
                "sampling_params": _greedy(2000)}  # fmt: skip
        with c.stream("POST", "/generate", json=body) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert "output_ids" in first
            found = c.post("/abort_request", json={"rid": "to-abort"}).json()["found"]
            rest = [line for line in lines if line.startswith("data: ")]
        assert found is True and rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: ") :])  # SGLang's: the output so far, "abort"
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(last["output_ids"]) == last["meta_info"]["completion_tokens"] < 2000

        # Not streamed: the same answer, whole (the rank held the tokens; it sends them now).
        whole = {"input_ids": [5] * 8, "rid": "to-abort-whole", "sampling_params": _greedy(2000)}
        generated = _wait_idle(tiny_server)["num_generated_tokens"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(c.post, "/generate", json=whole)
            while _rank(tiny_server)["stats"]["num_generated_tokens"] < generated + 8:
                assert not call.done(), call.result().text
                time.sleep(0.01)
            assert c.post("/abort_request", json={"rid": "to-abort-whole"}).json()["found"]
            r = call.result()
        assert r.status_code == 200, r.text
        meta = r.json()["meta_info"]
        assert meta["finish_reason"]["type"] == "abort"
        assert 0 < len(r.json()["output_ids"]) == meta["completion_tokens"] < 2000
    _wait_idle(tiny_server)


# ---- batching consistency and page accounting ---------------------------------------------------


@pytest.mark.timeout(300)
def test_concurrent_greedy_requests_match_sequential(tiny_server, info):
    rng = random.Random(0)
    prompts = [
        [rng.randrange(info["vocab_size"]) for _ in range(rng.randint(3, 40))] for _ in range(32)
    ]

    def body(p: list[int]) -> dict[str, Any]:
        return {"input_ids": p, "sampling_params": _greedy(16)}

    with _client(tiny_server) as c:
        sequential = [c.post("/generate", json=body(p)).json()["output_ids"] for p in prompts]

    async def all_at_once() -> list[list[int]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=tiny_server, timeout=240, limits=limits) as ac:
            rs = await asyncio.gather(*(ac.post("/generate", json=body(p)) for p in prompts))
        assert all(r.status_code == 200 for r in rs)
        return [r.json()["output_ids"] for r in rs]

    concurrent = asyncio.run(all_at_once())
    assert all(len(o) == 16 for o in sequential)
    mismatched = [i for i in range(32) if concurrent[i] != sequential[i]]
    assert not mismatched, f"requests {mismatched} differ when batched"
    _wait_idle(tiny_server)
    metrics = httpx.get(f"{tiny_server}/metrics").text
    assert "pdserve_kv_pages_used 0.0" in metrics
