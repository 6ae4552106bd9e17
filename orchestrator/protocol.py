"""Request validation shared by the HTTP routes, and the SGLang-style `/generate` protocol.

Every check raises `RequestError` whose message starts with the offending field's name as the
client wrote it (`sampling_params.temperature`, `max_tokens`, `messages[1].content`), so a 400
says exactly what to fix. Types are strict: `true` is not an integer, `1.5` is not a token count,
`"0.7"` is not a number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from orchestrator.router import Limits, Output, Router
from workers.engine.grammar import check_constraint
from workers.engine.messages import (
    MAX_LOGIT_BIAS,
    MAX_TOP_LOGPROBS,
    OutputConstraint,
    SamplingParams,
    TokenLogprob,
)

if TYPE_CHECKING:
    from orchestrator.config import ServeConfig

MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1
MAX_CHOICES = 16  # `n`: completions of one prompt per call


class RequestError(Exception):
    """A request the server refuses; becomes `{"error": {"message", "type", "param"}}`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code  # finer than `type`, e.g. "context_length_exceeded"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class Fields:
    """Typed reads from one JSON object; `prefix` makes error names like `sampling_params.x`."""

    def __init__(self, obj: Any, prefix: str = ""):
        if not isinstance(obj, Mapping):
            name = prefix.rstrip(".") or "body"
            raise RequestError(f"{name}: expected a JSON object, got {_type_name(obj)}", name)
        self.obj = obj
        self.prefix = prefix

    def name(self, key: str) -> str:
        return self.prefix + key

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def fail(self, key: str, problem: str) -> RequestError:
        return RequestError(f"{self.name(key)}: {problem}", self.name(key))

    def get_int(self, key: str, default: int | None = None) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_type_name(value)} {value!r}")
        return value

    def get_float(self, key: str, default: float) -> float:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_type_name(value)} {value!r}")
        return float(value)

    def get_bool(self, key: str, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_type_name(value)} {value!r}")
        return value

    def get_str(self, key: str) -> str | None:
        value = self.obj.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_type_name(value)}")
        return value

    def stop_strings(self, key: str) -> tuple[str, ...]:
        value = self.obj.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self.fail(key, "expected a string or a list of strings")
        if any(not s for s in items):
            raise self.fail(key, "stop strings must not be empty")
        if len(items) > MAX_STOP_STRINGS:
            raise self.fail(key, f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
        return tuple(items)

    def token_ids(self, key: str) -> list[int] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        ):
            raise self.fail(key, "expected a list of integer token ids")
        return value

    def neutral(self, key: str, *allowed: Any) -> None:
        """Refuse a feature pdserve does not implement unless it is set to a no-op value."""
        value = self.obj.get(key)
        if value is not None and value not in allowed:
            raise self.fail(key, f"{value!r} is not supported (allowed: {allowed!r})")


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling settings as a client asked for them, before the prompt is known."""

    max_new_tokens: int | None  # None: the server's default, clipped to fit the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    min_new_tokens: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    constraint: OutputConstraint | None = None  # structured output
    logit_bias: tuple[tuple[int, float], ...] = ()
    priority: int = 0
    logit_bias_field: str = "logit_bias"
    max_new_tokens_field: str = "max_new_tokens"
    stop_token_ids_field: str = "stop_token_ids"
    min_new_tokens_field: str = "min_new_tokens"


def read_sampling(
    f: Fields, max_new_tokens_key: str, min_new_tokens_key: str = "min_new_tokens"
) -> SamplingRequest:
    """Read and range-check the sampling fields every route shares (logprobs are asked for
    differently by each route: its parser sets them)."""
    max_new = f.get_int(max_new_tokens_key)
    if max_new is not None and max_new <= 0:
        raise f.fail(max_new_tokens_key, f"must be > 0, got {max_new}")
    temperature = f.get_float("temperature", 1.0)
    if temperature < 0:
        raise f.fail("temperature", f"must be >= 0 (0 is greedy), got {temperature:g}")
    top_p = f.get_float("top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise f.fail("top_p", f"must be in (0, 1], got {top_p:g}")
    top_k = f.get_int("top_k", -1)
    assert top_k is not None
    if top_k < -1 or top_k == 0:
        raise f.fail("top_k", f"must be -1 (no limit) or >= 1, got {top_k}")
    seed = f.get_int("seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise f.fail("seed", f"must be in [0, 2**63 - 1], got {seed}")
    stop_ids = f.token_ids("stop_token_ids") or []
    min_p = f.get_float("min_p", 0.0)
    if not 0.0 <= min_p <= 1.0:
        raise f.fail("min_p", f"must be in [0, 1], got {min_p:g}")
    min_new = f.get_int(min_new_tokens_key, 0)
    assert min_new is not None
    if min_new < 0:
        raise f.fail(min_new_tokens_key, f"must be >= 0, got {min_new}")
    if max_new is not None and min_new > max_new:
        raise f.fail(
            min_new_tokens_key,
            f"must be <= {f.name(max_new_tokens_key)} ({max_new}), got {min_new}",
        )
    frequency = f.get_float("frequency_penalty", 0.0)
    presence = f.get_float("presence_penalty", 0.0)
    for key, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
        if not -2.0 <= value <= 2.0:
            raise f.fail(key, f"must be in [-2, 2], got {value:g}")
    repetition = f.get_float("repetition_penalty", 1.0)
    if not 0.0 < repetition <= 2.0:
        raise f.fail("repetition_penalty", f"must be in (0, 2], got {repetition:g}")
    return SamplingRequest(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=f.stop_strings("stop"),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=f.get_bool("ignore_eos"),
        min_p=min_p,
        min_new_tokens=min_new,
        frequency_penalty=frequency,
        presence_penalty=presence,
        repetition_penalty=repetition,
        constraint=read_constraint(f),
        logit_bias=read_logit_bias(f),
        logit_bias_field=f.name("logit_bias"),
        max_new_tokens_field=f.name(max_new_tokens_key),
        stop_token_ids_field=f.name("stop_token_ids"),
        min_new_tokens_field=f.name(min_new_tokens_key),
    )


def read_priority(f: Fields) -> int:
    """Scheduling priority (top level of every route): lower runs first, default 0."""
    priority = f.get_int("priority", 0)
    assert priority is not None
    if not -(2**31) <= priority < 2**31:
        raise f.fail("priority", f"must be a 32-bit integer, got {priority}")
    return priority


def read_logit_bias(f: Fields) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: `{"token id": bias}`, each bias in [-100, 100], at most
    `MAX_LOGIT_BIAS` entries (token ids are checked against the vocabulary later)."""
    raw = f.obj.get("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise f.fail("logit_bias", f"expected an object of token id: bias, got {_type_name(raw)}")
    if len(raw) > MAX_LOGIT_BIAS:
        raise f.fail("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens, got {len(raw)}")
    out = []
    for key, bias in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise f.fail("logit_bias", f"{key!r} is not a token id") from None
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise f.fail("logit_bias", f"the bias of {key} must be a number, got {bias!r}")
        if not -100 <= bias <= 100:
            raise f.fail("logit_bias", f"the bias of {key} must be in [-100, 100], got {bias:g}")
        out.append((token, float(bias)))
    return tuple(sorted(out))


CONSTRAINT_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
# Structured output fields by name, as SGLang's `/generate` takes them, and the constraint kind
# each makes; the OpenAI routes take vLLM's `guided_*` names too (`guided_choice`: one of a
# list of strings, made into a grammar).
SGLANG_CONSTRAINTS = {key: key for key in CONSTRAINT_FIELDS}
VLLM_CONSTRAINTS = {
    "guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "ebnf",
    "guided_choice": "choice",
}  # fmt: skip


def read_constraint(
    f: Fields, fields: Mapping[str, str] = SGLANG_CONSTRAINTS
) -> OutputConstraint | None:
    """Structured output: one of `fields` (name → kind): a JSON schema (as JSON text or an
    object), a regex, an EBNF grammar, a list of choices; checked here, so that a bad one is a
    400 naming it."""
    given = [key for key in fields if f.obj.get(key) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise f.fail(given[1], f"give one of {', '.join(map(f.name, given))}, not several")
    key = given[0]
    kind, value = fields[key], f.obj[key]
    if kind == "choice":
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(c, str) and c for c in value)
        ):
            raise f.fail(key, "expected a non-empty list of non-empty strings")
        kind, value = "ebnf", "root ::= " + " | ".join(map(ebnf_literal, value))
    if kind == "structural_tag":
        value = structural_tag(f, key, value)
    if kind == "json_schema" and isinstance(value, dict):
        value = json.dumps(value)
    if not isinstance(value, str) or not value:
        raise f.fail(key, f"expected a non-empty string, got {_type_name(value)}")
    return check_output_constraint(f, key, OutputConstraint(kind, value))


