"""`Output`: what a request produced since the previous one, as the front ends send it; made
from a rank's `TokenDelta` by `to_output` (detokenized, stop strings applied)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.detokenizer import IncrementalDetokenizer
from workers.engine.messages import TokenDelta, TokenLogprob


@dataclass(frozen=True)
class Output:
    """What a request produced since the previous `Output`.

    `finish_reason` is set on the last one only: "stop" (EOS, a stop token or a stop string —
    `matched_stop` says which when known), "length", "abort" (an abort call ended it:
    `/abort_request`, gRPC `Abort`), "timeout" (past its timeout; `error` says so) or "error"
    (the rank failed; `error` says why)."""

    rid: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of `token_ids`, when asked
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held (not computed)
    num_verify_steps: int = 0  # speculative decoding: decode steps on its (last) rank
    # With the first token, when asked: one per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None


def to_output(
    delta: TokenDelta, detok: IncrementalDetokenizer, rid: str, num_prompt_tokens: int
) -> Output:
    """The client's view of `delta`: its request's id `rid` (the ranks know it by another),
    the text so far; `num_prompt_tokens` where the delta has none (an error from the router)."""
    text = detok.add(delta.token_ids)
    token_ids = list(delta.token_ids)
    logprobs = None if delta.logprobs is None else list(delta.logprobs)
    num_output_tokens = delta.num_output_tokens
    finish = delta.finish_reason.value if delta.finish_reason is not None else None
    matched: str | int | None = None
    if detok.stopped:
        finish, matched = "stop", detok.matched_stop
        # Tokens the rank made past the one that completed the stop string are not output.
        num_past = len(token_ids) - detok.num_taken
        if num_past > 0:
            del token_ids[detok.num_taken :]
            if logprobs is not None:
                del logprobs[detok.num_taken :]
            num_output_tokens = max(0, num_output_tokens - num_past)
    elif finish is not None:
        text += detok.flush()
        if finish == "stop" and delta.token_ids:
            matched = delta.token_ids[-1]
    return Output(
        rid=rid,
        text=text,
        token_ids=token_ids,
        num_prompt_tokens=delta.num_prompt_tokens or num_prompt_tokens,
        num_output_tokens=num_output_tokens,
        finish_reason=finish,
        matched_stop=matched,
        error=delta.error,
        logprobs=logprobs,
        num_cached_tokens=delta.num_cached_tokens,
        num_verify_steps=delta.num_verify_steps,
        prompt_logprobs=delta.prompt_logprobs,
    )
