"""Messages between the router and an engine rank.

These cross a process boundary (Ray), so they are small dataclasses carrying only what the other
side needs: the router sends token ids and sampling settings, the rank sends back new token ids.
Text never crosses: tokenization, detokenization and stop strings live in the router. What a
rank reports about itself (`RankInfo`, `RankStats`) is `workers.engine.rank_reports`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries of `logit_bias` (OpenAI's limit)
# Kinds of structured output (see `workers.engine.grammar`): any JSON object, a JSON schema,
# a regular expression, an EBNF grammar (GBNF style, `root ::= ...`), an xgrammar structural
# tag (JSON: `{"type": "structural_tag", "format": {...}}`).
CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "ebnf", "structural_tag")


class OutputConstraint(NamedTuple):
    """What a request's output must match: `kind` one of `CONSTRAINT_KINDS`, `spec` its text
    (a JSON schema serialized, a regex, a grammar, a structural tag serialized; empty for
    `json_object`)."""

    kind: str
    spec: str = ""


class FinishReason(str, Enum):
    STOP = "stop"  # an EOS / stop token (or, set by the router, a stop string)
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # aborted by the client or the router
    ERROR = "error"  # the rank failed the request; `TokenDelta.error` says why


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, already validated by the router (see `validate`)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 means no limit
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability
    min_new_tokens: int = 0  # EOS and stop tokens are banned until this many are out
    # OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), counting
    # the output tokens so far.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Hugging Face's / SGLang's, over prompt and output tokens: a positive logit is divided by
    # it, a negative one multiplied.
    repetition_penalty: float = 1.0
    logprobs: bool = False  # report each output token's log-probability
    top_logprobs: int = 0  # ... and the `top_logprobs` most likely tokens' (needs logprobs)
    # Report each prompt token's log-probability too (after the tokens before it; None for
    # the first), with the same `top_logprobs`. The prompt is then computed whole, never
    # taken from the prefix cache.
    prompt_logprobs: bool = False
    # Structured output: the output must match this; None: free text.
    constraint: OutputConstraint | None = None
    # OpenAI's: `(token id, bias)` pairs, each bias in [-100, 100] added to that token's logit
    # (before penalties; -100 in effect bans it, 100 all but forces it).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Scheduling, carried with the rest of the request's settings: a lower value is admitted
    # first and preempted last (vLLM's convention); equal priorities go in arrival order.
    priority: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalizes(self) -> bool:
        """Whether any penalty (frequency, presence, repetition) is on."""
        return bool(
            self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
        )

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits may change before sampling (penalties, a minimum length, a
        logit bias)."""
        return self.penalizes or self.min_new_tokens > 0 or bool(self.logit_bias)

    @functools.cached_property
    def stop_token_set(self) -> frozenset[int]:
        """`stop_token_ids` for looking each generated token up (up to thousands of them)."""
        return frozenset(self.stop_token_ids)

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the offending field."""
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (no limit) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if not -(2**31) <= self.priority < 2**31:
            raise ValueError(f"priority must be a 32-bit integer, got {self.priority}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}"
            )
        for t, bias in self.logit_bias:
            if not 0 <= t < vocab_size:
                raise ValueError(
                    f"logit_bias: token id {t} is outside the vocabulary [0, {vocab_size})"
                )
            if not -100.0 <= bias <= 100.0:
                raise ValueError(
                    f"logit_bias: the bias of token {t} must be in [-100, 100], got {bias}"
                )
        if self.constraint is not None:
            if self.constraint.kind not in CONSTRAINT_KINDS:
                raise ValueError(
                    f"constraint: kind must be one of {', '.join(CONSTRAINT_KINDS)}, "
                    f"got {self.constraint.kind!r}"
                )
            if self.constraint.kind != "json_object" and not self.constraint.spec:
                raise ValueError(f"{self.constraint.kind}: must not be empty")
        if (self.top_logprobs or self.prompt_logprobs) and not self.logprobs:
            raise ValueError("top_logprobs and prompt_logprobs need logprobs")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # False: the client takes the output whole (a non-streaming call with no stop string for
    # the router to match), so the rank sends the first token (time to first token) and then
    # holds the rest until the request ends (or `HELD_CHECKPOINT` tokens wait): one delta
    # instead of one per step.
    stream: bool = True
    # A prefill rank of a disaggregated pair computes the whole request itself (its prompt
    # logprobs come from the logits it has; the decode rank is not involved).
    generate_here: bool = False
    # Resuming a request whose rank was lost (`orchestrator.router`): the tokens it had
    # generated there. They follow the prompt and count as output (`max_new_tokens`, penalties,
    # a constraint, a seed's draws): the rank computes their KV with the prompt's and goes on
    # from the last, as if it had generated them itself.
    output_ids: list[int] = field(default_factory=list)
    # Moving here from another decode rank with its KV (`KVMoves.move_from`): the KV of its
    # tokens but the last (the next step's input) arrives from that rank, with no new token;
    # it goes on decoding from there. Decode ranks only.
    migrated: bool = False


class TokenLogprob(NamedTuple):
    """An output token's log-probability under the model (log-softmax of its logits, before
    temperature, penalties and filtering) and the `top_logprobs` most likely `(id, logprob)`."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenDelta:
    """New output of one request since the last frame of its rank's output stream. The last
    delta of a request has `finish_reason` set; after it the rank holds nothing of that
    request (its pages are free)."""

    rid: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far, including `token_ids`
    hold: bool = False  # the request's tokens may be held until it ends (not streamed)
    # One per token of `token_ids`, for a request that asked for logprobs; else None.
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)
    num_verify_steps: int = 0  # speculative decoding: the decode steps it took here so far
    # With the request's first token, when it asked for prompt logprobs: one per prompt
    # token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # An error of the rank, not of the request (an expert-parallel peer failed, the rank died
    # or was scaled down): the router may resume the request on another rank.
    resumable: bool = False
    # A decode rank handed the request (its KV and tokens) off to another decode rank
    # (`KVMoves.move_from`): the transfer id its KV waits under there (the request's next
    # attempt's id). Set on a last delta that is also `resumable`.
    moved_to: str = ""
    # A request that moved here with its KV: the KV arrived (the rank it left is no longer
    # needed); set on the first delta after it, which may carry no token.
    kv_arrived: bool = False

    def __reduce__(self) -> tuple[type[TokenDelta], tuple[Any, ...]]:
        # Positional fields: unpickling a frame's deltas (one per request per step) takes
        # about a third of the time a dataclass's default state dict does.
        return TokenDelta, (
            self.rid, self.token_ids, self.finish_reason, self.error, self.num_prompt_tokens,
            self.num_output_tokens, self.hold, self.logprobs, self.num_cached_tokens,
            self.num_verify_steps, self.prompt_logprobs, self.resumable, self.moved_to,
            self.kv_arrived,
        )  # fmt: skip

    def prepend(self, earlier: TokenDelta) -> None:
        """Make this delta also carry `earlier`'s tokens (the same request's, before it),
        growing `earlier`'s lists in place: a long held output stays linear."""
        earlier.token_ids.extend(self.token_ids)
        self.token_ids = earlier.token_ids
        self.kv_arrived = self.kv_arrived or earlier.kv_arrived
        if self.prompt_logprobs is None:
            self.prompt_logprobs = earlier.prompt_logprobs
        if self.logprobs is not None or earlier.logprobs is not None:
            logprobs = earlier.logprobs if earlier.logprobs is not None else []
            logprobs.extend(self.logprobs or ())
            self.logprobs = logprobs

    @classmethod
    def failure(cls, rid: str, message: str) -> TokenDelta:
        """The last delta of a request the rank could not serve."""
        return cls(rid=rid, token_ids=[], finish_reason=FinishReason.ERROR, error=message)


