"""Structured output: outputs held to a regex, a JSON schema or an EBNF grammar.

Checked with tools independent of xgrammar: a constrained greedy run must equal a reference loop
over `transformers`' logits whose allowed tokens come from a brute-force partial match of every
token with the `regex` module; JSON outputs must pass `jsonschema`; through the disaggregated
server (the prefill rank draws the first token under the constraint, the decode rank goes on
from it) the tokens must equal an in-process engine's."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
import regex
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import (
    FinishReason,
    GenerateRequest,
    OutputConstraint,
    SamplingParams,
)

transformers = pytest.importorskip("transformers")

ANSWER = r"(yes|no|maybe), [a-z]{2,7}( [a-z]{2,7})?\."
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["color", "ok", "count", "name", "tags"],
    "additionalProperties": False,
}


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte, inverted: printable
    bytes stand for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _token_bytes(model_dir) -> tuple[list[bytes | None], set[int]]:
    """Each token's bytes (None for special tokens) and the special ids, from tokenizer.json."""
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    decoder = _byte_decoder()
    vocab: dict[str, int] = spec["model"]["vocab"]
    size = max([*vocab.values(), *(t["id"] for t in spec["added_tokens"])]) + 1
    special = {t["id"] for t in spec["added_tokens"]}
    out: list[bytes | None] = [None] * size
    for text, i in vocab.items():
        if i not in special:
            out[i] = bytes(decoder[c] for c in text)
    return out, special


def _engine(model_dir) -> Engine:
    return Engine(
        model_dir, EngineConfig(device="cpu", page_size=4, kv_capacity_tokens=4096), progress=False
    )


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, Any]:
    """Tokens and the last delta of each request."""
    for rid, (prompt, params) in requests.items():
        engine.add(GenerateRequest(rid, prompt, params))
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    last: dict[str, Any] = {}
    while engine.has_work:
        for d in engine.step():
            tokens[d.rid] += d.token_ids
            if d.finish_reason is not None:
                last[d.rid] = d
    assert engine.kv.allocator.num_free == engine.kv.num_pages  # idle cached pages count free
    return {rid: (tokens[rid], last[rid]) for rid in requests}


def _text(token_bytes: list[bytes | None], ids: list[int]) -> str:
    # xgrammar lets a JSON string hold a UTF-8-encoded surrogate code point: keep it one char.
    raw = b"".join(token_bytes[i] or b"" for i in ids)
    return raw.decode("utf-8", "surrogatepass")


@pytest.mark.timeout(300)
def test_constrained_greedy_equals_a_reference_loop_over_transformers(tiny_model_dir):
    """Token for token: at every step the reference allows exactly the tokens whose bytes
    keep the output a partial match of the regex (EOS once it is a full match), and takes
    the most likely of them under `transformers`' logits."""
    token_bytes, special = _token_bytes(tiny_model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hf.eval()
    eos = hf.config.eos_token_id
    pattern = regex.compile(ANSWER)
    prompts = [[5, 9, 200, 31], [7, 400, 12, 13, 99, 3], [600, 601]]

    def reference(prompt: list[int]) -> list[int]:
        out: list[int] = []
        text = b""
        for _ in range(40):
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + out])).logits[0, -1]
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            for t, piece in enumerate(token_bytes[: logits.shape[0]]):
                if t == eos:
                    allowed[t] = pattern.fullmatch(text.decode()) is not None
                elif piece is not None and t not in special:
                    try:
                        candidate = (text + piece).decode()
                    except UnicodeDecodeError:
                        continue  # the pattern is ASCII: no partial character can match
                    allowed[t] = pattern.fullmatch(candidate, partial=True) is not None
            assert allowed.any(), f"nothing allowed after {text!r}"
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(token)
            if token == eos:
                return out
            text += token_bytes[token] or b""
        return out

    params = SamplingParams(
        max_new_tokens=40, temperature=0.0, constraint=OutputConstraint("regex", ANSWER)
    )
    results = _run(_engine(tiny_model_dir), {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    for i, prompt in enumerate(prompts):
        ids, last = results[f"r{i}"]
        assert ids == reference(prompt), f"prompt {i}"
        assert last.finish_reason is FinishReason.STOP and ids[-1] == eos
        assert pattern.fullmatch(_text(token_bytes, ids[:-1]))


@pytest.mark.timeout(300)
def test_json_schema_outputs_validate_and_free_text_does_not(tiny_model_dir):
    token_bytes, _ = _token_bytes(tiny_model_dir)
    constraint = OutputConstraint("json_schema", json.dumps(SCHEMA))
    requests = {}
    for i in range(8):
        sampled = SamplingParams(max_new_tokens=120, temperature=1.0, seed=i, constraint=constraint)
        requests[f"s{i}"] = ([10 + i, 20, 30], sampled)
    greedy = SamplingParams(max_new_tokens=120, temperature=0.0, constraint=constraint)
    requests["greedy"] = ([10, 20, 30], greedy)
    free = SamplingParams(max_new_tokens=60, temperature=1.0, seed=0)
    requests["free"] = ([10, 20, 30], free)
    requests["object"] = (
        [44, 45],
        SamplingParams(
            max_new_tokens=200, temperature=0.0, constraint=OutputConstraint("json_object")
        ),
    )
    results = _run(_engine(tiny_model_dir), requests)
    eos = _engine_eos(tiny_model_dir)
    for rid in [*(f"s{i}" for i in range(8)), "greedy"]:
        ids, last = results[rid]
        assert last.finish_reason is FinishReason.STOP, rid
        assert ids[-1] == eos
        jsonschema.validate(json.loads(_text(token_bytes, ids[:-1])), SCHEMA)
    # Without the constraint the model's output is no JSON at all (what makes the checks
    # above mean something).
    with pytest.raises(ValueError):
        json.loads(_text(token_bytes, results["free"][0]).replace("\ufffd", ""))
    # Any JSON object: a prefix of one while it runs out of tokens, a whole one when it stops.
    ids, last = results["object"]
    text = _text(token_bytes, [t for t in ids if t != eos])
    assert text.startswith("{")
    if last.finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(text), dict)


def _engine_eos(model_dir) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["eos_token_id"])


