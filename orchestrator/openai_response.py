"""The OpenAI-compatible answers: the response object of a whole call and the chunks of a stream
(`ResponseBuilder`), OpenAI's finish reasons, and the pick of the best of `best_of` candidates."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.outputs import Output
from orchestrator.protocol import finite
from orchestrator.tool_parser import ToolCall
from workers.engine.messages import TokenLogprob


def openai_finish_reason(out: Output, called: bool = False) -> str | None:
    """OpenAI's "stop", "length" and "tool_calls" (`called`: the output made calls, and
    ended by itself), and "abort" (vLLM's: an abort call ended it, what came before kept);
    None for a timeout or an error, which end the stream with an error."""
    if out.finish_reason == "stop" and called:
        return "tool_calls"
    return out.finish_reason if out.finish_reason in ("stop", "length", "abort") else None


@dataclass(frozen=True)
class Choice:
    """One finished completion of a non-streamed call (an echo's prompt included)."""

    text: str
    finish: Output  # the last output (finish reason, counts)
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None
    tool_calls: list[ToolCall] | None = None  # chat with tools: the calls parsed from `text`
    reasoning: str | None = None  # chat, reasoning split off: the thinking block's text
    score: float = 0.0  # mean logprob per output token, when logprobs were kept (`best_of`)


def best_choices(choices: Sequence[Choice], candidates: int, n: int) -> list[Choice]:
    """Of each prompt's `candidates` choices (prompt-major), the `n` with the highest mean
    logprob per output token, best first (a tie keeps the earlier one)."""
    if candidates == n:
        return list(choices)
    best: list[Choice] = []
    for start in range(0, len(choices), candidates):
        group = choices[start : start + candidates]
        best += sorted(group, key=lambda c: -c.score)[:n]
    return best


class ResponseBuilder:
    """Builds the response object (or the stream chunks) of one OpenAI request."""

    def __init__(
        self,
        chat: bool,
        model: str,
        token_text: Callable[[int], str] | None = None,
        hidden_ids: frozenset[int] = frozenset(),
    ):
        """`hidden_ids`: tokens the text leaves out (special ones, `Tokenizer.hidden_ids`):
        they take no room in `text_offset` (the BOS before an echoed prompt, an EOS drawn).
        Not right for a special token written into an echoed text prompt, whose text holds
        it: the offsets after it are short by its length."""
        self.chat = chat
        self.model = model
        self.hidden_ids = hidden_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        # Set when the request asked for logprobs: a token id's text, as they show it.
        self.token_text = token_text
        self._text_offsets: dict[int, int] = {}  # completions' `text_offset`, per choice

    def logprobs(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[TokenLogprob | None] | None,
        index: int = 0,
    ) -> dict[str, Any] | None:
        """The `logprobs` of a choice (or of a chunk's choice) covering `token_ids`: chat's
        `{"content": [{token, logprob, bytes, top_logprobs}]}` or completions' `{tokens,
        token_logprobs, top_logprobs, text_offset}`; None when not asked for. A None entry
        (an echoed prompt's first token) has no logprob."""
        if self.token_text is None or logprobs is None:
            return None
        text = self.token_text
        pairs = list(zip(token_ids, logprobs, strict=False))
        if self.chat:

            def item(token: int, logprob: float) -> dict[str, Any]:
                s = text(token)
                return {"token": s, "logprob": finite(logprob), "bytes": list(s.encode())}

            content = [
                {**item(t, lp.logprob), "top_logprobs": [item(i, v) for i, v in lp.top]}
                for t, lp in pairs
                if lp is not None
            ]
            return {"content": content, "refusal": None}
        tokens = [text(t) for t, _ in pairs]
        offsets = []
        offset = self._text_offsets.get(index, 0)
        for (token, _), s in zip(pairs, tokens, strict=True):
            offsets.append(offset)
            offset += 0 if token in self.hidden_ids else len(s)
        self._text_offsets[index] = offset
        top = [None if lp is None else {text(i): finite(v) for i, v in lp.top} for _, lp in pairs]
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else finite(lp.logprob) for _, lp in pairs],
            "top_logprobs": top if any(lp is not None and lp.top for _, lp in pairs) else None,
            "text_offset": offsets,
        }

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }

    def response(self, choices: Sequence[Choice], n: int, completion_tokens: int) -> dict[str, Any]:
        """The whole response: `n` choices per prompt, prompt-major. `completion_tokens`: the
        tokens generated in all (more than the choices hold with `best_of`)."""
        out = []
        for index, c in enumerate(choices):
            choice: dict[str, Any] = {
                "index": index,
                "finish_reason": openai_finish_reason(c.finish, bool(c.tool_calls)),
            }
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                if c.reasoning is not None:
                    choice["message"]["reasoning_content"] = c.reasoning or None
                if c.tool_calls:
                    choice["message"]["content"] = c.text or None
                    choice["message"]["tool_calls"] = [call.openai() for call in c.tool_calls]
            else:
                choice["text"] = c.text
            choice["logprobs"] = self.logprobs(c.token_ids, c.logprobs, index)
            out.append(choice)
        return {
            **self._envelope("chat.completion" if self.chat else "text_completion"),
            "choices": out,
            "usage": self.usage(
                sum(c.finish.num_prompt_tokens for c in choices[::n]),
                completion_tokens,
                sum(c.finish.num_cached_tokens for c in choices[::n]),
            ),
        }

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        usage: Mapping[str, Any] | None = None,
        index: int = 0,
        token_ids: Sequence[int] = (),
        token_logprobs: Sequence[TokenLogprob | None] | None = None,
        tool_calls: Sequence[Mapping[str, Any]] = (),
        reasoning: str = "",
    ) -> dict[str, Any]:
        """One stream chunk of choice `index`; with `text=None`, a chunk without choices (the
        usage chunk). `token_ids` / `token_logprobs`: the tokens the chunk carries, for its
        logprobs. `tool_calls`, `reasoning`: chat's tool-call deltas and reasoning text
        (`ChatOutputParser`)."""
        obj = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        logprobs = self.logprobs(token_ids, token_logprobs, index) if token_ids else None
        if text is None:
            obj["choices"] = []
        elif self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if text or role:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = list(tool_calls)
            obj["choices"] = [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ]
        else:
            obj["choices"] = [
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ]
        obj["usage"] = dict(usage) if usage is not None else None
        return obj
