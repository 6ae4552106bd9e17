"""The HTTP API end to end: a real server on loopback, a real engine rank (Ray actor), the tiny
model. SGLang `/generate`, the OpenAI routes through the official client, bad input, client
disconnects, batching consistency, the CLI, and a rank that dies."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest


def _client(url: str, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout)


def _ranks(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/v1/stats", timeout=30).json()["ranks"])


def _rank(url: str) -> dict[str, Any]:
    """The rank that generates: the decode rank (disaggregated) or the colocated one."""
    ranks = [r for r in _ranks(url) if r["info"]["role"] in ("decode", "colocated")]
    assert len(ranks) == 1
    return ranks[0]


def _wait_idle(url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll until no request runs or waits on any rank and every KV page is free; the
    generating rank's stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [r["stats"] for r in _ranks(url)]
        if all(
            st["num_running"] == 0
            and st["num_waiting"] == 0
            and st["num_pages_free"] == st["num_pages_total"]
            for st in stats
        ):
            return _rank(url)["stats"]
        assert time.monotonic() < deadline, f"the ranks did not go idle: {stats}"
        time.sleep(0.05)


def _sse(resp: httpx.Response) -> list[Any]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _greedy(max_new: int, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True, **extra}


@pytest.fixture(scope="module")
def info(tiny_server) -> dict[str, Any]:
    return _rank(tiny_server)["info"]


# ---- basics -------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_health_models_and_metrics(tiny_server, info):
    with _client(tiny_server) as c:
        assert c.get("/health").status_code == 200
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"]
        assert models["data"][0]["max_model_len"] == info["max_context_len"]
        c.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": _greedy(4)})
        text = c.get("/metrics").text
    for name in (
        "pdserve_requests_total",
        "pdserve_prompt_tokens_total",
        "pdserve_generation_tokens_total",
        "pdserve_time_to_first_token_seconds_bucket",
        "pdserve_time_per_output_token_seconds_bucket",
        "pdserve_e2e_request_latency_seconds_bucket",
        "pdserve_num_running_requests",
        "pdserve_num_queued_requests",
        'pdserve_request_finish_total{reason="length"}',
        "pdserve_request_retries_total",
        "pdserve_rank_failures_total",
        "pdserve_draining 0.0",
        "pdserve_kv_pages_used",
        "pdserve_kv_pages_free",
    ):
        assert name in text, name
    assert 'pdserve_requests_total{route="/generate",status="200"}' in text


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
        stop_id = ids[5]
        first = ids.index(stop_id)
        body = {"text": "The quick", "sampling_params": _greedy(24, stop_token_ids=[stop_id])}
        out = c.post("/generate", json=body).json()
        assert out["output_ids"] == ids[: first + 1]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    _wait_idle(tiny_server)


# ---- OpenAI routes through the official client -----------------------------------------------


@pytest.fixture(scope="module")
def oai(tiny_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)


@pytest.mark.timeout(120)
def test_openai_completions(oai):
    model = oai.models.list().data[0].id
    extra = {"ignore_eos": True}
    r = oai.completions.create(
        model=model, prompt="Hello", max_tokens=10, temperature=0, extra_body=extra
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.created > 0
    assert r.model == model and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    chunks = list(
        oai.completions.create(
            model=model, prompt="Hello", max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    default = oai.completions.create(model=model, prompt=[5, 6, 7], extra_body=extra)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


@pytest.mark.timeout(120)
def test_openai_chat_completions(oai):
    model = oai.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi"},
    ]
    extra = {"ignore_eos": True, "top_k": 1}
    r = oai.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, seed=1, extra_body=extra
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    stream = oai.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


# ---- penalties and logprobs ---------------------------------------------------------------------

_PENALIZED = {
    "frequency_penalty": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.3,
}  # fmt: skip


def _reference(model_dir, prompt: list[int], num_new: int, **sampling: Any):
    """Output ids and logprobs of `prompt` from an engine in this process (colocated, no
    Ray, no transfer): what the disaggregated server must reproduce."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.messages import GenerateRequest, SamplingParams

    engine = Engine(model_dir, EngineConfig(device="cpu", page_size=16), progress=False)
    params = SamplingParams(max_new_tokens=num_new, temperature=0.0, ignore_eos=True, **sampling)
    engine.add(GenerateRequest("ref", prompt, params))
    ids: list[int] = []
    logprobs: list[Any] = []
    prompt_logprobs: list[Any] = []
    while engine.has_work:
        for d in engine.step():
            ids += d.token_ids
            logprobs += d.logprobs or []
            prompt_logprobs = d.prompt_logprobs or prompt_logprobs
    return ids, logprobs, prompt_logprobs


