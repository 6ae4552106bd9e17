"""Sampling parameters as the HTTP and gRPC front ends take them: read from a request's fields
(SGLang's and OpenAI's names), then resolved against the prompt and the server's limits."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from orchestrator.request_fields import Fields, RequestError, type_name
from orchestrator.routed import Limits, Overloaded
from workers.engine.grammar import check_constraint
from workers.engine.messages import (
    MAX_LOGIT_BIAS,
    MAX_TOP_LOGPROBS,
    OutputConstraint,
    SamplingParams,
)

MAX_SEED = 2**63 - 1
MAX_CHOICES = 16  # `n`: completions of one prompt per call
# (The rank looks each token up in a set of them; the list crosses to the rank with each
# request, and a minimum length bans them at every step.)
MAX_STOP_TOKEN_IDS = 2048


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


MAX_BATCH_REQUESTS = 256  # prompts x n (x best_of) of one call
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (as vLLM's do)
# Logits are divided by a repetition penalty below 1: much smaller ones overflow float32.
MIN_REPETITION_PENALTY = 0.01


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
    if temperature < GREEDY_BELOW:
        temperature = 0.0  # logits / 1e-40 overflow: as good as greedy, so greedy
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
    stop_ids = list(dict.fromkeys(f.token_ids("stop_token_ids") or []))  # (repeats: once)
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise f.fail(
            "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids, got {len(stop_ids)}"
        )
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
    if not MIN_REPETITION_PENALTY <= repetition <= 2.0:
        raise f.fail(
            "repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, 2], got {repetition:g}"
        )
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
        raise f.fail("logit_bias", f"expected an object of token id: bias, got {type_name(raw)}")
    if len(raw) > MAX_LOGIT_BIAS:
        raise f.fail("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens, got {len(raw)}")
    out = []
    seen: dict[int, str] = {}
    for key, bias in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise f.fail("logit_bias", f"{key!r} is not a token id") from None
        if token in seen:  # ("5" and "05": their biases would add up past the range)
            raise f.fail("logit_bias", f"{seen[token]!r} and {key!r} name the same token {token}")
        seen[token] = key
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise f.fail("logit_bias", f"the bias of {key} must be a number, got {bias!r}")
        if not -100 <= bias <= 100:
            raise f.fail("logit_bias", f"the bias of {key} must be in [-100, 100], got {bias:g}")
        out.append((token, float(bias)))
    return tuple(sorted(out))


T = TypeVar("T")

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
    if not isinstance(value, str):
        raise f.fail(key, f"expected a non-empty string, got {type_name(value)}")
    if not value:
        raise f.fail(key, "must not be empty")
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
        raise f.fail(key, f"expected a structural tag object, got {type_name(value)}")
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
    except (ValueError, RecursionError) as e:
        message = (
            "nested too deeply" if isinstance(e, RecursionError)
            else str(e).removeprefix(f"{constraint.kind}: ")
        )  # fmt: skip
        raise f.fail(key, f"invalid {constraint.kind.replace('_', ' ')}: {message}") from None
    return constraint


# Where a request body may hold structured output (`/generate`'s `sampling_params`, one or a
# list, and the OpenAI routes' top level): such a body is read off the router's event loop.
_CONSTRAINT_KEYS = frozenset(
    (
        *CONSTRAINT_FIELDS,
        *VLLM_CONSTRAINTS,
        "response_format",
        "tools",
        "tool_choice",
        "structured_outputs",
    )
)
# A structured output's grammar that takes longer than this to check (xgrammar: some schemas
# take minutes — very wide or very deep ones) is refused; the check goes on in its thread.
CHECK_TIMEOUT_S = 10.0
_checks = ThreadPoolExecutor(2, "pdserve-constraint-check")


def mentions_constraint(raw: Any) -> bool:
    """Whether request body `raw` (parsed JSON) asks for structured output or tools."""
    if not isinstance(raw, dict):
        return False
    params = raw.get("sampling_params")
    return any(
        isinstance(part, dict) and not _CONSTRAINT_KEYS.isdisjoint(part)
        for part in (raw, *(params if isinstance(params, list) else [params]))
    )


async def parse_off_loop(parse: Callable[..., T], raw: Any, *args: Any) -> T:
    """`parse(raw, *args)`: in a thread of its own when `raw` asks for structured output (its
    grammar's check may take long, and the event loop serves every other request and reads
    the ranks' streams meanwhile), a 400 when that takes over `CHECK_TIMEOUT_S`; inline
    otherwise."""
    if not mentions_constraint(raw):
        return parse(raw, *args)
    task = _checks.submit(parse, raw, *args)
    future = asyncio.wrap_future(task)
    try:
        return await asyncio.wait_for(asyncio.shield(future), CHECK_TIMEOUT_S)
    except TimeoutError:
        future.add_done_callback(_retrieve)
        if task.cancel():  # still queued behind others' checks: not this one's fault
            raise Overloaded(
                "overloaded: structured-output checks of other requests take all the time; "
                "retry later"
            ) from None
        raise RequestError(
            f"structured output: its grammar took over {CHECK_TIMEOUT_S:g} s to check; "
            "simplify it (fewer properties or alternatives, less nesting)", "body",
        ) from None  # fmt: skip


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (read: not logged as never retrieved)


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
    room = min(limits.max_context_len, limits.kv_capacity_tokens) - len(input_ids)
    # (Before looking at each token: a prompt of millions is refused at once.)
    if req.max_new_tokens is None and room < 1:
        raise _too_long(input_ids, 1, limits, prompt_field)
    if req.max_new_tokens is not None and req.max_new_tokens > room:
        raise _too_long(input_ids, req.max_new_tokens, limits, req.max_new_tokens_field)
    vocab = limits.vocab_size
    if min(input_ids) < 0 or max(input_ids) >= vocab:
        i, t = next((i, t) for i, t in enumerate(input_ids) if not 0 <= t < vocab)
        raise RequestError(
            f"{prompt_field}: token id {t} at position {i} is outside the vocabulary [0, {vocab})",
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
    if req.max_new_tokens is None:
        max_new = min(default_max_new_tokens, room)
    else:
        max_new = req.max_new_tokens
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