def structural_tag(f: Fields, key: str, value: Any) -> str:
    """A structural tag (an object, or its JSON text) serialized in xgrammar's format; the
    older form that SGLang and vLLM take, `{"structures": [{"begin", "schema", "end"}],
    "triggers": [...]}` (free text until a trigger, then a tag whose content fits its schema),
    is converted (its JSON with one blank at most between tokens, so that whitespace cannot
    run on)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise f.fail(key, f"invalid structural tag: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise f.fail(key, f"expected a structural tag object, got {_type_name(value)}")
    if "structures" in value:
        tags = Fields(value, f.name(key) + ".")
        structures, triggers = value["structures"], value.get("triggers")
        if not isinstance(structures, list) or not all(isinstance(s, dict) for s in structures):
            raise tags.fail("structures", "expected a list of {begin, schema, end} objects")
        if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
            raise tags.fail("triggers", "expected a list of non-empty strings")
        value = {
            "type": "structural_tag",
            "format": {
                "type": "triggered_tags",
                "triggers": triggers,
                "tags": [
                    {
                        "type": "tag",
                        "begin": s.get("begin"),
                        "content": {
                            "type": "json_schema",
                            "json_schema": s.get("schema", {}),
                            "max_whitespace_cnt": 1,
                        },
                        "end": s.get("end"),
                    }
                    for s in structures
                ],
            },
        }
    return json.dumps(value, ensure_ascii=False)


def ebnf_literal(text: str) -> str:
    """`text` as a double-quoted EBNF string that matches exactly it."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def check_output_constraint(f: Fields, key: str, constraint: OutputConstraint) -> OutputConstraint:
    """`constraint` when it is valid; a 400 naming `key` otherwise."""
    try:
        check_constraint(constraint)
    except ValueError as e:
        message = str(e).removeprefix(f"{constraint.kind}: ")
        raise f.fail(key, f"invalid {constraint.kind.replace('_', ' ')}: {message}") from None
    return constraint