@pytest.mark.timeout(180)
def test_penalties_and_logprobs_through_the_disaggregated_server(tiny_server, tiny_model_dir):
    """The prefill rank samples the first token, the decode rank the rest: both must apply
    the penalties alike, and the first token's logprob crosses with the KV."""
    prompt = [5, 6, 7, 5, 6, 7, 5, 6, 7, 8]
    want_ids, want_lps, _ = _reference(
        tiny_model_dir, prompt, 14, logprobs=True, top_logprobs=3, **_PENALIZED
    )
    plain_ids, _, _ = _reference(tiny_model_dir, prompt, 14)
    assert want_ids != plain_ids  # the penalties change this output
    body = {
        "input_ids": prompt, "sampling_params": _greedy(14, **_PENALIZED),
        "return_logprob": True, "top_logprobs_num": 3,
    }  # fmt: skip
    with _client(tiny_server) as c:
        whole = c.post("/generate", json=body).json()
        assert whole["output_ids"] == want_ids, whole
        entries = whole["meta_info"]["output_token_logprobs"]
        assert [e[1] for e in entries] == want_ids and all(e[2] is None for e in entries)
        assert [e[0] for e in entries] == pytest.approx([lp.logprob for lp in want_lps], abs=1e-4)
        tops = whole["meta_info"]["output_top_logprobs"]
        assert [[e[1] for e in top] for top in tops] == [[t for t, _ in lp.top] for lp in want_lps]

        with c.stream(
            "POST", "/generate", json={**body, "stream": True, "return_text_in_logprobs": True}
        ) as r:
            events = [e for e in _sse(r) if e != "[DONE]"]
        final = events[-1]
        assert final["output_ids"] == want_ids
        streamed = final["meta_info"]["output_token_logprobs"]
        assert [e[0] for e in streamed] == pytest.approx([e[0] for e in entries], abs=1e-6)
        assert all(isinstance(e[2], str) for e in streamed)

        completion = c.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 14, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, **_PENALIZED,
        }).json()  # fmt: skip
        lp = completion["choices"][0]["logprobs"]
        assert lp["token_logprobs"] == pytest.approx([x.logprob for x in want_lps], abs=1e-4)
        assert len(lp["tokens"]) == 14 and all(len(top) <= 2 for top in lp["top_logprobs"])
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])

        with c.stream("POST", "/v1/completions", json={
            "prompt": prompt, "max_tokens": 14, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True, **_PENALIZED,
        }) as r:  # fmt: skip
            chunks = [e for e in _sse(r) if e != "[DONE]"]
        streamed_lps = [v for ch in chunks for v in ch["choices"][0]["logprobs"]["token_logprobs"]]
        assert streamed_lps == pytest.approx(lp["token_logprobs"], abs=1e-6)
        assert all(ch["choices"][0]["logprobs"]["top_logprobs"] is None for ch in chunks)

        chat = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2,
            "min_tokens": 6,
        }).json()  # fmt: skip
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == chat["usage"]["completion_tokens"] == 6
        for item in content:
            assert item["bytes"] == list(item["token"].encode())
            assert len(item["top_logprobs"]) == 2
            assert item["top_logprobs"][0]["logprob"] >= item["logprob"] - 1e-6  # greedy
    _wait_idle(tiny_server)


@pytest.mark.timeout(120)
def test_logit_bias_on_every_route(tiny_server):
    """-100 on the greedy choice makes the runner-up (by the unbiased call's own top
    logprobs) come first; +100 on a token makes every token that one."""
    prompt = [17, 18, 19, 20]
    with _client(tiny_server) as c:
        plain = c.post("/generate", json={
            "input_ids": prompt, "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": _greedy(3),
        }).json()  # fmt: skip
        top = plain["meta_info"]["output_top_logprobs"][0]  # [logprob, token id, text]
        best, second = top[0][1], top[1][1]
        sp = _greedy(3, logit_bias={str(best): -100})
        banned = c.post("/generate", json={"input_ids": prompt, "sampling_params": sp}).json()
        assert plain["output_ids"][0] == best and banned["output_ids"][0] == second
        forced = c.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 5, "temperature": 0.8, "seed": 1,
            "ignore_eos": True, "logit_bias": {"321": 100},
        }).json()  # fmt: skip
        chat = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "logit_bias": {"321": 100}, "logprobs": True,
        }).json()  # fmt: skip
    assert forced["choices"][0]["text"] == "".join([_token_text(tiny_server, 321)] * 5)
    tokens = [e["token"] for e in chat["choices"][0]["logprobs"]["content"]]
    assert tokens == [_token_text(tiny_server, 321)] * 4


