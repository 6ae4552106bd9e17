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
        adjusted = adjust_logits(logits, params, _histories(samplers), eos_token_ids)
    constrained = [
        (first, seq.matcher, seq.draft[: num - 1])
        for first, seq, num in _row_runs(samplers)
        if seq.matcher is not None
    ]
    if constrained:
        # Adjusted logits may ban what the constraint allows: the model's are its fallback.
        fallback = logits if adjusted is not logits else None
        adjusted = adjusted.clone() if fallback is None else adjusted
        grammars.mask(adjusted, constrained, fallback=fallback)
    tokens = sample(adjusted, params, [s.generator for s in samplers])
    return Drawn(tokens, token_logprobs(logits, tokens, params))


def _row_runs(samplers: list[Sequence]) -> list[tuple[int, Sequence, int]]:
    """Each request's rows: its first row, the request and how many (1, or 1 + its guesses
    when its rows read guessed tokens, `Sequence.draft`: a request's rows are consecutive)."""
    runs: list[tuple[int, Sequence, int]] = []
    for row, seq in enumerate(samplers):
        if runs and runs[-1][1] is seq:
            runs[-1] = (runs[-1][0], seq, runs[-1][2] + 1)
        else:
            runs.append((row, seq, 1))
    return runs


def _histories(samplers: list[Sequence]) -> list[History]:
    """What each row's penalties look at: its request's tokens and the guesses before the
    row, as if they had been drawn."""
    return [
        History(seq.token_ids + seq.draft[:i] if i else seq.token_ids, seq.num_prompt_tokens)
        for _, seq, num in _row_runs(samplers)
        for i in range(num)
    ]


def finish_reason(
    seq: Sequence, token: int, eos_token_ids: tuple[int, ...], max_context_len: int
) -> FinishReason | None:
    """Whether `token`, just appended to `seq` (and taken by its matcher), ends it: STOP on a
    stop token, on EOS unless `ignore_eos`, or once its constraint is complete; LENGTH at
    `max_new_tokens` or the context length; None while it goes on."""
    sp = seq.sampling
    if (
        token in sp.stop_token_set
        or (not sp.ignore_eos and token in eos_token_ids)
        or (seq.matcher is not None and seq.matcher.terminated)
    ):
        return FinishReason.STOP
    if seq.num_output_tokens >= sp.max_new_tokens or seq.num_tokens >= max_context_len:
        return FinishReason.LENGTH
    return None


def constraint_error(
    seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob | None]
) -> TokenDelta:
    """The delta that ends `seq` because its matcher refused the last of `tokens`."""
    delta = token_delta(seq, tokens, FinishReason.ERROR, logprobs)
    kind = seq.sampling.constraint.kind if seq.sampling.constraint is not None else "constraint"
    delta.error = f"token {tokens[-1]} does not match the request's {kind}"
    return delta


def token_delta(
    seq: Sequence,
    tokens: list[int],
    finish: FinishReason | None,
    logprobs: list[TokenLogprob | None] | None = None,
) -> TokenDelta:
    """`seq`'s report of `tokens` (its newest, or none when it ends without one), with their
    logprobs when it asked for them. Its prompt logprobs ride on its first output token's
    delta."""
    reported = None
    if seq.sampling.logprobs:
        # One entry per token whatever happens: a token whose logprob did not come with it
        # (none is expected to: the prefill rank sends it with the KV) gets NaN, sent as null.
        given = list(logprobs or ())[: len(tokens)]
        given += [None] * (len(tokens) - len(given))
        reported = [lp or TokenLogprob(float("nan")) for lp in given]
    first = seq.sampling.prompt_logprobs and tokens and seq.num_output_tokens == 1
    return TokenDelta(
        rid=seq.rid,
        token_ids=tokens,
        finish_reason=finish,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens,
        hold=not seq.stream,
        logprobs=reported,
        num_cached_tokens=seq.num_cached_tokens,
        num_verify_steps=seq.num_verify_steps,
        prompt_logprobs=list(seq.prompt_logprobs) if first else None,
    )
