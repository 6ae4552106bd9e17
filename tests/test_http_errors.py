"""What the shared tiny server refuses, and what it cleans up: bad input on every route is
answered 400 naming the field, a body over the limit 413, and a client that disconnects
(streamed or not) has its request aborted and its KV pages freed."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.http_calls import _client, _greedy, _long_body, _rank, _wait_idle

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
        (
            G,
            {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3},
            "logprob_start_len",
            "past the prompt",
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
        # A lone UTF-16 surrogate is not text (a pair is: see the test below).
        (G, b'{"text": "\\ud800"}', "text", "surrogate"),
        (G, b'{"text": "hi", "rid": "\\ud800"}', "rid", "surrogate"),
        (C, b'{"prompt": "hi", "model": "m\\udc00"}', "model", "surrogate"),
        (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
         "messages[0].content", "surrogate"),
        (G, b'{"text": "hi", "sampling_params": {"temperature": NaN}}', "temperature", "finite"),
        (G, b'{"text": "hi", "sampling_params": {"top_p": Infinity}}', "top_p", "finite"),
        (G, {"text": "hi", "sampling_params": {"repetition_penalty": 1e-300}},
         "repetition_penalty", "[0.01, 2]"),
        # Names the template's own code uses.
        (CHAT, {"messages": _USER, "chat_template_kwargs": {"namespace": 1}},
         "chat_template_kwargs", "template language"),
        (CHAT, {"messages": _USER, "chat_template_kwargs": {"loop": 1}},
         "chat_template_kwargs", "template language"),
        # Constraints no output can match fail here, not at the first token.
        (G, {"text": "hi", "sampling_params": {"ebnf": "root ::= root"}}, "ebnf", "no output"),
        (G, {"text": "hi", "sampling_params": {"regex": "[^\\s\\S]"}}, "regex", "no output"),
        (CHAT, {"messages": _USER, "guided_grammar": 'root ::= a\na ::= a "x"'},
         "guided_grammar", "no output"),
        (G, {"text": "hi", "sampling_params": {"json_schema": {"allOf": [{"type": "string"},
                                                                         {"type": "integer"}]}}},
         "json_schema", "allOf"),
        # Nested deeper than is taken (found by an audit: a 500, or a router frozen for a
        # minute): the body itself, a schema as text and as an object, a regex.
        (G, b'{"text": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body", "deeply"),
        (G, {"text": "hi", "sampling_params": {"json_schema": _deep_schema(900)}},
         "json_schema", "nested"),
        (C, {"prompt": "hi", "guided_json": json.loads(_deep_schema(70))}, "guided_json",
         "nested"),
        (G, {"text": "hi", "sampling_params": {"regex": "(" * 80 + "a" + ")" * 80}}, "regex",
         "nested"),
        # Limits an audit found missing: each costs the rank or the router per token.
        (C, {"prompt": "hi", "stop_token_ids": list(range(2100))}, "stop_token_ids", "2048"),
        (C, {"prompt": "hi", "stop": ["x" * 5000]}, "stop", "4096"),
        (C, {"prompt": "hi", "logit_bias": {"5": 100, "05": 100}}, "logit_bias", "same token"),
        (G, {"text": "hi", "rid": "r" * 300}, "rid", "256"),
        # Fields that would change the output, which pdserve does not take: refused.
        (G, {"text": "hi", "image_data": "http://x/y.png"}, "image_data", "not supported"),
        (G, {"text": "hi", "lora_path": "adapter"}, "lora_path", "not supported"),
        (CHAT, {"messages": _USER, "chat_template": "{{ 1 }}"}, "chat_template", "cannot"),
        (CHAT, {"messages": _USER, "functions": [{"name": "f"}]}, "functions", "tools"),
        (CHAT, {"messages": _USER, "continue_final_message": True}, "continue_final_message",
         "not supported"),
        (C, {"prompt": "hi", "skip_special_tokens": False}, "skip_special_tokens", "allowed"),
        (C, {"prompt": "hi", "include_stop_str_in_output": True}, "include_stop_str_in_output",
         "allowed"),
        (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
         "stream: true"),
        (C, {"prompt": "hi", "structured_outputs": {"regex": "a", "json": {}}},
         "structured_outputs.regex", "not several"),
        (C, {"prompt": "hi", "structured_outputs": {"regex": "a"}, "guided_regex": "b"},
         "guided_regex", "not several"),
        (C, {"prompt": "hi", "structured_outputs": {"whitespace": "a"}},
         "structured_outputs.whitespace", "not supported"),
        # An integer Python will not read (over 4300 digits): not a 500.
        (G, b'{"text": "hi", "x": 1' + b"1" * 5000 + b"}", "body", "JSON"),
        # A /generate batch is capped as a completions one is.
        (G, {"text": ["a"] * 257, "sampling_params": {"max_new_tokens": 1}}, "text", "256"),
        (G, {"text": ["a"] * 20, "sampling_params": {"n": 16}}, "text", "256"),
        (G, {"input_ids": [[1, 2]] * 257}, "input_ids", "256"),
    ]  # fmt: skip
    if kv < ctx:
        room = (ctx + kv) // 2 - 4
        body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": room}}
        cases.append((G, body, "max_new_tokens", "KV cache"))
    return cases


def _deep_schema(depth: int) -> str:
    """A JSON schema of arrays of arrays, `depth` deep."""
    return '{"type": "array", "items": ' * depth + '{"type": "object"}' + "}" * depth


def _greedy_ids(c: httpx.Client) -> list[int]:
    body = {"text": "still there?", "sampling_params": _greedy(3)}
    return list(c.post("/generate", json=body).json()["output_ids"])


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
        # A surrogate pair is a character; a temperature too small to divide by is greedy.
        pair = b'{"text": "\\ud83d\\ude00", "sampling_params": {"max_new_tokens": 2}}'
        r = c.post("/generate", content=pair, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        tiny = {"text": "still there?", "sampling_params": {**_greedy(3), "temperature": 1e-40}}
        assert c.post("/generate", json=tiny).json()["output_ids"] == _greedy_ids(c)
    _wait_idle(tiny_server)


@pytest.mark.timeout(60)
def test_body_over_the_limit_is_413(tiny_server):
    big = {"text": "x" * (9 * 1024 * 1024)}
    r = httpx.post(f"{tiny_server}/generate", json=big, timeout=60)
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]
    assert httpx.get(f"{tiny_server}/health").status_code == 200


# ---- client disconnects -------------------------------------------------------------------------


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


@pytest.mark.timeout(60)
def test_a_grammar_that_takes_too_long_to_check_is_refused_while_the_router_serves_on(
    tiny_server, monkeypatch
):
    """A JSON schema whose grammar takes long to check (a wide one here) is checked off the
    router's event loop and refused past `CHECK_TIMEOUT_S`; meanwhile the router answers.
    (Found by an audit: the check ran on the loop, and a schema that took a minute to check
    stalled the router until it took its ranks' silence for a hang and killed them.)"""
    import threading

    import orchestrator.sampling_request as sampling_request

    monkeypatch.setattr(sampling_request, "CHECK_TIMEOUT_S", 0.05)
    # ~1 s to check here (xgrammar's time grows faster than the properties).
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1300)}}
    answers: list[httpx.Response] = []
    call = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{tiny_server}/generate", timeout=60,
        json={"text": "hi", "sampling_params": {"max_new_tokens": 2, "json_schema": wide}},
    )))  # fmt: skip
    call.start()
    health = [httpx.get(f"{tiny_server}/health", timeout=30) for _ in range(5)]
    call.join(60)
    assert all(r.status_code == 200 for r in health)
    r = answers[0]
    assert r.status_code == 400 and "took over 0.05 s to check" in r.json()["error"]["message"]
    assert httpx.get(f"{tiny_server}/health").status_code == 200
