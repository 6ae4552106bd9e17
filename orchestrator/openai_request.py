"""The OpenAI-compatible requests: `/v1/completions` and `/v1/chat/completions` bodies read into a
`CompletionBody`. Validation follows `orchestrator.protocol`; the answers are built by
`orchestrator.openai_response`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from orchestrator.request_fields import Fields, RequestError
from orchestrator.sampling_request import (
    CONSTRAINT_FIELDS,
    MAX_BATCH_REQUESTS,
    VLLM_CONSTRAINTS,
    SamplingRequest,
    check_output_constraint,
    read_constraint,
    read_n,
    read_priority,
    read_sampling,
    read_top_logprobs,
    structural_tag,
)
from orchestrator.tokenizer import TEMPLATE_RESERVED
from orchestrator.tool_parser import FORMATS, ToolCallFormat
from orchestrator.tools import ToolRequest, read_tools, tool_constraint
from workers.engine.messages import OutputConstraint

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Features pdserve does not implement are refused unless set to their no-op value.

_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
    # vLLM's: the output's text as pdserve always writes it.
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
}
# Fields that would change the output and that pdserve does not take: refused, not ignored.
_REFUSED = {
    "functions": "the legacy function calling is not supported; give tools",
    "function_call": "the legacy function calling is not supported; give tool_choice",
    "chat_template": "a request cannot set the chat template; the model's is used",
    "continue_final_message": "continuing the last message is not supported",
    "logits_processors": "not supported",
}
# vLLM's `structured_outputs` keys, as the constraint fields they stand for.
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "grammar": "ebnf",
                       "choice": "choice", "structural_tag": "structural_tag"}  # fmt: skip


@dataclass(frozen=True)
class CompletionBody:
    """A `/v1/completions` or `/v1/chat/completions` request.

    Completions give `prompts` (each text or token ids; several: a batch); chat gives
    `messages` (role, content; an assistant's `tool_calls`, a tool's `tool_call_id`) and
    maybe `tools`."""

    model: str | None
    prompts: list[str | list[int]]
    messages: list[dict[str, Any]] | None
    sampling: SamplingRequest
    stream: bool
    include_usage: bool
    n: int = 1  # choices: each one a request of its own
    echo: bool = False  # completions: the prompt comes back before the completion
    tools: ToolRequest | None = None  # chat: the tools the model may call
    # Chat: extra variables for the chat template (vLLM's and SGLang's `chat_template_kwargs`,
    # e.g. `{"thinking": true}` for DeepSeek-V3.1), and whether a thinking block comes apart
    # as `reasoning_content` (SGLang's `separate_reasoning`).
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    separate_reasoning: bool = True
    add_generation_prompt: bool = True  # chat: the template opens the assistant's turn
    # Completions: candidates drawn per prompt, of which the `n` with the highest mean
    # logprob per output token come back (OpenAI's `best_of`; `n` when not given).
    best_of: int = 1

    @property
    def candidates(self) -> int:
        """Requests run per prompt."""
        return max(self.n, self.best_of)

    @property
    def calls_tools(self) -> bool:
        """The output is parsed for tool calls."""
        return self.tools is not None and self.tools.active

    @property
    def prompt_field(self) -> str:
        return "messages" if self.messages is not None else "prompt"


class _Common(NamedTuple):
    """What completions and chat read alike."""

    sampling: SamplingRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage
    n: int


def _common(f: Fields, max_tokens_key: str) -> _Common:
    for key, allowed in _NEUTRAL.items():
        f.neutral(key, *allowed)
    for key, why in _REFUSED.items():
        if f.obj.get(key) not in (None, False):
            raise f.fail(key, why)
    sampling = read_sampling(f, max_tokens_key, "min_tokens")  # min_tokens: vLLM's name
    sampling = replace(sampling, priority=read_priority(f))
    given = [
        c for c in (
            read_response_format(f), read_constraint(f, VLLM_CONSTRAINTS),
            read_structured_outputs(f),
        ) if c
    ]  # fmt: skip
    if (given and sampling.constraint is not None) or len(given) > 1:
        keys = [
            k for k in ("response_format", "structured_outputs", *CONSTRAINT_FIELDS,
                        *VLLM_CONSTRAINTS)
            if f.has(k)
        ]  # fmt: skip
        raise f.fail(keys[1], f"give one of {', '.join(keys)}, not several")
    if given:
        sampling = replace(sampling, constraint=given[0])
    stream = f.get_bool("stream")
    include_usage = False
    if f.has("stream_options"):
        if not stream:
            raise f.fail("stream_options", "only with stream: true")
        opts = Fields(f.obj["stream_options"], "stream_options.")
        include_usage = opts.get_bool("include_usage")
    return _Common(sampling, stream, include_usage, read_n(f))


def read_structured_outputs(f: Fields) -> OutputConstraint | None:
    """vLLM's `structured_outputs`: `{"json": schema}`, `{"regex": ...}`, `{"grammar": ...}`,
    `{"choice": [...]}`, `{"structural_tag": ...}` or `{"json_object": true}`: one of them."""
    if not f.has("structured_outputs"):
        return None
    so = Fields(f.obj["structured_outputs"], "structured_outputs.")
    unknown = sorted(set(so.obj) - {*_STRUCTURED_OUTPUTS, "json_object"})
    if unknown:
        raise so.fail(unknown[0], "not supported")
    if so.get_bool("json_object"):
        if any(so.obj.get(k) is not None for k in _STRUCTURED_OUTPUTS):
            raise so.fail("json_object", "give one kind of structured output, not several")
        return OutputConstraint("json_object")
    return read_constraint(so, _STRUCTURED_OUTPUTS)


def read_response_format(f: Fields) -> OutputConstraint | None:
    """OpenAI's `response_format`: `{"type": "text"}` (free text), `{"type": "json_object"}`
    (any JSON object), `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
    "strict": ...}}`; vLLM's `{"type": "structural_tag", "format": {...}}` (or its older
    `structures` + `triggers`)."""
    if not f.has("response_format"):
        return None
    fmt = Fields(f.obj["response_format"], "response_format.")
    kind = fmt.get_str("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return OutputConstraint("json_object")
    if kind == "structural_tag":  # the object itself is the tag (vLLM's form)
        tag = {k: v for k, v in fmt.obj.items() if k != "type"}
        text = structural_tag(f, "response_format", {"type": "structural_tag", **tag})
        return check_output_constraint(
            f, "response_format", OutputConstraint("structural_tag", text)
        )
    if kind != "json_schema":
        raise fmt.fail(
            "type", f"expected text, json_object, json_schema or structural_tag, got {kind!r}"
        )
    spec = Fields(fmt.obj.get("json_schema"), "response_format.json_schema.")
    schema = spec.obj.get("schema")
    if not isinstance(schema, dict):
        raise spec.fail("schema", "expected a JSON schema object")
    return check_output_constraint(
        spec, "schema", OutputConstraint("json_schema", json.dumps(schema))
    )


def parse_completion(body: Any) -> CompletionBody:
    f = Fields(body)
    sampling, stream, include_usage, n = _common(f, "max_tokens")
    if sampling.max_new_tokens is None:  # OpenAI's documented default for completions
        sampling = replace(sampling, max_new_tokens=16)
    echo = f.get_bool("echo")
    if f.has("logprobs"):  # completions: the number of top logprobs per token (0: none)
        top = read_top_logprobs(f, "logprobs")
        sampling = replace(sampling, logprobs=True, top_logprobs=top, prompt_logprobs=echo)
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("prompt: a prompt is required", "prompt")
    batch = (
        isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str | list) for p in prompt)
    )
    items = prompt if batch else [prompt]
    best_of = read_best_of(f, n, stream)  # n when not given
    if len(items) * best_of > MAX_BATCH_REQUESTS:
        name = f"n={n}" if best_of <= n else f"best_of={best_of}"
        raise RequestError(
            f"prompt: {len(items)} prompts x {name} make more than {MAX_BATCH_REQUESTS} requests",
            "prompt",
        )
    prompts: list[str | list[int]] = []
    for i, item in enumerate(items):
        name = f"prompt[{i}]" if batch else "prompt"
        if isinstance(item, str):
            prompts.append(item)
        else:
            ids = Fields({name: item}).token_ids(name)
            prompts.append(ids or [])
        if not prompts[-1]:
            raise RequestError(f"{name}: the prompt is empty", name)
    model = f.get_str("model")
    return CompletionBody(
        model, prompts, None, sampling, stream, include_usage, n, echo, best_of=best_of
    )


def read_best_of(f: Fields, n: int, stream: bool) -> int:
    """OpenAI's `best_of` (completions): at least `n`, at most as many as `n` may be; the
    choice is made once every candidate has ended, so it cannot be streamed."""
    if not f.has("best_of") or f.obj["best_of"] is None:
        return n
    best_of = read_n(f, "best_of")
    if best_of < n:
        raise f.fail("best_of", f"must be at least n ({n}), got {best_of}")
    if stream and best_of > n:
        raise f.fail("best_of", "cannot be streamed (the best are known only at the end)")
    return best_of


def parse_chat(
    body: Any,
    tool_format: ToolCallFormat = FORMATS["deepseek_v3"],
    marker_ids: Mapping[str, int] | None = None,
) -> CompletionBody:
    """`tool_format`: how the served model writes tool calls, `marker_ids` its markers that
    are tokens (a required or named tool choice holds the output to them)."""
    f = Fields(body)
    f.neutral("best_of", 1)  # completions only, as OpenAI has it
    max_key = "max_completion_tokens" if f.has("max_completion_tokens") else "max_tokens"
    sampling, stream, include_usage, n = _common(f, max_key)
    f.neutral("echo", False)
    top = read_top_logprobs(f, "top_logprobs")
    if f.get_bool("logprobs"):
        sampling = replace(sampling, logprobs=True, top_logprobs=top)
    elif top:
        raise f.fail("top_logprobs", "needs logprobs: true")
    tools = read_tools(f)
    constraint = tool_constraint(tools, tool_format, marker_ids) if tools is not None else None
    if constraint is not None:
        if sampling.constraint is not None:
            raise f.fail(
                "tool_choice", "a required or named tool choice cannot go with response_format "
                "or another output constraint",
            )  # fmt: skip
        sampling = replace(sampling, constraint=constraint)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages: expected a non-empty list of messages", "messages")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    model = f.get_str("model")
    return CompletionBody(
        model, [], messages, sampling, stream, include_usage, n, tools=tools,
        template_kwargs=read_template_kwargs(f),
        separate_reasoning=f.get_bool("separate_reasoning", True),
        add_generation_prompt=f.get_bool("add_generation_prompt", True),
    )  # fmt: skip


_TEMPLATE_OWN = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


def read_template_kwargs(f: Fields) -> dict[str, Any]:
    """`chat_template_kwargs`: an object of variables for the chat template (not those the
    server sets itself)."""
    raw = f.obj.get("chat_template_kwargs")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise f.fail("chat_template_kwargs", "expected an object of template variables")
    for key in raw:
        if key in _TEMPLATE_OWN:
            raise f.fail("chat_template_kwargs", f"{key!r} is set by the server, not the request")
        if key in TEMPLATE_RESERVED:
            raise f.fail("chat_template_kwargs", f"{key!r} is a name of the template language")
    return dict(raw)


def _message(raw: Any, index: int) -> dict[str, Any]:
    f = Fields(raw, f"messages[{index}].")
    role = f.get_str("role")
    if role not in CHAT_ROLES:
        raise f.fail("role", f"expected one of {', '.join(CHAT_ROLES)}, got {role!r}")
    content = raw.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            pf = Fields(part, f"messages[{index}].content[{j}].")
            if pf.get_str("type") != "text" or not isinstance(part.get("text"), str):
                raise pf.fail(
                    "type", "only text parts ({'type': 'text', 'text': ...}) are supported"
                )
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise f.fail(
            "content", f"expected a string or a list of text parts, got {type(content).__name__}"
        )
    message: dict[str, Any] = {"role": role, "content": content}
    name = f.get_str("name")
    if name is not None:
        message["name"] = name
    if role == "assistant" and raw.get("tool_calls"):
        message["tool_calls"] = _past_calls(f, raw["tool_calls"])
        if raw.get("content") is None:
            message["content"] = None  # DeepSeek's templates tell calls from text by this
    if role == "tool":
        call_id = f.get_str("tool_call_id")
        if call_id is None:
            raise f.fail("tool_call_id", "a tool message needs the id of the call it answers")
        message["tool_call_id"] = call_id
    return message


def _past_calls(f: Fields, raw: Any) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, each `{id, type, function: {name, arguments}}`
    with `arguments` as JSON text (an object given is serialized)."""
    if not isinstance(raw, list):
        raise f.fail("tool_calls", "expected a list of tool calls")
    calls = []
    for i, item in enumerate(raw):
        c = Fields(item, f"{f.prefix}tool_calls[{i}].")
        fn = Fields(item.get("function"), f"{c.prefix}function.")
        name = fn.get_str("name")
        if not name:
            raise fn.fail("name", "a tool call needs its function's name")
        args = fn.obj.get("arguments")
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        elif args is None:
            args = "{}"
        elif not isinstance(args, str):
            raise fn.fail("arguments", "expected a JSON string")
        call_id = c.get_str("id") or ""
        function = {"name": name, "arguments": args}
        calls.append({"id": call_id, "type": "function", "function": function})
    return calls