def _token_text(url: str, token: int) -> str:
    with _client(url) as c:
        return str(c.post("/detokenize", json={"tokens": [token]}).json()["prompt"])


@pytest.mark.timeout(180)
def test_prompt_logprobs_and_echo(tiny_server, tiny_model_dir):
    """Scoring a prompt on the disaggregated server (its prefill rank does the whole request):
    SGLang's `input_token_logprobs` and OpenAI's `echo` with `logprobs` give the logprobs of
    an engine in this process, the first prompt token none."""
    prompt = list(range(11, 31))
    want_ids, _, want_prompt = _reference(
        tiny_model_dir, prompt, 3, logprobs=True, top_logprobs=2, prompt_logprobs=True
    )
    assert len(want_prompt) == len(prompt) and want_prompt[0] is None

    body = {"input_ids": prompt, "sampling_params": _greedy(3), "return_logprob": True,
            "logprob_start_len": 5, "top_logprobs_num": 2}  # fmt: skip
    with _client(tiny_server) as c:
        r = c.post("/generate", json=body).json()
        assert r["output_ids"] == want_ids
        inputs = r["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in inputs] == prompt[5:]
        assert [e[0] for e in inputs] == pytest.approx(
            [lp.logprob for lp in want_prompt[5:]], abs=1e-4
        )
        assert len(r["meta_info"]["input_top_logprobs"][0]) == 2
        zero = c.post("/generate", json={**body, "logprob_start_len": 0}).json()
        assert zero["meta_info"]["input_token_logprobs"][0][0] is None
        assert zero["meta_info"]["input_top_logprobs"][0] is None

        completion = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                      "echo": True, "logprobs": 1}  # fmt: skip
        whole = c.post("/v1/completions", json=completion).json()["choices"][0]
        lp = whole["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 3 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx(
            [x.logprob for x in want_prompt[1:]], abs=1e-4
        )
        echoed = c.post("/detokenize", json={"tokens": prompt}).json()["prompt"]
        assert whole["text"].startswith(echoed)
        with c.stream("POST", "/v1/completions", json={**completion, "stream": True}) as resp:
            chunks = [e for e in _sse(resp) if e != "[DONE]"]
        assert chunks[0]["choices"][0]["text"] == echoed
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == whole["text"]
        streamed = [v for ch in chunks for v in ch["choices"][0]["logprobs"]["token_logprobs"]]
        assert streamed == lp["token_logprobs"]
        text_only = c.post("/v1/completions", json={**completion, "logprobs": None}).json()
        assert text_only["choices"][0]["text"] == whole["text"]
        assert text_only["choices"][0]["logprobs"] is None
    _wait_idle(tiny_server)


