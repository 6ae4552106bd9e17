"""The SGLang-style `/generate` protocol: its request body, its cumulative result, and the
preparation of a call (shared by HTTP and gRPC)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from orchestrator.outputs import Output
from orchestrator.request_fields import Fields, RequestError, type_name
from orchestrator.router import Router
from orchestrator.sampling_request import (
    CONSTRAINT_FIELDS,
    MAX_BATCH_REQUESTS,
    SamplingRequest,
    parse_off_loop,
    read_n,
    read_priority,
    read_sampling,
    read_top_logprobs,
    resolve_sampling,
)
from workers.engine.messages import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from orchestrator.config import ServeConfig

MAX_RID_CHARS = 256
_SGLANG_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "no_stop_trim": (False,),
}
# SGLang `/generate` fields that would change the output and that pdserve does not take:
# refused when set, not ignored.
_SGLANG_REFUSED = (
    "image_data", "audio_data", "video_data", "input_embeds", "lora_path",
    "return_hidden_states", "custom_logit_processor",
)  # fmt: skip
_SGLANG_KNOWN = {
    "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "ignore_eos", "min_p", "min_new_tokens", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "n", "logit_bias", *CONSTRAINT_FIELDS, *_SGLANG_NEUTRAL,
}  # fmt: skip


@dataclass(frozen=True)
class GenerateCall:
    """One prompt of a `/generate` request: exactly one of `text` and `input_ids`."""

    text: str | None
    input_ids: list[int] | None
    sampling: SamplingRequest

    @property
    def prompt_field(self) -> str:
        return "text" if self.text is not None else "input_ids"


@dataclass(frozen=True)
class GenerateBody:
    calls: list[GenerateCall]
    is_batch: bool
    stream: bool
    rid: str | None
    logprob_text: bool = False  # `return_text_in_logprobs`: each logprob entry has its text
    n: int = 1  # completions per prompt (`sampling_params.n`)
    logprob_start_len: int = -1  # prompt logprobs from this position on (-1: none)


def parse_generate(body: Any) -> GenerateBody:
    f = Fields(body)
    if f.has("text") and f.has("input_ids"):
        raise RequestError("text, input_ids: give one of them, not both", "text")
    given = body.get("sampling_params") if isinstance(body, dict) else None
    # One for every prompt, or (SGLang's batch form) a list of one per prompt.
    per_prompt = isinstance(given, list)
    params: list[Any] = given if isinstance(given, list) else [given or {}]
    if per_prompt and not params:
        raise RequestError("sampling_params: an empty list; give one per prompt", "sampling_params")
    for key in _SGLANG_REFUSED:
        if body.get(key) not in (None, False, [], ""):
            raise f.fail(key, "not supported")
    priority = read_priority(f)
    samplings: list[SamplingRequest] = []
    ns: list[int] = []
    for i, obj in enumerate(params):
        sp = Fields(obj, f"sampling_params[{i}]." if per_prompt else "sampling_params.")
        for key in sp.obj:
            if key not in _SGLANG_KNOWN:
                raise sp.fail(key, "unknown sampling parameter")
        for key, allowed in _SGLANG_NEUTRAL.items():
            sp.neutral(key, *allowed)
        samplings.append(replace(read_sampling(sp, "max_new_tokens"), priority=priority))
        ns.append(read_n(sp))
    if len(set(ns)) > 1:
        raise RequestError(
            f"sampling_params: n must be the same for every prompt, got {ns}", "sampling_params"
        )
    n = ns[0]
    start = -1
    if f.get_bool("return_logprob"):
        start = f.get_int("logprob_start_len", -1) or 0
        if start < -1:
            raise f.fail(
                "logprob_start_len", f"must be -1 (no prompt logprobs) or >= 0, got {start}"
            )
        top = read_top_logprobs(f, "top_logprobs_num")
        samplings = [
            replace(s, logprobs=True, top_logprobs=top, prompt_logprobs=start >= 0)
            for s in samplings
        ]
    elif read_top_logprobs(f, "top_logprobs_num"):
        raise f.fail("top_logprobs_num", "needs return_logprob: true")
    sampling = samplings[0]
    stream = f.get_bool("stream")
    rid = f.get_str("rid")
    if rid is not None and len(rid) > MAX_RID_CHARS:  # (it is in every streamed chunk)
        raise f.fail("rid", f"at most {MAX_RID_CHARS} characters, got {len(rid)}")
    text = body.get("text")
    ids = body.get("input_ids")
    if text is None and ids is None:
        raise RequestError("text: a prompt is required (text or input_ids)", "text")
    calls: list[GenerateCall]
    is_batch = False
    if text is not None:
        if isinstance(text, list):
            if not text or not all(isinstance(t, str) for t in text):
                raise RequestError("text: expected a string or a non-empty list of strings", "text")
            calls, is_batch = [GenerateCall(t, None, sampling) for t in text], True
        elif isinstance(text, str):
            calls = [GenerateCall(text, None, sampling)]
        else:
            raise RequestError(f"text: expected a string, got {type_name(text)}", "text")
        if any(not c.text for c in calls):
            raise RequestError("text: the prompt is empty", "text")
    else:
        if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            batch = [Fields({"input_ids": x}).token_ids("input_ids") for x in ids]
            calls, is_batch = [GenerateCall(None, x, sampling) for x in batch], True
        else:
            calls = [GenerateCall(None, f.token_ids("input_ids"), sampling)]
    if per_prompt:
        if len(samplings) != len(calls):
            raise RequestError(
                f"sampling_params: {len(samplings)} given for {len(calls)} prompt(s); give one "
                "per prompt (or one object for all)", "sampling_params",
            )  # fmt: skip
        calls = [replace(c, sampling=s) for c, s in zip(calls, samplings, strict=True)]
    if is_batch and stream:
        raise RequestError(
            "stream: a batch of prompts cannot stream; send them one by one", "stream"
        )
    if len(calls) * n > MAX_BATCH_REQUESTS:
        raise RequestError(
            f"{'text' if text is not None else 'input_ids'}: {len(calls)} prompts x n={n} make "
            f"more than {MAX_BATCH_REQUESTS} requests; send fewer per call",
            "text" if text is not None else "input_ids",
        )
    if is_batch and rid is not None:
        raise RequestError("rid: a batch of prompts cannot share one rid", "rid")
    if n > 1 and rid is not None:
        raise RequestError("rid: n > 1 makes n requests, which cannot share one rid", "rid")
    return GenerateBody(
        calls, is_batch, stream, rid, f.get_bool("return_text_in_logprobs"), n, start
    )


def finish_reason_json(out: Output) -> dict[str, Any] | None:
    """SGLang's `meta_info.finish_reason`: `{"type": "stop", "matched": ...}`,
    `{"type": "length", "length": n}`, `{"type": "abort", "message": ...}`."""
    if out.finish_reason is None:
        return None
    if out.finish_reason == "stop":
        return {"type": "stop", "matched": out.matched_stop}
    if out.finish_reason == "length":
        return {"type": "length", "length": out.num_output_tokens}
    if out.finish_reason == "abort":
        return {"type": "abort", "message": out.error or "aborted by an abort call"}
    return {"type": out.finish_reason, "message": out.error}


@dataclass(frozen=True)
class GenerateResult:
    """A request's cumulative state, as `/generate` reports it (streamed or at the end)."""

    rid: str
    text: str
    output_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish: Output | None
    e2e_latency_s: float
    logprobs: list[TokenLogprob] | None = None  # one per output id, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt id, when asked

    def add(self, out: Output, e2e_latency_s: float) -> GenerateResult:
        """The state after `out`, `text` and `output_ids` cumulative."""
        ids = self.output_ids + out.token_ids
        logprobs = self.logprobs
        if out.logprobs is not None:
            logprobs = (logprobs or []) + out.logprobs
        prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        return self._after(out, e2e_latency_s, self.text + out.text, ids, logprobs, prompt_logprobs)

    def step(self, out: Output, e2e_latency_s: float) -> GenerateResult:
        """The state after `out`, with `text`, `output_ids` and logprobs only what `out` adds
        (an incremental stream's event; the counts stay cumulative)."""
        logprobs = None if out.logprobs is None else list(out.logprobs)
        return self._after(
            out, e2e_latency_s, out.text, list(out.token_ids), logprobs, out.prompt_logprobs
        )

    def _after(
        self,
        out: Output,
        e2e_latency_s: float,
        text: str,
        output_ids: list[int],
        logprobs: list[TokenLogprob] | None,
        prompt_logprobs: list[TokenLogprob | None] | None,
    ) -> GenerateResult:
        # The constructor, not `dataclasses.replace` (which inspects the fields each call):
        # a stream adds once per token.
        return GenerateResult(
            self.rid,
            text,
            output_ids,
            out.num_prompt_tokens or self.prompt_tokens,
            max(self.completion_tokens, out.num_output_tokens),
            out if out.finish_reason is not None else None,
            e2e_latency_s,
            logprobs,
            prompt_logprobs,
        )

    def json(
        self,
        token_text: Callable[[int], str] | None = None,
        prompt: tuple[Sequence[int], int] | None = None,
    ) -> dict[str, Any]:
        """`text` and `output_ids` as held: cumulative from `add` (as SGLang sends them,
        streaming too), the new part only from `step`. With logprobs, `meta_info` has SGLang's
        `output_token_logprobs` (`[logprob, id, text]` per output id) and
        `output_top_logprobs` (a list of those per output id); `text` is None unless
        `token_text` gives it. `prompt`: the prompt ids and the position from which their
        logprobs are wanted (`input_token_logprobs`, `input_top_logprobs`)."""
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.finish.num_cached_tokens if self.finish else 0,
            "finish_reason": finish_reason_json(self.finish) if self.finish else None,
            "e2e_latency": round(self.e2e_latency_s, 6),
        }
        if self.finish is not None and self.finish.num_verify_steps:
            # SGLang's: with speculative decoding, the decode steps the request took
            # (completion_tokens / spec_verify_ct: tokens a step gave it).
            meta["spec_verify_ct"] = self.finish.num_verify_steps
        if self.logprobs is not None:

            def entry(logprob: float, token: int) -> list[Any]:
                return [finite(logprob), token, token_text(token) if token_text else None]

            meta["output_token_logprobs"] = [
                entry(lp.logprob, t) for lp, t in zip(self.logprobs, self.output_ids, strict=False)
            ]
            meta["output_top_logprobs"] = [[entry(v, t) for t, v in lp.top] for lp in self.logprobs]
            if prompt is not None and self.prompt_logprobs is not None:
                ids, start = prompt
                scored = list(zip(ids, self.prompt_logprobs, strict=False))[start:]
                meta["input_token_logprobs"] = [
                    [None, t, token_text(t) if token_text else None]
                    if lp is None
                    else entry(lp.logprob, t)
                    for t, lp in scored
                ]
                meta["input_top_logprobs"] = [
                    None if lp is None else [entry(v, i) for i, v in lp.top] for _, lp in scored
                ]
        return {"text": self.text, "output_ids": self.output_ids, "meta_info": meta}


