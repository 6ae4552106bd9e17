"""Edges of the OpenAI routes an audit found: the `model` a request names, template variables
named like Python's own, duplicate stop token ids."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

C, CHAT = "/v1/completions", "/v1/chat/completions"


def _served(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"])


def test_an_unknown_model_is_404_and_replies_name_the_served_one(tiny_server):
    served = _served(tiny_server)
    body = {"prompt": "hi", "max_tokens": 2, "model": "gpt-4"}
    r = httpx.post(f"{tiny_server}{C}", json=body, timeout=30)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4" in error["message"] and served in error["message"]
    for model in (served, "", None):  # the served name, or none
        body = {"prompt": "hi", "max_tokens": 2, "model": model}
        r = httpx.post(f"{tiny_server}{C}", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == served, r.text


def test_template_variables_named_like_keywords_are_just_variables(tiny_server):
    body = {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "chat_template_kwargs": {"self": 1, "extra": 2},
    }  # fmt: skip
    r = httpx.post(f"{tiny_server}{CHAT}", json=body, timeout=30)
    assert r.status_code == 200, r.text


def test_repeated_stop_token_ids_count_once(tiny_server):
    body = {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [7] * 1000}
    r = httpx.post(f"{tiny_server}{C}", json=body, timeout=30)
    assert r.status_code == 200, r.text


def test_vllm_structured_outputs_hold_the_output(tiny_server):
    body = {"prompt": "hi", "max_tokens": 8, "structured_outputs": {"choice": ["yes", "no"]}}
    r = httpx.post(f"{tiny_server}{C}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")


def test_add_generation_prompt_false_leaves_the_assistant_turn_unopened(tiny_server):
    messages = [{"role": "user", "content": "hi"}]
    prompts = []
    for opened in (True, False):
        body = {"messages": messages, "max_tokens": 1, "add_generation_prompt": opened}
        r = httpx.post(f"{tiny_server}{CHAT}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        prompts.append(r.json()["usage"]["prompt_tokens"])
    assert prompts[0] > prompts[1], prompts


def test_a_rid_that_is_running_is_a_409(tiny_server):
    body = {"text": "hi", "rid": "twice", "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}  # fmt: skip
    with (
        httpx.Client(base_url=tiny_server, timeout=60) as c,
        c.stream("POST", "/generate", json=body) as first,
    ):
        lines = first.iter_lines()
        while not next(lines).startswith("data: {"):  # (a keep-alive may come first)
            pass
        r = c.post("/generate", json={**body, "stream": False})  # the first is running
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "duplicate_request" and error["param"] == "rid"
        assert c.post("/abort_request", json={"rid": "twice"}).status_code == 200


def test_structured_outputs_are_checked_off_the_loop():
    """(Found by a review: the new field was checked inline, on the router's loop.)"""
    from orchestrator.sampling_request import mentions_constraint

    assert mentions_constraint({"prompt": "x", "structured_outputs": {"regex": "a"}})
    assert not mentions_constraint({"prompt": "x"})