@pytest.mark.timeout(180)
def test_a_batch_of_prompts_on_v1_completions(tiny_server):
    """A list of prompts (text or ids) is one request each: choices `i * n + j`, usage
    summed, the same outputs as one call per prompt; scoring a batch with echo works too."""
    prompts: list[Any] = ["Hello", [5, 6, 7, 8], "The quick brown fox"]
    base = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with _client(tiny_server) as c:
        single = [c.post("/v1/completions", json={**base, "prompt": p}).json() for p in prompts]
        batch = c.post("/v1/completions", json={**base, "prompt": prompts, "n": 2}).json()
        assert [ch["index"] for ch in batch["choices"]] == list(range(6))
        assert [ch["text"] for ch in batch["choices"]] == [
            s["choices"][0]["text"] for s in single for _ in range(2)
        ]
        usage = batch["usage"]
        assert usage["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)
        assert usage["completion_tokens"] == 30
        with c.stream("POST", "/v1/completions", json={**base, "prompt": prompts,
                                                      "stream": True}) as r:  # fmt: skip
            chunks = [e for e in _sse(r) if e != "[DONE]"]
        texts = ["", "", ""]
        for ch in chunks:
            texts[ch["choices"][0]["index"]] += ch["choices"][0]["text"]
        assert texts == [s["choices"][0]["text"] for s in single]
        scored = c.post("/v1/completions", json={
            **base, "max_tokens": 1, "prompt": prompts, "echo": True, "logprobs": 0,
        }).json()  # fmt: skip
        for ch, s in zip(scored["choices"], single, strict=True):
            lp = ch["logprobs"]
            assert len(lp["tokens"]) == s["usage"]["prompt_tokens"] + 1
            assert lp["token_logprobs"][0] is None and None not in lp["token_logprobs"][1:]
        bad = c.post("/v1/completions", json={**base, "prompt": ["ok", ""]})
        assert bad.status_code == 400 and "prompt[1]" in bad.json()["error"]["message"]
        big = c.post("/v1/completions", json={**base, "prompt": ["x"] * 200, "n": 2})
        assert big.status_code == 400 and "256" in big.json()["error"]["message"]
    _wait_idle(tiny_server)


@pytest.mark.timeout(180)
def test_n_choices_on_every_route(tiny_server):
    """`n` completions of one prompt: seeded choices differ from each other and repeat from
    call to call; streams interleave them by `index` and end with the same outputs."""
    sampling = {"max_new_tokens": 8, "temperature": 1.0, "seed": 11, "ignore_eos": True, "n": 3}
    with _client(tiny_server) as c:
        first = c.post("/generate", json={"text": "abc", "sampling_params": sampling}).json()
        again = c.post("/generate", json={"text": "abc", "sampling_params": sampling}).json()
        assert isinstance(first, list) and len(first) == 3
        outs = [r["output_ids"] for r in first]
        assert outs == [r["output_ids"] for r in again]
        assert len({tuple(o) for o in outs}) > 1  # seeds seed, seed + 1, seed + 2
        assert len({r["meta_info"]["id"] for r in first}) == 3
        batch = c.post(
            "/generate", json={"text": ["abc", "xyz"], "sampling_params": sampling}
        ).json()
        assert [r["output_ids"] for r in batch[:3]] == outs and len(batch) == 6

        with c.stream(
            "POST", "/generate", json={"text": "abc", "sampling_params": sampling, "stream": True}
        ) as r:
            events = [e for e in _sse(r) if e != "[DONE]"]
        assert {e["index"] for e in events} == {0, 1, 2}
        last = {e["index"]: e["output_ids"] for e in events}
        assert [last[i] for i in range(3)] == outs

        body = {"prompt": "abc", "max_tokens": 8, "temperature": 1.0, "seed": 11,
                "ignore_eos": True, "n": 2, "logprobs": 1}  # fmt: skip
        whole = c.post("/v1/completions", json=body).json()
        assert [ch["index"] for ch in whole["choices"]] == [0, 1]
        assert whole["usage"]["completion_tokens"] == 16
        assert all(len(ch["logprobs"]["tokens"]) == 8 for ch in whole["choices"])
        with c.stream(
            "POST",
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            chunks = [e for e in _sse(r) if e != "[DONE]"]
        texts = ["", ""]
        for ch in chunks[:-1]:
            texts[ch["choices"][0]["index"]] += ch["choices"][0]["text"]
        assert texts == [ch["text"] for ch in whole["choices"]]
        assert chunks[-1]["usage"]["completion_tokens"] == 16

        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        with c.stream("POST", "/v1/chat/completions", json=chat) as r:
            chunks = [e for e in _sse(r) if e != "[DONE]"]
        roles = [ch["choices"][0]["index"] for ch in chunks if "role" in ch["choices"][0]["delta"]]
        assert roles == [0, 1]
        finishes = [ch["choices"][0]["index"] for ch in chunks if ch["choices"][0]["finish_reason"]]
        assert sorted(finishes) == [0, 1]
    _wait_idle(tiny_server)


@pytest.mark.timeout(180)
def test_best_of_picks_highest_mean_logprob(tiny_server):
    """`best_of` = k draws k candidates (seeds seed .. seed + k - 1, as `n` = k does) and
    returns the `n` with the highest mean logprob per output token, best first; usage counts
    every candidate's tokens, and logprobs come back only when asked for."""
    body = {"prompt": ["abc", "hello"], "max_tokens": 12, "temperature": 1.0, "seed": 5}
    with _client(tiny_server) as c:
        every = c.post("/v1/completions", json={**body, "n": 4, "logprobs": 0}).json()
        best = c.post("/v1/completions", json={**body, "n": 2, "best_of": 4}).json()
        with_lp = c.post(
            "/v1/completions", json={**body, "n": 2, "best_of": 4, "logprobs": 0}
        ).json()
        streamed_ok = c.post("/v1/completions", json={**body, "best_of": 1, "stream": True})
    assert streamed_ok.status_code == 200
    expected = []
    for p in range(2):
        group = every["choices"][4 * p : 4 * p + 4]
        means = [sum(ch["logprobs"]["token_logprobs"]) / len(ch["logprobs"]["tokens"])
                 for ch in group]  # fmt: skip
        assert len(set(means)) == 4  # distinct candidates, so the order is one
        order = sorted(range(4), key=lambda i: -means[i])[:2]
        expected += [group[i]["text"] for i in order]
    assert [ch["text"] for ch in best["choices"]] == expected
    assert [ch["index"] for ch in best["choices"]] == [0, 1, 2, 3]
    assert all(ch["logprobs"] is None for ch in best["choices"])
    assert best["usage"]["completion_tokens"] == every["usage"]["completion_tokens"]
    assert best["usage"]["prompt_tokens"] == every["usage"]["prompt_tokens"]
    assert [ch["text"] for ch in with_lp["choices"]] == expected
    assert all(ch["logprobs"]["tokens"] for ch in with_lp["choices"])
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
        assert found is True
        assert any("abort" in line for line in rest) and rest[-1] == "data: [DONE]"
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


# ---- bad input ------------------------------------------------------------------------------------

G, C, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
_USER = [{"role": "user", "content": "hi"}]


def _bad_cases(info: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    """(route, body, field that the message must name, extra text it must contain)."""
    vocab, ctx, kv = info["vocab_size"], info["max_context_len"], info["kv_capacity_tokens"]
    cases: list[tuple[str, Any, str, str]] = [
        (G, b"{not json", "body", "JSON"),
        (G, b"[1, 2", "body", "JSON"),
        (G, {}, "text", "required"),
        (G, {"text": ""}, "text", "empty"),
        (G, {"input_ids": []}, "input_ids", "empty"),
        (G, {"input_ids": [1, vocab]}, "input_ids", "vocabulary"),
        (G, {"input_ids": [-1]}, "input_ids", "vocabulary"),
        (G, {"input_ids": [1, "a"]}, "input_ids", ""),
        (G, {"text": "hi", "input_ids": [1]}, "text", "not both"),
        (
            G,
            {"text": "hi", "sampling_params": {"max_new_tokens": ctx + 1}},
            "max_new_tokens",
            "context",
        ),
        (G, {"text": "hi", "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens", "> 0"),
        (G, {"text": "hi", "sampling_params": {"max_new_tokens": -3}}, "max_new_tokens", ""),
        (
            G,
            {"text": "hi", "sampling_params": {"max_new_tokens": 1.5}},
            "max_new_tokens",
            "integer",
        ),
        (
            G,
            {"text": "hi", "sampling_params": {"max_new_tokens": True}},
            "max_new_tokens",
            "integer",
        ),
        (G, {"text": "hi", "sampling_params": {"temperature": -0.1}}, "temperature", ">= 0"),
        (G, {"text": "hi", "sampling_params": {"temperature": "hot"}}, "temperature", "number"),
        (G, {"text": "hi", "sampling_params": {"top_p": 0}}, "top_p", "(0, 1]"),
        (G, {"text": "hi", "sampling_params": {"top_p": 1.5}}, "top_p", "(0, 1]"),
        (G, {"text": "hi", "sampling_params": {"top_k": -2}}, "top_k", ""),
        (G, {"text": "hi", "sampling_params": {"top_k": 0}}, "top_k", ""),
        (G, {"text": "hi", "sampling_params": {"seed": "x"}}, "seed", "integer"),
        (G, {"text": "hi", "sampling_params": {"stop": ""}}, "stop", "empty"),
        (G, {"text": "hi", "sampling_params": {"stop": [1]}}, "stop", ""),
        (G, {"text": "hi", "sampling_params": {"stop_token_ids": [vocab]}}, "stop_token_ids", ""),
        (G, {"text": "hi", "sampling_params": {"ignore_eos": "yes"}}, "ignore_eos", ""),
        (G, {"text": "hi", "sampling_params": {"temprature": 1}}, "temprature", "unknown"),
        (G, {"text": "hi", "sampling_params": "greedy"}, "sampling_params", "object"),
        (G, {"text": "hi", "stream": "yes"}, "stream", ""),
        (G, [1, 2], "body", "object"),
        (C, {"model": "x"}, "prompt", "required"),
        (C, {"prompt": ""}, "prompt", "empty"),
        (C, {"prompt": [vocab + 5]}, "prompt", "vocabulary"),
        (C, {"prompt": "hi", "max_tokens": 0}, "max_tokens", ""),
        (C, {"prompt": "hi", "max_tokens": ctx}, "max_tokens", "context"),
        (C, {"prompt": "hi", "n": 0}, "n", "[1, 16]"),
        (C, {"prompt": "hi", "n": 17}, "n", "[1, 16]"),
        (G, {"text": "hi", "rid": "a", "sampling_params": {"n": 2}}, "rid", "n > 1"),
        (C, {"prompt": "hi", "n": 3, "best_of": 2}, "best_of", "at least n"),
        (C, {"prompt": "hi", "best_of": 17}, "best_of", "[1, 16]"),
        (C, {"prompt": "hi", "best_of": 2, "stream": True}, "best_of", "streamed"),
        (C, {"prompt": ["a"] * 20, "best_of": 16}, "prompt", "best_of=16"),
        (CHAT, {"messages": _USER, "best_of": 2}, "best_of", "not supported"),
        (C, {"prompt": "hi", "logprobs": 21}, "logprobs", "[0, 20]"),
        (C, {"prompt": "hi", "frequency_penalty": 3}, "frequency_penalty", "[-2, 2]"),
        (C, {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens", "max_tokens"),
        (G, {"text": "hi", "sampling_params": {"presence_penalty": -2.5}}, "presence_penalty", ""),
        (G, {"text": "hi", "sampling_params": {"repetition_penalty": 0}}, "repetition_penalty", ""),
        (G, {"text": "hi", "sampling_params": {"min_p": 2}}, "min_p", "[0, 1]"),
        (G, {"text": "hi", "sampling_params": {"min_new_tokens": -1}}, "min_new_tokens", ">= 0"),
        (
            G,
            {"text": "hi", "return_logprob": True, "logprob_start_len": -2},
            "logprob_start_len",
            ">= 0",
        ),
        (CHAT, {"messages": _USER, "echo": True}, "echo", "not supported"),
        (G, {"text": "hi", "top_logprobs_num": 2}, "top_logprobs_num", "return_logprob"),
        (G, {"text": "hi", "return_logprob": True, "top_logprobs_num": 50}, "top_logprobs_num", ""),
        (
            G,
            {"input_ids": [1, 2], "sampling_params": {"min_new_tokens": ctx}},
            "min_new_tokens",
            "",
        ),
        (CHAT, {"messages": _USER, "top_logprobs": 3}, "top_logprobs", "needs logprobs"),
        (C, {"prompt": "hi", "temperature": -1}, "temperature", ""),
        (C, {"prompt": "hi", "top_p": 2}, "top_p", ""),
        (C, {"prompt": "hi", "stream": 1}, "stream", ""),
        (CHAT, {"model": "x"}, "messages", ""),
        (CHAT, {"messages": []}, "messages", ""),
        (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", ""),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ""),
        (CHAT, {"messages": _USER, "max_tokens": 1.5}, "max_tokens", "integer"),
        (CHAT, {"messages": _USER, "top_k": 0}, "top_k", ""),
        (G, {"text": "hi", "sampling_params": {"regex": "(ab"}}, "regex", "invalid regex"),
        (G, {"text": "hi", "sampling_params": {"regex": 5}}, "regex", "string"),
        (G, {"text": "hi", "sampling_params": {"ebnf": "root ::= x"}}, "ebnf", "invalid ebnf"),
        (
            G,
            {"text": "hi", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}},
            "ebnf",
            "not several",
        ),
        (G, {"text": "hi", "sampling_params": {"json_schema": "{"}}, "json_schema", "invalid"),
        (CHAT, {"messages": _USER, "response_format": {"type": "xml"}}, "response_format.type", ""),
        (
            CHAT,
            {"messages": _USER, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "object",
        ),
        (
            C,
            {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema.schema",
            "schema",
        ),
        (
            CHAT,
            {"messages": _USER, "regex": "a", "response_format": {"type": "json_object"}},
            "regex",
            "not several",
        ),
        (CHAT, {"messages": _USER, "guided_choice": []}, "guided_choice", "non-empty list"),
        (C, {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
        (C, {"prompt": "hi", "priority": 2**31}, "priority", "32-bit"),
        (G, {"text": "hi", "priority": "high"}, "priority", "integer"),
        (C, {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        (C, {"prompt": "hi", "logit_bias": {"5": "1"}}, "logit_bias", "number"),
        (C, {"prompt": "hi", "logit_bias": [5]}, "logit_bias", "object"),
        (C, {"prompt": "hi", "logit_bias": {str(vocab): 1}}, "logit_bias", "vocabulary"),
        (
            G,
            {"text": "hi", "sampling_params": {"logit_bias": {"-1": 2}}},
            "sampling_params.logit_bias",
            "vocabulary",
        ),
        (C, {"prompt": "hi", "guided_regex": "b", "regex": "a"}, "guided_regex", "not several"),
        (C, {"prompt": "hi", "guided_json": {"type": 7}}, "guided_json", "invalid json schema"),
    ]
    if kv < ctx:
        room = (ctx + kv) // 2 - 4
        body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": room}}
        cases.append((G, body, "max_new_tokens", "KV cache"))
    return cases


@pytest.mark.timeout(120)
def test_bad_input_is_refused_naming_the_field(tiny_server, info):
    failures = []
    with _client(tiny_server) as c:
        for route, body, field, extra in _bad_cases(info):
            if isinstance(body, bytes):
                r = c.post(route, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(route, json=body)
            err = r.json().get("error", {}) if r.status_code == 400 else {}
            message = err.get("message", "")
            ok = (
                r.status_code == 400
                and err.get("type") == "invalid_request_error"
                and field in message
                and extra in message
                and field in (err.get("param") or "")
            )
            if not ok:
                failures.append((route, body, r.status_code, r.text[:200]))
        assert not failures, "\n".join(map(str, failures))
        # Still serving.
        r = c.post("/generate", json={"text": "still there?", "sampling_params": _greedy(3)})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
    _wait_idle(tiny_server)


@pytest.mark.timeout(60)
def test_body_over_the_limit_is_413(tiny_server):
    big = {"text": "x" * (9 * 1024 * 1024)}
    r = httpx.post(f"{tiny_server}/generate", json=big, timeout=60)
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]
    assert httpx.get(f"{tiny_server}/health").status_code == 200


# ---- client disconnects ---------------------------------------------------------------------------


def _long_body(info: dict[str, Any], stream: bool) -> tuple[dict[str, Any], int]:
    max_new = min(info["max_context_len"], info["kv_capacity_tokens"]) - 8
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": _greedy(max_new), "stream": stream}
    return body, max_new


@pytest.mark.timeout(120)
def test_stream_disconnect_aborts_and_frees_pages(tiny_server, info):
    before = _wait_idle(tiny_server)
    body, max_new = _long_body(info, stream=True)
    with _client(tiny_server) as c, c.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got == 2:
                break
        assert _rank(tiny_server)["stats"]["num_running"] == 1
    # The connection is closed here, long before all tokens are made.
    after = _wait_idle(tiny_server)
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < max_new


@pytest.mark.timeout(120)
def test_non_stream_disconnect_aborts_and_frees_pages(tiny_server, info):
    before = _wait_idle(tiny_server)
    body, max_new = _long_body(info, stream=False)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{tiny_server}/generate", json=body, timeout=0.3)
    after = _wait_idle(tiny_server)
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < max_new


# ---- the CLI --------------------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(180)
def test_cli_generate(tiny_server):
    for extra in ([], ["--chat"]):
        p = _cli(
            "generate", "--url", tiny_server, "--prompt", "Hello", "--max-new-tokens", "6", *extra
        )
        assert p.returncode == 0, p.stderr
        assert "tokens, finish:" in p.stderr
    p = _cli("status", "--url", tiny_server)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "request(s) in flight" in lines[0] and "rank failure(s)" in lines[0], lines[0]
    assert lines[1].split()[:4] == ["pool", "dp", "rank", "node"]
    pools = sorted(line.split()[0] for line in lines[2:])
    assert pools in (["colocated-0"], ["decode-0", "prefill-0"]), p.stdout
    # A reader that goes away (`pdserve status | head -0`): no traceback, exit 0.
    cmd = [sys.executable, "-m", "orchestrator.cli", "status", "--url", tiny_server]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.timeout(240)
def test_cli_bench(tiny_server):
    args = ["--url", tiny_server, "--num-prompts", "8", "--input-len", "16", "--output-len", "8"]
    p = _cli("bench", *args, "--concurrency", "4", "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["num_requests"] == 8 and result["num_failed"] == 0
    assert result["output_tokens"] == 64 and result["input_tokens"] == 128
    assert result["output_tok_s"] > 0 and 0 < result["ttft_p50_ms"] <= result["e2e_p99_ms"]
    p = _cli("bench", *args, "--concurrency", "8")
    assert p.returncode == 0, p.stderr
    for label in ("requests", "duration", "output tok/s", "total tok/s", "TTFT p50", "TPOT p50"):
        assert label in p.stdout
    # Plain JSON calls: the same tokens counted, no first token to time.
    p = _cli("bench", *args, "--concurrency", "4", "--no-stream", "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["num_failed"] == 0 and result["output_tokens"] == 64
    assert result["ttft_p50_ms"] is None and result["tpot_p50_ms"] is None
    assert 0 < result["e2e_p50_ms"] <= result["e2e_p99_ms"]

    # A shared system prompt of 48 tokens: counted in, and found in the prefill rank's cache.
    def hits() -> int:
        return sum(r["stats"]["num_prefix_hit_tokens"] for r in _ranks(tiny_server))

    before = hits()
    shared = [*args, "--concurrency", "1", "--shared-prefix-len", "48", "--seed", "5", "--json"]
    p = _cli("bench", *shared)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["num_failed"] == 0 and result["input_tokens"] == 8 * (48 + 16)
    assert hits() - before >= 7 * 48  # one at a time: every prompt after the first hits


# ---- timeouts and a rank that dies ----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_timeout_and_dead_rank_end_requests_with_errors(launch_tiny):
    import ray

    server = launch_tiny()
    try:
        url = server.url
        info = _rank(url)["info"]
        body, _ = _long_body(info, stream=False)
        server.router.request_timeout_s = 0.05
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        _wait_idle(url)
        server.router.request_timeout_s = None

        events: list[Any] = []
        first = threading.Event()

        def consume() -> None:
            with httpx.stream(
                "POST", f"{url}/generate", json={**body, "stream": True}, timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: ") :]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        first.set()

        whole: list[httpx.Response] = []  # a call not streamed: its tokens wait on the rank

        def call() -> None:
            whole.append(httpx.post(f"{url}/generate", json=body, timeout=60))

        reader = threading.Thread(target=consume)
        caller = threading.Thread(target=call)
        reader.start()
        caller.start()
        assert first.wait(60)
        ray.kill(server.ranks[-1], no_restart=True)  # the generating (decode) rank
        reader.join(60)
        caller.join(60)
        assert not reader.is_alive(), "the stream hung after its rank died"
        assert not caller.is_alive(), "the call hung after its rank died"
        assert events[-1] == "[DONE]"
        assert "rank" in events[-2]["error"]["message"]
        assert whole[0].status_code >= 500 and "rank" in whole[0].json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/generate", json={"text": "hi"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["message"]
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_a_failing_rank_ends_its_requests_and_is_restarted(launch_tiny):
    import ray

    server = launch_tiny(colocated=True, allow_fault_injection=True)
    try:
        url = server.url
        body = {"input_ids": list(range(5, 40)), "sampling_params": {"max_new_tokens": 8}}
        rank = server.ranks[0]
        # add_request fails inside the rank (not a refusal) and there is no other rank: 503.
        ray.get(rank.inject_fault.remote("fail_add", 1))
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert "engine rank 0" in r.json()["error"]["message"]
        assert "fail_add" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        # A step fails: its requests end with the error, the rank exits and Ray restarts it.
        pid = ray.get(rank.ready.remote()).pid
        ray.get(rank.inject_fault.remote("fail_step", 1))
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code >= 500, r.text
        assert "engine step failed" in r.json()["error"]["message"], r.text
        deadline = time.monotonic() + 90
        while True:
            health = httpx.get(f"{url}/health").status_code
            if health == 200 and server.router.rank_errors == [None]:
                info = server.router.infos[0]
                if info is not None and info.pid != pid:
                    break
            assert time.monotonic() < deadline, "the failed rank was not restarted"
            time.sleep(0.3)
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 8, r.text
        _wait_idle(url)
        metrics = httpx.get(f"{url}/metrics").text
        assert "pdserve_rank_failures_total 1.0" in metrics
        assert 'pdserve_request_finish_total{reason="error"} 1.0' in metrics
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_sigterm_drains_the_requests_in_flight_then_stops(ray_session, tiny_model_dir):
    """`pdserve serve` as users run it (its own process, joining this session's Ray cluster):
    SIGTERM refuses new requests and lets the one in flight finish, then exits 0."""
    import os
    import signal

    import ray

    cmd = [
        sys.executable, "-m", "orchestrator.cli", "serve", "--model", str(tiny_model_dir),
        "--address", ray.get_runtime_context().gcs_address, "--port", "0", "--colocated",
        "--kv-capacity-tokens", "4096", "--drain-timeout", "60",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url: list[str] = []
    serving = threading.Event()

    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line and " on http://" in line:
                url.append(line.rsplit(" on ", 1)[1].strip())
                serving.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert serving.wait(150), "".join(lines)
        base = url[0]
        n = 600
        body = {
            "input_ids": list(range(5, 30)), "stream": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
        }  # fmt: skip
        last: dict[str, Any] = {}
        first = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{base}/generate", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        last.update(json.loads(line[6:]))
                        first.set()

        consumer = threading.Thread(target=stream)
        consumer.start()
        assert first.wait(60)
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            health = httpx.get(f"{base}/health", timeout=10)
            if health.status_code == 503 and health.json()["status"] == "draining":
                break
            assert time.monotonic() < deadline, health.text
            time.sleep(0.05)
        assert httpx.get(f"{base}/v1/stats", timeout=10).json()["draining"] is True
        refused = httpx.post(f"{base}/generate", json={"text": "hi"}, timeout=30)
        assert refused.status_code == 503 and "shutting down" in refused.text, refused.text
        consumer.join(120)
        assert not consumer.is_alive()
        assert len(last["output_ids"]) == n, last.get("meta_info")
        assert last["meta_info"]["finish_reason"]["type"] == "length"
        assert proc.wait(60) == 0, "".join(lines)
        reader.join(10)
        assert any("draining 1 request(s)" in line for line in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
