"""Tool calling: the DeepSeek formats' parser against the chat template's own rendering of
past calls, streamed in random pieces; `tools` / `tool_choice` through the disaggregated
server (required and named choices held to the tools' schemas, checked with `jsonschema`; the
prompt equal to `transformers`' chat template with the same tools); bad input refused."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import jsonschema
import pytest
import tokenizers

from orchestrator.request_fields import Fields, RequestError
from orchestrator.tokenizer import Tokenizer
from orchestrator.tool_parser import (
    CALL_BEGIN,
    CALLS_BEGIN,
    CALLS_END,
    FORMATS,
    MARKERS,
    ToolCallParser,
    detect_format,
    parse_tool_calls,
)
from orchestrator.tools import chat_prompt, read_tools
from tests.text_pieces import random_pieces
from workers.model.tiny import CHAT_TEMPLATE

pytestmark = pytest.mark.timeout(300)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "Weather in Paris, and the time?"}]


def _random_calls(rng: random.Random) -> list[tuple[str, str]]:
    """Calls with arguments that hold what could trip a parser: markers' first characters,
    backticks, newlines, braces, non-ASCII text."""
    pieces = ["<", "｜", "`", "```", "\n", "}", "{", "é", "漢", " ", "\\n", "tool", "▁"]
    calls = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["get_weather", "get_time", "a.b-c_9"])
        value = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        args = json.dumps({"q": value, "n": rng.randint(-5, 5)}, ensure_ascii=False)
        calls.append((name, args))
    return calls


def _stream(fmt_name: str, text: str, rng: random.Random, parallel: bool = True):
    """`text` fed in random pieces: (content, {index: (id, name, arguments)})."""
    parser = ToolCallParser(FORMATS[fmt_name], parallel)
    deltas = [parser.feed(piece) for piece in random_pieces(text, rng, 7)]
    deltas.append(parser.finish())
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for tc in d.tool_calls:
            if "id" in tc:
                assert tc["index"] not in calls, "a call started twice"
                calls[tc["index"]] = [tc["id"], tc["function"]["name"], ""]
            calls[tc["index"]][2] += tc["function"]["arguments"]
    content = "".join(d.content for d in deltas)
    return content, {i: tuple(c) for i, c in calls.items()}, parser


def _template_rendering(calls: list[tuple[str, str]], content: str = "") -> str:
    """The assistant turn as the tiny model's chat template writes it (jinja, not the
    parser's module), without the turn's markers around it."""
    tok = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), chat_template=CHAT_TEMPLATE)
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    message["tool_calls"] = [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
        for i, (n, a) in enumerate(calls)
    ]
    text = tok.apply_chat_template([message], add_generation_prompt=False)
    return text.removeprefix("<｜Assistant｜>").removesuffix("<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("seed", range(40))
def test_the_parser_reads_back_what_the_chat_template_writes(seed):
    rng = random.Random(seed)
    calls = _random_calls(rng)
    content = rng.choice(["", "Let me look that up. ", "a < b ｜ c"])
    text = _template_rendering(calls, content)
    assert text.startswith(content + CALLS_BEGIN)
    assert detect_format(CHAT_TEMPLATE).name == "deepseek_v3"
    parsed_content, parsed = parse_tool_calls(FORMATS["deepseek_v3"], text)
    assert parsed_content == content
    assert [(c.name, c.arguments) for c in parsed] == calls
    streamed_content, streamed, parser = _stream("deepseek_v3", text, rng)
    assert streamed_content == content
    assert [(name, args) for _, name, args in streamed.values()] == calls
    assert [c.id for c in parser.tool_calls] == [cid for cid, _, _ in streamed.values()]


@pytest.mark.parametrize("seed", range(20))
def test_deepseek_v31_calls_and_text_around_them(seed):
    rng = random.Random(seed)
    calls = _random_calls(rng)
    fmt = FORMATS["deepseek_v31"]
    text = "before " + fmt.render(calls) + " after"
    content, parsed = parse_tool_calls(fmt, text)
    assert content == "before  after"
    assert [(c.name, c.arguments) for c in parsed] == calls
    streamed_content, streamed, _ = _stream("deepseek_v31", text, rng)
    assert streamed_content == content
    assert [(n, a) for _, n, a in streamed.values()] == calls


def test_tolerated_variants_unended_calls_and_one_call_only():
    v3 = FORMATS["deepseek_v3"]
    # No outer brackets, no closing fence: still a call.
    loose = CALL_BEGIN + 'function<｜tool▁sep｜>f\n```json\n{"a": 1}<｜tool▁call▁end｜>'
    assert [(c.name, c.arguments) for c in parse_tool_calls(v3, loose)[1]] == [("f", '{"a": 1}')]
    # Cut off inside the arguments: no call, and the text is kept as content.
    cut = "hi " + v3.render([("f", '{"a": 1}')])[:-30]
    content, calls = parse_tool_calls(v3, cut)
    assert calls == [] and content == cut
    # A marker's first characters that turn out to be text come out as text.
    assert parse_tool_calls(v3, "x <｜tool▁cal y") == ("x <｜tool▁cal y", [])
    assert parse_tool_calls(v3, "x <｜") == ("x <｜", [])
    two = v3.render([("f", "{}"), ("g", "{}")])
    _, first = parse_tool_calls(v3, two, parallel=False)
    assert [c.name for c in first] == ["f"]
    content, streamed, _ = _stream("deepseek_v3", two, random.Random(0), parallel=False)
    assert content == "" and [n for _, n, _ in streamed.values()] == ["f"]
    assert detect_format("{{ c.name + '<｜tool▁sep｜>' + c.arguments }}").name == "deepseek_v31"


def test_markers_stay_in_decoded_text_where_they_are_special_tokens():
    bpe = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]"))
    bpe.decoder = tokenizers.decoders.Fuse()  # tokens joined as they are
    bpe.add_special_tokens(["<s>", *MARKERS])
    tok = Tokenizer(bpe, bos_token="<s>")
    s, calls_begin = bpe.token_to_id("<s>"), bpe.token_to_id(CALLS_BEGIN)
    assert tok.decode([s, 0, calls_begin, 0]) == "a" + CALLS_BEGIN + "a"
    assert tok.decode([s, 0], skip_special_tokens=False) == "<s>a"


def test_a_template_without_tools_gets_them_in_a_system_message():
    plain = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    tok = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), chat_template=plain)
    assert not tok.renders_tools
    req = read_tools(Fields({"tools": TOOLS}))
    fmt = FORMATS["deepseek_v3"]
    text = chat_prompt(tok, [{"role": "system", "content": "Be brief."}, *ASK], req, fmt)
    assert text.startswith("[system]Be brief.\n\n## Tools")
    assert "### get_weather\nThe forecast\nParameters: " + json.dumps(WEATHER) in text
    assert fmt.call_prefix("NAME") in text and text.endswith("[user]" + ASK[0]["content"])
    none = read_tools(Fields({"tools": TOOLS, "tool_choice": "none"}))
    assert chat_prompt(tok, ASK, none, fmt) == "[user]" + ASK[0]["content"]


# ---- through the server ------------------------------------------------------------------------


def _chat(url: str, **body: Any) -> httpx.Response:
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 96, "temperature": 0.0, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _check_calls(calls: list[dict[str, Any]]) -> None:
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def test_required_and_named_tool_choices_call_tools_that_fit_their_schemas(tiny_server):
    required = _chat(tiny_server, tool_choice="required").json()["choices"][0]
    assert required["finish_reason"] == "tool_calls"
    assert required["message"]["content"] is None
    _check_calls(required["message"]["tool_calls"])
    for name in SCHEMAS:
        choice = {"type": "function", "function": {"name": name}}
        for seed in range(3):
            body = {"tool_choice": choice, "temperature": 1.0, "seed": seed}
            out = _chat(tiny_server, **body).json()["choices"][0]
            assert out["finish_reason"] == "tool_calls", out
            calls = out["message"]["tool_calls"]
            assert [c["function"]["name"] for c in calls] == [name]
            _check_calls(calls)
    single = _chat(tiny_server, tool_choice="required", parallel_tool_calls=False, n=3, seed=1,
                   temperature=1.0).json()  # fmt: skip
    for choice in single["choices"]:
        assert len(choice["message"]["tool_calls"]) == 1
        _check_calls(choice["message"]["tool_calls"])


def test_a_streamed_call_equals_the_whole_one(tiny_server):
    whole = _chat(tiny_server, tool_choice="required").json()["choices"][0]["message"]
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", timeout=120, json={
        "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 96,
        "temperature": 0.0, "stream": True,
    }) as resp:  # fmt: skip
        assert resp.status_code == 200
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line[6:7] == "{"]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for event in events:
        choice = event["choices"][0]
        finish = choice["finish_reason"] or finish
        assert not choice["delta"].get("content")
        for tc in choice["delta"].get("tool_calls", []):
            if "id" in tc:
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert finish == "tool_calls"
    assert list(calls.values()) == [c["function"] for c in whole["tool_calls"]]


def test_auto_and_none_tool_choices_and_a_conversation_with_tool_results(
    tiny_server, tiny_model_dir
):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    past = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}  # fmt: skip
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [past]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    for messages, tools in [(ASK, TOOLS), (turns, TOOLS), (turns, None)]:
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        ids = httpx.post(f"{tiny_server}/tokenize", json=body, timeout=30).json()["tokens"]
        reference = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
        assert ids == hf.encode(reference, add_special_tokens=False)
    # The random model writes no call of its own accord: text, finished as usual.
    auto = _chat(tiny_server, messages=turns, max_tokens=24).json()["choices"][0]
    assert auto["finish_reason"] in ("stop", "length") and "tool_calls" not in auto["message"]
    none = _chat(tiny_server, tool_choice="none", max_tokens=24).json()
    plain = _chat(tiny_server, tools=[], max_tokens=24).json()
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": {"a": 1}}, "tools", "list"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0].type", "function"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            "letters",
        ),  # fmt: skip
        ({"tools": [{"type": "function"}]}, "tools[0].function", "object"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "twice"),
        ({"tool_choice": "always"}, "tool_choice", "none, auto, required"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among",
        ),  # fmt: skip
        ({"tools": [], "tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot go with",
        ),  # fmt: skip
        (
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}},
                        },
                    }
                ],
            },
            "tools",
            "invalid JSON schema",
        ),  # fmt: skip
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "id"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
            "messages[0].tool_calls[0].function.name",
            "name",
        ),  # fmt: skip
    ],
)
def test_bad_tool_requests_are_refused_naming_the_field(tiny_server, body, param, words):
    resp = _chat(tiny_server, **body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_read_tools_defaults():
    assert read_tools(Fields({})) is None
    assert read_tools(Fields({"tools": [], "tool_choice": "none"})) is None
    req = read_tools(Fields({"tools": TOOLS}))
    assert req is not None and req.choice == "auto" and req.active and not req.constrained
    assert req.parallel and req.forced is None
    with pytest.raises(RequestError):
        read_tools(Fields({"tools": TOOLS, "parallel_tool_calls": "yes"}))
    assert CALLS_END in FORMATS["deepseek_v31"].render([("f", "{}")])


def test_structural_tags_on_the_openai_and_sglang_routes(tiny_server):
    """A structural tag held the output: `<w>` JSON that fits the schema `</w>`."""
    content = {"type": "json_schema", "json_schema": WEATHER, "max_whitespace_cnt": 1}
    tag = {"type": "tag", "begin": "<w>", "content": content, "end": "</w>"}
    openai_body = {
        "messages": ASK, "max_tokens": 64, "temperature": 0.0,
        "response_format": {"type": "structural_tag", "format": tag},
    }  # fmt: skip
    sglang_body = {"text": "Weather?", "sampling_params": {
        "max_new_tokens": 64, "temperature": 0.0,
        "structural_tag": json.dumps({"type": "structural_tag", "format": tag}),
    }}  # fmt: skip
    chat = httpx.post(f"{tiny_server}/v1/chat/completions", json=openai_body, timeout=120)
    gen = httpx.post(f"{tiny_server}/generate", json=sglang_body, timeout=120)
    texts = [chat.json()["choices"][0]["message"]["content"], gen.json()["text"]]
    for text in texts:
        assert text.startswith("<w>") and text.endswith("</w>"), text
        jsonschema.validate(json.loads(text[3:-4]), WEATHER)
    bad = {**openai_body, "response_format": {"type": "structural_tag", "format": {"type": "x"}}}
    resp = httpx.post(f"{tiny_server}/v1/chat/completions", json=bad, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format"
    assert "structural tag" in resp.json()["error"]["message"]


def test_the_older_structural_tag_form_is_converted():
    from orchestrator.sampling_request import read_constraint
    from workers.engine.grammar import check_constraint

    legacy = {"structures": [{"begin": "<f>", "schema": WEATHER, "end": "</f>"}],
              "triggers": ["<f"]}  # fmt: skip
    constraint = read_constraint(Fields({"structural_tag": legacy}))
    assert constraint is not None and constraint.kind == "structural_tag"
    spec = json.loads(constraint.spec)["format"]
    assert spec["type"] == "triggered_tags" and spec["triggers"] == ["<f"]
    assert spec["tags"][0]["content"]["json_schema"] == WEATHER
    check_constraint(constraint)
    with pytest.raises(RequestError, match="triggers"):
        read_constraint(Fields({"structural_tag": {"structures": [], "triggers": "<f"}}))
    with pytest.raises(RequestError, match="not JSON"):
        read_constraint(Fields({"structural_tag": "{"}))
