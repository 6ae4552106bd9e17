"""What one engine step makes of its logits: a token per request (`draw_tokens`: penalties,
structured-output masks, sampling, logprobs), the finish rules each new token is checked
against (`finish_reason`), and the `TokenDelta` a request reports (`token_delta`).

Free functions over `Sequence`s: the engine keeps the bookkeeping (which requests are live,
whose pages are freed, which are handed off).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.engine.grammar import GrammarBackend
from workers.engine.messages import FinishReason, TokenDelta, TokenLogprob
from workers.engine.sampling import History, adjust_logits, sample, token_logprobs
from workers.engine.sequence import Sequence


class Drawn(NamedTuple):
    tokens: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row; None where the request does not ask


def draw_tokens(
    logits: torch.Tensor,  # [S, vocab] float32, the model's
    samplers: list[Sequence],  # the request sampling from each row
    grammars: GrammarBackend,
    eos_token_ids: tuple[int, ...],
) -> Drawn:
    """One token per row, drawn from the logits adjusted for the rows that ask (`adjust_logits`)
    and masked by the rows' constraints; logprobs are of the model's own logits."""
    params = [s.sampling for s in samplers]
    adjusted = logits
    if any(p.adjusts_logits for p in params):
        histories = [History(s.token_ids, s.num_prompt_tokens) for s in samplers]
        adjusted = adjust_logits(logits, params, histories, eos_token_ids)
    constrained = [(i, s.matcher) for i, s in enumerate(samplers) if s.matcher is not None]
    if constrained:
        # Adjusted logits may ban what the constraint allows: the model's are its fallback.
        fallback = logits if adjusted is not logits else None
        adjusted = adjusted.clone() if fallback is None else adjusted
        grammars.mask(adjusted, constrained, fallback=fallback)
    tokens = sample(adjusted, params, [s.generator for s in samplers])
    return Drawn(tokens, token_logprobs(logits, tokens, params))


def finish_reason(
    seq: Sequence, token: int, eos_token_ids: tuple[int, ...], max_context_len: int
) -> FinishReason | None:
    """Whether `token`, just appended to `seq` (and taken by its matcher), ends it: STOP on a
    stop token, on EOS unless `ignore_eos`, or once its constraint is complete; LENGTH at
    `max_new_tokens` or the context length; None while it goes on."""
    sp = seq.sampling
    if (
        token in sp.stop_token_ids
        or (not sp.ignore_eos and token in eos_token_ids)
        or (seq.matcher is not None and seq.matcher.terminated)
    ):
        return FinishReason.STOP
    if seq.num_output_tokens >= sp.max_new_tokens or seq.num_tokens >= max_context_len:
        return FinishReason.LENGTH
    return None


def constraint_error(seq: Sequence, token: int, logprob: TokenLogprob | None) -> TokenDelta:
    """The delta that ends `seq` because its matcher refused `token`."""
    delta = token_delta(seq, [token], FinishReason.ERROR, logprob)
    kind = seq.sampling.constraint.kind if seq.sampling.constraint is not None else "constraint"
    delta.error = f"token {token} does not match the request's {kind}"
    return delta


def token_delta(
    seq: Sequence,
    tokens: list[int],
    finish: FinishReason | None,
    logprob: TokenLogprob | None = None,
) -> TokenDelta:
    """`seq`'s report of `tokens` (its newest, or none when it ends without one). Its prompt
    logprobs ride on its first output token's delta."""
    logprobs = None
    if seq.sampling.logprobs:
        # One entry per token whatever happens: a token whose logprob did not come with it
        # (none is expected to: the prefill rank sends it with the KV) gets NaN, sent as null.
        logprobs = [logprob or TokenLogprob(float("nan"))] if tokens else []
    first = seq.sampling.prompt_logprobs and tokens and seq.num_output_tokens == 1
    return TokenDelta(
        rid=seq.rid,
        token_ids=tokens,
        finish_reason=finish,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens,
        hold=not seq.stream,
        logprobs=logprobs,
        num_cached_tokens=seq.num_cached_tokens,
        prompt_logprobs=list(seq.prompt_logprobs) if first else None,
    )
