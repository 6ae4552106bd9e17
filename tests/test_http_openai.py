"""The OpenAI-compatible routes on the shared tiny server: `/v1/completions` and
`/v1/chat/completions` through the official `openai` client, a batch of prompts in one
completions call, `n` choices on every route (`/generate` too), and `best_of`."""

from __future__ import annotations

from typing import Any

import pytest

from tests.http_calls import _client, _sse, _wait_idle


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