def read_n(f: Fields, key: str = "n") -> int:
    """How many completions of the prompt the call wants (each one is a request)."""
    n = f.get_int(key, 1)
    assert n is not None
    if not 1 <= n <= MAX_CHOICES:
        raise f.fail(key, f"must be in [1, {MAX_CHOICES}], got {n}")
    return n


def choice_params(sampling: SamplingParams, index: int) -> SamplingParams:
    """The sampling of completion `index` of a call with `n` > 1: a seeded call's choices
    draw with seeds `seed`, `seed + 1`, ... (the same seed would give `n` copies)."""
    if index == 0 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed + index) % (MAX_SEED + 1))


def read_top_logprobs(f: Fields, key: str) -> int:
    """A count of top logprobs per token, range-checked."""
    num = f.get_int(key, 0)
    assert num is not None
    if not 0 <= num <= MAX_TOP_LOGPROBS:
        raise f.fail(key, f"must be in [0, {MAX_TOP_LOGPROBS}], got {num}")
    return num


def resolve_sampling(
    input_ids: list[int],
    req: SamplingRequest,
    limits: Limits,
    default_max_new_tokens: int,
    prompt_field: str,
) -> SamplingParams:
    """Check the prompt against the model and the KV cache; fill in the default length."""
    if not input_ids:
        raise RequestError(f"{prompt_field}: the prompt is empty", prompt_field)
    vocab = limits.vocab_size
    for i, t in enumerate(input_ids):
        if not 0 <= t < vocab:
            raise RequestError(
                f"{prompt_field}: token id {t} at position {i} is outside the vocabulary "
                f"[0, {vocab})",
                prompt_field,
            )
    for t in req.stop_token_ids:
        if not 0 <= t < vocab:
            name = req.stop_token_ids_field
            raise RequestError(f"{name}: token id {t} is outside the vocabulary [0, {vocab})", name)
    for t, _ in req.logit_bias:
        if not 0 <= t < vocab:
            name = req.logit_bias_field
            raise RequestError(f"{name}: token id {t} is outside the vocabulary [0, {vocab})", name)
    room = min(limits.max_context_len, limits.kv_capacity_tokens) - len(input_ids)
    name = req.max_new_tokens_field
    if req.max_new_tokens is None:
        if room < 1:
            raise _too_long(input_ids, 1, limits, prompt_field)
        max_new = min(default_max_new_tokens, room)
    else:
        max_new = req.max_new_tokens
        if max_new > room:
            raise _too_long(input_ids, max_new, limits, name)
    if req.min_new_tokens > max_new:
        name = req.min_new_tokens_field
        raise RequestError(
            f"{name}: {req.min_new_tokens} is more than the {max_new} tokens this request may "
            "generate", name,
        )  # fmt: skip
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        min_p=req.min_p,
        min_new_tokens=req.min_new_tokens,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs,
        prompt_logprobs=req.prompt_logprobs,
        constraint=req.constraint,
        logit_bias=req.logit_bias,
        priority=req.priority,
    )