@pytest.mark.timeout(120)
def test_grammar_completion_ends_the_request_whatever_the_length_settings(tiny_model_dir):
    token_bytes, _ = _token_bytes(tiny_model_dir)
    eos = _engine_eos(tiny_model_dir)
    ebnf = 'root ::= "id-" [0-9] [0-9] ("!" | "?")'

    def params(**kw: Any) -> SamplingParams:
        base: dict[str, Any] = {"temperature": 0.0, "constraint": OutputConstraint("ebnf", ebnf)}
        return SamplingParams(**{"max_new_tokens": 30, **base, **kw})

    results = _run(
        _engine(tiny_model_dir),
        {
            "plain": ([3, 4, 5], params()),
            # EOS ignored: it comes only when the grammar allows nothing else.
            "ignore_eos": ([3, 4, 5], params(ignore_eos=True)),
            "open_ended": (
                [3, 4, 5],
                params(ignore_eos=True, constraint=OutputConstraint("regex", "[a-z]+")),
            ),
            # A minimum length that would ban EOS past the grammar's end: the grammar wins.
            "min_tokens": ([3, 4, 5], params(min_new_tokens=25)),
            # Too short for the grammar: cut at the length, a prefix of a match.
            "short": ([3, 4, 5], params(max_new_tokens=2)),
        },
    )
    full = regex.compile(r"id-[0-9]{2}[!?]")
    for rid in ("plain", "min_tokens", "ignore_eos"):
        ids, last = results[rid]
        assert last.finish_reason is FinishReason.STOP and last.error is None, rid
        assert ids[-1] == eos and full.fullmatch(_text(token_bytes, ids[:-1])), rid
    ids, last = results["open_ended"]  # may always go on: runs to its length
    assert last.finish_reason is FinishReason.LENGTH and len(ids) == 30 and eos not in ids
    assert regex.fullmatch("[a-z]+", _text(token_bytes, ids))
    ids, last = results["short"]
    assert last.finish_reason is FinishReason.LENGTH and len(ids) == 2
    assert full.fullmatch(_text(token_bytes, ids), partial=True)