HELD_CHECKPOINT = 256  # tokens a request sent whole has its rank hold at most (`StreamBuffer`)


class StreamBuffer:
    """Holds a running request's new tokens on its rank until `interval` of them are ready
    (`--stream-interval`): fewer, larger deltas mean less work per token for the rank's output
    stream, the router and the HTTP stream. Never held: the first token (time to first token), a
    finished request's last delta, and the tokens of a request that got no new token in a step
    (preempted or stalled). With `interval` 1 every delta passes at once. A delta marked
    `hold` (a request that is not streamed) is held, after its first token, until the request
    ends, whatever the interval — or until `HELD_CHECKPOINT` tokens wait: what the router has
    of a request is what it resumes from when its rank fails, so a long one sent whole would
    start again from its first token."""

    def __init__(self, interval: int = 1):
        if interval < 1:
            raise ValueError(f"stream interval must be >= 1, got {interval}")
        self.interval = interval
        self._held: dict[str, TokenDelta] = {}

    def take(self, deltas: list[TokenDelta], stepped: bool) -> list[TokenDelta]:
        """The deltas to publish now, of `deltas` (this loop iteration's) and those held.
        `stepped`: the iteration ran a model step (only then does a held request that got no
        token count as stalled)."""
        if self.interval == 1 and not self._held and not any(d.hold for d in deltas):
            return deltas
        out: list[TokenDelta] = []
        fresh: set[str] = set()
        for d in deltas:
            held = self._held.pop(d.rid, None)
            if held is not None:
                d.prepend(held)
            fresh.add(d.rid)
            first = d.num_output_tokens == len(d.token_ids)
            full = len(d.token_ids) >= (HELD_CHECKPOINT if d.hold else self.interval)
            if d.finish_reason is not None or first or full or d.kv_arrived:
                out.append(d)
            else:
                self._held[d.rid] = d
        if stepped:
            stalled = [rid for rid, d in self._held.items() if rid not in fresh and not d.hold]
            for rid in stalled:
                out.append(self._held.pop(rid))
        return out


@dataclass(frozen=True)
class TransferReady:
    """Decode rank → router: `rid` has pages reserved and a receive posted; forward `target`
    (a `workers.transfer.TransferTarget`) to the request's prefill rank."""

    rid: str
    target: Any


@dataclass(frozen=True)
class AddsTaken:
    """Rank → router, on the output stream: the answer to the router's `add` command `seq`
    (see `workers.engine.delta_stream`), per request None (queued) or why it was refused; or,
    when the rank could take none of them, `error`."""

    seq: int
    refusals: list[str | None]
    error: str | None = None
    rid: str = ""  # the output stream routes items by request: this one is the router's own
    router: str = ""  # the tag of the router that sent the add ("": the primary)


def router_of(rid: str) -> str:
    """The tag of the router whose request `rid` is ("" for the primary router): a front
    router's attempt ids end in `#N@TAG` (`orchestrator.router.Router.next_attempt_id`), the
    primary's in `#N`; ids not made by a router (tests, tools) are the primary's."""
    head, sep, last = rid.rpartition("#")
    if not sep:
        return ""
    number, at, tag = last.partition("@")
    return tag if at and number.isdigit() else ""


def short_error(e: BaseException) -> str:
    """The message of the error a rank raised, without Ray's remote traceback around it."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause) or type(cause).__name__
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