def _too_long(input_ids: list[int], max_new: int, limits: Limits, name: str) -> RequestError:
    total = len(input_ids) + max_new
    if total > limits.max_context_len:
        where = f"the model's context length of {limits.max_context_len} tokens"
    else:
        where = f"the KV cache capacity of {limits.kv_capacity_tokens} tokens"
    return RequestError(
        f"{name}: prompt ({len(input_ids)} tokens) + max new tokens ({max_new}) = {total} "
        f"exceeds {where}",
        name,
        code="context_length_exceeded",
    )


# ---- SGLang-style /generate -----------------------------------------------------------------

_SGLANG_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "no_stop_trim": (False,),
}
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
    sp = Fields(body.get("sampling_params") or {}, "sampling_params.")
    for key in sp.obj:
        if key not in _SGLANG_KNOWN:
            raise sp.fail(key, "unknown sampling parameter")
    for key, allowed in _SGLANG_NEUTRAL.items():
        sp.neutral(key, *allowed)
    sampling = replace(read_sampling(sp, "max_new_tokens"), priority=read_priority(f))
    n = read_n(sp)
    start = -1
    if f.get_bool("return_logprob"):
        start = f.get_int("logprob_start_len", -1) or 0
        if start < -1:
            raise f.fail(
                "logprob_start_len", f"must be -1 (no prompt logprobs) or >= 0, got {start}"
            )
        sampling = replace(
            sampling, logprobs=True, top_logprobs=read_top_logprobs(f, "top_logprobs_num"),
            prompt_logprobs=start >= 0,
        )  # fmt: skip
    elif read_top_logprobs(f, "top_logprobs_num"):
        raise f.fail("top_logprobs_num", "needs return_logprob: true")
    stream = f.get_bool("stream")
    rid = f.get_str("rid")
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
            raise RequestError(f"text: expected a string, got {_type_name(text)}", "text")
        if any(not c.text for c in calls):
            raise RequestError("text: the prompt is empty", "text")
    else:
        if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            batch = [Fields({"input_ids": x}).token_ids("input_ids") for x in ids]
            calls, is_batch = [GenerateCall(None, x, sampling) for x in batch], True
        else:
            calls = [GenerateCall(None, f.token_ids("input_ids"), sampling)]
    if is_batch and stream:
        raise RequestError(
            "stream: a batch of prompts cannot stream; send them one by one", "stream"
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


def prepare_call(
    router: Router, config: ServeConfig, call: GenerateCall
) -> tuple[list[int], SamplingParams]:
    """A parsed generate call's prompt ids and resolved sampling; RequestError when it does
    not fit (HTTP and gRPC share this)."""
    ids = call.input_ids if call.input_ids is not None else router.tokenizer.encode(call.text or "")
    check_prompt_len(ids, config, call.prompt_field)
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
