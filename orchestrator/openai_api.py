"""The OpenAI-compatible protocol: `/v1/completions` and `/v1/chat/completions` bodies in,
response objects and stream chunks out. Validation follows `orchestrator.protocol`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from orchestrator.protocol import Fields, RequestError, SamplingRequest, read_sampling
from orchestrator.router import Output

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Features pdserve does not implement are refused unless set to their no-op value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "suffix": ("",),
    "parallel_tool_calls": (True, False),
}


@dataclass(frozen=True)
class CompletionBody:
    """A `/v1/completions` or `/v1/chat/completions` request.

    Completions give `prompt` (text) or `prompt_ids`; chat gives `messages` (role, text)."""

    model: str | None
    prompt: str | None
    prompt_ids: list[int] | None
    messages: list[dict[str, str]] | None
    sampling: SamplingRequest
    stream: bool
    include_usage: bool

    @property
    def prompt_field(self) -> str:
        return "messages" if self.messages is not None else "prompt"


def _common(f: Fields, max_tokens_key: str) -> tuple[SamplingRequest, bool, bool]:
    for key, allowed in _NEUTRAL.items():
        f.neutral(key, *allowed)
    if f.has("logit_bias") and f.obj["logit_bias"] != {}:
        raise f.fail("logit_bias", "is not supported")
    sampling = read_sampling(f, max_tokens_key)
    stream = f.get_bool("stream")
    include_usage = False
    if f.has("stream_options"):
        opts = Fields(f.obj["stream_options"], "stream_options.")
        include_usage = opts.get_bool("include_usage")
    return sampling, stream, include_usage


def parse_completion(body: Any) -> CompletionBody:
    f = Fields(body)
    sampling, stream, include_usage = _common(f, "max_tokens")
    if sampling.max_new_tokens is None:  # OpenAI's documented default for completions
        sampling = replace(sampling, max_new_tokens=16)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    text: str | None = None
    ids: list[int] | None = None
    if prompt is None:
        raise RequestError("prompt: a prompt is required", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt: the prompt is empty", "prompt")
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise RequestError("prompt: batches of prompts are not supported; send one", "prompt")
    else:
        ids = Fields({"prompt": prompt}).token_ids("prompt")
        if not ids:
            raise RequestError("prompt: the prompt is empty", "prompt")
    return CompletionBody(f.get_str("model"), text, ids, None, sampling, stream, include_usage)


def parse_chat(body: Any) -> CompletionBody:
    f = Fields(body)
    max_key = "max_completion_tokens" if f.has("max_completion_tokens") else "max_tokens"
    sampling, stream, include_usage = _common(f, max_key)
    if f.has("tools") and f.obj["tools"] != []:
        raise f.fail("tools", "function calling is not supported")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise f.fail("response_format", "only {'type': 'text'} is supported")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages: expected a non-empty list of messages", "messages")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    return CompletionBody(f.get_str("model"), None, None, messages, sampling, stream, include_usage)


def _message(raw: Any, index: int) -> dict[str, str]:
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
    message = {"role": role, "content": content}
    name = f.get_str("name")
    if name is not None:
        message["name"] = name
    return message


def openai_finish_reason(out: Output) -> str | None:
    """OpenAI knows "stop" and "length"; aborts and errors end the stream with an error."""
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


class ResponseBuilder:
    """Builds the response object (or the stream chunks) of one OpenAI request."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def response(self, text: str, finish: Output) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": openai_finish_reason(finish)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        return {
            **self._envelope("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": self.usage(finish.num_prompt_tokens, finish.num_output_tokens),
        }

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        usage: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """One stream chunk; with `text=None`, a chunk without choices (the usage chunk)."""
        obj = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        if text is None:
            obj["choices"] = []
        elif self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text or role:
                delta["content"] = text
            obj["choices"] = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ]
        else:
            obj["choices"] = [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            ]
        obj["usage"] = dict(usage) if usage is not None else None
        return obj