def finite(x: float) -> float | None:
    """`x`, or None for NaN and infinities (JSON has no such numbers)."""
    return x if math.isfinite(x) else None


# A prompt text longer than this is tokenized in a thread: a few MB take the tokenizer seconds,
# during which the event loop would serve no other request nor read the ranks' streams.
LONG_TEXT_CHARS = 1 << 16


async def encode_off_loop(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens)`, in a thread for a long `text`."""
    (ids,) = await encode_all_off_loop(tokenizer, [text], add_special_tokens)
    return ids


async def encode_all_off_loop(
    tokenizer: Any, texts: list[str], add_special_tokens: bool = True
) -> list[list[int]]:
    """Each of `texts` encoded; in one thread when together they are long (a batch of many
    prompts each just under the limit would hold the loop as long as one long one)."""

    def encode() -> list[list[int]]:
        return [list(tokenizer.encode(text, add_special_tokens)) for text in texts]

    if sum(map(len, texts)) <= LONG_TEXT_CHARS:
        return encode()
    return await asyncio.to_thread(encode)


async def read_generate(router: Router, raw: Any) -> GenerateBody:
    """`parse_generate(raw)` off the event loop where it checks a structured output's grammar
    (`parse_off_loop`), each text prompt given its token ids (`encode_off_loop`: in a thread
    for a long one); the text stays, so that errors still name it."""
    body = await parse_off_loop(parse_generate, raw)
    texts = [c.text for c in body.calls if c.input_ids is None and c.text is not None]
    encoded = iter(await encode_all_off_loop(router.tokenizer, texts))
    calls = [
        replace(c, input_ids=next(encoded)) if c.input_ids is None and c.text is not None else c
        for c in body.calls
    ]
    return replace(body, calls=calls)


def prepare_call(
    router: Router, config: ServeConfig, call: GenerateCall, logprob_start_len: int = -1
) -> tuple[list[int], SamplingParams]:
    """A call of `read_generate`'s (its prompt tokenized): its prompt ids and resolved
    sampling; RequestError when it does not fit (HTTP and gRPC share this)."""
    ids = call.input_ids
    assert ids is not None, "read_generate tokenizes every prompt"
    check_prompt_len(ids, config, call.prompt_field)
    if logprob_start_len >= len(ids):
        raise RequestError(
            f"logprob_start_len: {logprob_start_len} is past the prompt's last position "
            f"({len(ids) - 1}); use -1 for no prompt logprobs", "logprob_start_len",
        )  # fmt: skip
    return ids, resolve_sampling(
        ids, call.sampling, router.limits, config.default_max_new_tokens, call.prompt_field
    )


def check_prompt_len(ids: list[int], config: ServeConfig, field: str) -> None:
    """RequestError when the prompt is longer than `config.max_prompt_tokens`."""
    limit = config.max_prompt_tokens
    if limit is not None and len(ids) > limit:
        raise RequestError(
            f"{field}: the prompt has {len(ids)} tokens; this server accepts at most {limit} "
            "(--max-prompt-tokens)", field, code="context_length_exceeded",
        )  # fmt: skip
