"""Penalties, logit bias and logprobs through the disaggregated tiny server, on every route:
the prefill and decode ranks must sample as one engine in this process does, and the
logprobs (of the output, of the prompt: SGLang's `input_token_logprobs`, OpenAI's `echo`)
must be that engine's."""

from __future__ import annotations

from typing import Any

import pytest

from tests.http_calls import _client, _greedy, _sse, _wait_idle

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
        # A text prompt: its BOS is not in the echoed text and takes no room in the offsets;
        # each token's text is at its offset (found by an audit: the offsets counted BOS).
        worded = {**completion, "prompt": "hello there, world"}
        whole = c.post("/v1/completions", json=worded).json()["choices"][0]
        text, lp = whole["text"], whole["logprobs"]
        assert text.startswith("hello there, world") and lp["text_offset"][:2] == [0, 0]
        for token, offset in list(zip(lp["tokens"], lp["text_offset"], strict=True))[1:]:
            assert text[offset:].startswith(token), (token, offset, text)
    _wait_idle(tiny_server)
