"""Reasoning: a thinking block split off as `reasoning_content`, streamed in random pieces and
whole; a constraint held only after the block; through the server with the tiny model's
template opening the block (`chat_template_kwargs: {"thinking": true}`), checked against
`transformers`' rendering of the same template."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import jsonschema
import pytest

from orchestrator.chat_output import ChatOutputParser, ChatOutputSpec, read_chat_output
from orchestrator.reasoning import (
    THINK_BEGIN,
    THINK_END,
    ReasoningParser,
    after_reasoning,
    opens_reasoning,
    template_reasons,
)
from orchestrator.tool_parser import FORMATS
from tests.text_pieces import random_pieces
from workers.engine.messages import OutputConstraint
from workers.model.tiny import CHAT_TEMPLATE

pytestmark = pytest.mark.timeout(300)

PIECES = ["a", " ", "\n", "<", "</", "think", ">", "</thin", "é", "漢", "<think", "x y"]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 20))).replace(THINK_END, "")


def _feed(parser: ReasoningParser, text: str, rng: random.Random) -> tuple[str, str]:
    out = [parser.feed(piece) for piece in random_pieces(text, rng, 6)]
    out.append(parser.finish())
    return "".join(s.reasoning for s in out), "".join(s.content for s in out)


@pytest.mark.parametrize("seed", range(60))
def test_the_block_comes_apart_from_the_answer_however_it_streams(seed):
    rng = random.Random(seed)
    thought, answer = _random_text(rng), _random_text(rng).lstrip() or "ok"
    opened = seed % 2 == 0
    text = ("" if opened else THINK_BEGIN) + thought + THINK_END + "\n\n" + answer
    assert _feed(ReasoningParser(open=opened), text, rng) == (thought, answer)
    # Never closed (cut off by the length): all of it is reasoning.
    unclosed = ("" if opened else THINK_BEGIN) + thought
    assert _feed(ReasoningParser(open=opened), unclosed, rng) == (thought, "")
    # No block at all: the answer exactly as written, blanks and all.
    plain = " " + answer
    if not plain.lstrip().startswith(THINK_BEGIN):
        assert _feed(ReasoningParser(), plain, rng) == ("", plain)


def test_tool_calls_are_read_from_the_answer_only():
    fmt = FORMATS["deepseek_v3"]
    call = fmt.render([("f", '{"a": 1}')])
    text = "thinking about " + call + THINK_END + "Sure. " + call
    spec = ChatOutputSpec(fmt, reasoning=True, reasoning_open=True)
    thought, content, calls = read_chat_output(spec, text)
    assert thought == "thinking about " + call
    assert content == "Sure. " and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
    parser = ChatOutputParser(spec)
    deltas = [parser.feed(ch) for ch in text[:-1]] + [parser.feed(text[-1], final=True)]
    assert "".join(d.reasoning for d in deltas) == thought
    assert "".join(d.content for d in deltas) == "Sure. "
    assert parser.called and sum(len(d.tool_calls) for d in deltas) >= 1
    assert opens_reasoning("<｜Assistant｜><think>\n") and not opens_reasoning("<think>a")
    assert template_reasons(CHAT_TEMPLATE) and not template_reasons("{{ messages }}")


def test_a_constraint_after_reasoning_holds_only_the_answer(tiny_model_dir):
    from orchestrator.tokenizer import Tokenizer
    from workers.engine.grammar import GrammarBackend

    tok = Tokenizer.from_dir(tiny_model_dir)
    backend = GrammarBackend(tiny_model_dir, tok.vocab_size, tok.eos_token_ids)
    held = after_reasoning(OutputConstraint("regex", "(yes|no)"))

    def accepts(text: str) -> bool:
        matcher = backend.matcher(held, [], ignore_eos=False)
        return all(matcher.accept(t) for t in tok.encode(text, add_special_tokens=False))

    assert accepts("maybe? {not json} " + THINK_END + "yes")
    assert not accepts("hmm" + THINK_END + "maybe")
    assert not accepts("hmm" + THINK_END + "yes" + THINK_END)


# ---- through the server ------------------------------------------------------------------------

ASK = [{"role": "user", "content": "Is the sky blue?"}]
THINK = {"thinking": True}


def _chat(url: str, **body: Any) -> dict[str, Any]:
    body = {"messages": ASK, "max_tokens": 24, "temperature": 0.0, **body}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def test_thinking_through_the_server(tiny_server, tiny_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = hf.apply_chat_template(
        ASK, tokenize=False, add_generation_prompt=True, thinking=True
    )
    ids = httpx.post(f"{tiny_server}/tokenize", timeout=30,
                     json={"messages": ASK, "chat_template_kwargs": THINK}).json()["tokens"]  # fmt: skip
    assert ids == hf.encode(reference, add_special_tokens=False) and reference.endswith(THINK_BEGIN)
    think_end = hf.convert_tokens_to_ids(THINK_END)

    # The random model never closes the block: all of its text is reasoning.
    whole = _chat(tiny_server, chat_template_kwargs=THINK, ignore_eos=True)
    raw = _chat(tiny_server, chat_template_kwargs=THINK, ignore_eos=True, separate_reasoning=False)
    assert whole["message"]["reasoning_content"] == raw["message"]["content"] != ""
    assert whole["message"]["content"] == "" and "reasoning_content" not in raw["message"]
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", timeout=120, json={
        "messages": ASK, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
        "chat_template_kwargs": THINK, "stream": True,
    }) as resp:  # fmt: skip
        deltas = [json.loads(line[6:])["choices"][0]["delta"]
                  for line in resp.iter_lines() if line[6:7] == "{"]  # fmt: skip
    assert "".join(d.get("reasoning_content", "") for d in deltas) == raw["message"]["content"]
    assert not any(d.get("content") for d in deltas)

    # A constraint leaves the thinking free: the same tokens as without one.
    free = _chat(tiny_server, chat_template_kwargs=THINK, ignore_eos=True,
                 response_format={"type": "json_object"})  # fmt: skip
    assert free["message"]["reasoning_content"] == whole["message"]["reasoning_content"]
    # Closed at once (a bias on </think>), then held to a JSON object: the answer is JSON.
    bias = {str(think_end): 100}
    shaped = _chat(tiny_server, chat_template_kwargs=THINK, logit_bias=bias, max_tokens=64,
                   response_format={"type": "json_object"})  # fmt: skip
    assert shaped["message"]["reasoning_content"] is None
    if shaped["finish_reason"] == "stop":
        assert isinstance(json.loads(shaped["message"]["content"]), dict)
    assert shaped["message"]["content"].startswith("{")
    # A required tool choice after thinking.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "answer", "parameters": schema}}]
    called = _chat(tiny_server, chat_template_kwargs=THINK, logit_bias=bias, max_tokens=64,
                   tools=tools, tool_choice="required")  # fmt: skip
    assert called["finish_reason"] == "tool_calls", called
    (call,) = called["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    # Without thinking the prompt leaves no block open and the answer is all content.
    plain = _chat(tiny_server)
    assert plain["message"]["reasoning_content"] is None and plain["message"]["content"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"chat_template_kwargs": [1]}, "object"),
        ({"chat_template_kwargs": {"messages": []}}, "set by the server"),
        ({"separate_reasoning": "yes"}, "true or false"),
    ],
)
def test_bad_reasoning_fields_are_refused(tiny_server, body, words):
    resp = httpx.post(f"{tiny_server}/v1/chat/completions", json={"messages": ASK, **body},
                      timeout=30)  # fmt: skip
    assert resp.status_code == 400 and words in resp.json()["error"]["message"]