@pytest.mark.timeout(60)
def test_a_bad_constraint_is_refused_by_the_rank(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    for constraint, words in [
        (OutputConstraint("regex", "(ab"), "regex: "),
        (OutputConstraint("json_schema", "{not json"), "json_schema: "),
        (OutputConstraint("ebnf", "root ::= missing_rule"), "ebnf: "),
        (OutputConstraint("xml", "<a/>"), "kind must be one of"),
    ]:
        with pytest.raises(ValueError, match=words):
            engine.add(GenerateRequest("bad", [1, 2], SamplingParams(constraint=constraint)))
    assert not engine.requests


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + path, json=body, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.timeout(300)
def test_structured_output_through_the_disaggregated_server(tiny_server, tiny_model_dir):
    """The server's tokens equal the in-process engine's under each kind of constraint, on
    every route, streamed or not."""
    token_bytes, _ = _token_bytes(tiny_model_dir)
    prompt = [11, 12, 13, 14, 15]
    kinds = {
        "regex": OutputConstraint("regex", ANSWER),
        "json_schema": OutputConstraint("json_schema", json.dumps(SCHEMA)),
        "ebnf": OutputConstraint("ebnf", 'root ::= "v" [0-9]+ "."'),
    }
    params = {
        k: SamplingParams(max_new_tokens=96, temperature=0.0, constraint=c)
        for k, c in kinds.items()
    }
    expected = _run(_engine(tiny_model_dir), {k: (prompt, p) for k, p in params.items()})
    eos = _engine_eos(tiny_model_dir)
    for kind, constraint in kinds.items():
        sp = {"max_new_tokens": 96, "temperature": 0.0, kind: constraint.spec}
        out = _post(tiny_server, "/generate", {"input_ids": prompt, "sampling_params": sp})
        assert out["output_ids"] == expected[kind][0], kind
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        with httpx.stream(
            "POST", tiny_server + "/generate", timeout=120, trust_env=False,
            json={"input_ids": prompt, "sampling_params": sp, "stream": True},
        ) as r:  # fmt: skip
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["output_ids"] == expected[kind][0], kind
    ids = expected["json_schema"][0]
    assert ids[-1] == eos
    text = _text(token_bytes, ids[:-1])
    # OpenAI: response_format, on chat and completions.
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    comp = _post(
        tiny_server, "/v1/completions",
        {"prompt": prompt, "max_tokens": 96, "temperature": 0, "response_format": fmt},
    )  # fmt: skip
    assert comp["choices"][0]["text"] == text and comp["choices"][0]["finish_reason"] == "stop"
    chat = _post(
        tiny_server, "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a thing, as JSON"}], "max_tokens": 96,
         "temperature": 0.7, "seed": 3, "n": 2, "response_format": fmt},
    )  # fmt: skip
    for choice in chat["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    obj = _post(
        tiny_server, "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 48, "temperature": 0,
         "response_format": {"type": "json_object"}},
    )  # fmt: skip
    content = obj["choices"][0]["message"]["content"]
    assert content.startswith("{")
    # vLLM's names: a choice among strings (quotes, backslashes, newlines kept exact), a regex.
    choices = ["yes", "no", 'maybe "so"', "a\\b", "two\nlines", "ünï"]
    for seed in range(4):
        picked = _post(
            tiny_server, "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "pick"}], "max_tokens": 24,
             "temperature": 1.0, "seed": seed, "guided_choice": choices},
        )  # fmt: skip
        assert picked["choices"][0]["message"]["content"] in choices
        assert picked["choices"][0]["finish_reason"] == "stop"
    guided = _post(
        tiny_server, "/v1/completions",
        {"prompt": prompt, "max_tokens": 64, "temperature": 0, "guided_regex": ANSWER},
    )  # fmt: skip
    assert guided["choices"][0]["text"] == _text(token_bytes, expected["regex"][0][:-1])
    if obj["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.timeout(60)
def test_the_compiler_is_built_ahead_or_refuses_saying_why(tiny_model_dir, tmp_path):
    from workers.engine.grammar import GrammarBackend

    backend = GrammarBackend(tiny_model_dir, 1024, [_engine_eos(tiny_model_dir)])
    assert not backend.ready
    backend.preload()  # what a rank's start-up thread runs
    assert backend.ready
    backend.compile(OutputConstraint("regex", "a+"))
    # A checkpoint without a tokenizer: nothing to preload, and a constrained request is
    # refused with the reason.
    bare = GrammarBackend(tmp_path, 1024, [1])
    bare.preload()
    assert not bare.ready
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        bare.compile(OutputConstraint("regex", "a+"))


def test_length_bounded_json_strings_allow_no_raw_control_characters():
    """A JSON string with `maxLength` / `minLength` (xgrammar writes it as a run of one
    character class) takes printable characters but no raw control character, as its
    unbounded strings do: every output parses with `json.loads` (an audit drew a raw U+001F
    into a `maxLength` string before the grammar was rewritten)."""
    import xgrammar as xgr

    from workers.engine.grammar import _COMPILE, _build, _byte_compiler

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "tag": {"type": "string", "minLength": 2},
            "free": {"type": "string"},
        },
        "required": ["name", "tag", "free"],
    }
    compiled = _build(
        _byte_compiler(), _COMPILE, OutputConstraint("json_schema", json.dumps(schema))
    )
    for prefix in (
        b'{"name": "a',
        b'{"name": "ab", "tag": "x',
        b'{"name": "", "tag": "xy", "free": "q',
    ):
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(b) for b in prefix), prefix
        for control in (0x00, 0x1F, ord("\n"), ord("\t")):
            assert not matcher.accept_token(control), (prefix, control)
        assert matcher.accept_token(ord("z")) and matcher.accept_token(ord('"'))
