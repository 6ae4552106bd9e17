"""One engine step (`run_step`, the body of `Engine.step`): the scheduled batch run through the
model — as two halves overlapped on an expert-parallel pool, as a CUDA graph replay when its
decode rows fit one, else eagerly — its tokens drawn (`workers.engine.step_output`), then each
request's new tokens appended (`append_token`, `append_run`): a request goes on, ends by the
finish rules and frees its pages, or, prefill-only, is handed off. `append_token` also takes
the first token of a request whose prompt's KV arrived from a prefill rank
(`Engine.admit_received`).

Free functions over the `Engine`, on the rank's loop thread like the engine itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from workers.engine.kv_cache import pages_needed
from workers.engine.messages import TokenDelta, TokenLogprob
from workers.engine.model_inputs import (
    decode_rows,
    prepare_inputs,
    row_samplers,
    take_prompt_scores,
)
from workers.engine.mtp_draft import ForwardPass, draft_after_step
from workers.engine.scheduler import ScheduledBatch, split_batch
from workers.engine.sequence import Sequence
from workers.engine.step_output import constraint_error, draw_tokens, finish_reason, token_delta

if TYPE_CHECKING:
    from workers.engine.engine import Engine


def run_step(engine: Engine, run_empty: bool) -> list[TokenDelta]:
    """`Engine.step` (its contract is there)."""
    reserved = engine.reserve_kv()
    batch = engine.scheduler.schedule()
    passes: list[ForwardPass] = []  # what the MTP module reads again
    engine.idle = batch.is_empty and not reserved
    if batch.is_empty and not run_empty:
        return []
    # A prefill rank writes the KV of prompts this step finishes layer by layer as it goes.
    after_layer = engine.layer_writes(batch) if engine.layer_writes is not None else None
    if engine.two_batch_overlap:
        half_a, half_b = split_batch(batch)
        ids_a, meta_a, samplers_a = prepare_inputs(half_a, engine.kv.page_size, engine.device)
        ids_b, meta_b, samplers_b = prepare_inputs(half_b, engine.kv.page_size, engine.device)
        logits_a, logits_b = engine.model.forward_two(
            ((ids_a, meta_a), (ids_b, meta_b)), engine.kv.data, after_layer
        )
        logits, samplers = torch.cat((logits_a, logits_b)), samplers_a + samplers_b
        passes = [ForwardPass(half_a, ids_a, meta_a, len(samplers_a)),
                  ForwardPass(half_b, ids_b, meta_b, len(samplers_b))]  # fmt: skip
        take_prompt_scores(half_a, meta_a)
        take_prompt_scores(half_b, meta_b)
    elif _graph_fits(engine, batch):
        logits, samplers = _replay_decode(engine, batch)
        if engine.model.mtp is not None and engine.graphs is not None:  # the graph's rows
            ids, meta = engine.graphs.last_pass()
            passes = [ForwardPass(batch, ids, meta, len(samplers))]
    else:
        input_ids, meta, samplers = prepare_inputs(batch, engine.kv.page_size, engine.device)
        logits = engine.model(input_ids, meta, engine.kv.data, after_layer)
        take_prompt_scores(batch, meta)
        passes = [ForwardPass(batch, input_ids, meta, len(samplers))]
    if batch.is_empty:
        if engine.model.mtp is not None and engine.ep is not None:  # its collectives too
            draft_after_step(
                engine.model, engine.kv.data, passes, [], [], engine.config.speculative_mtp,
                engine.max_context_len, engine.scheduler.hold_ahead, collective=True,
            )  # fmt: skip
        return []
    publish = engine.kv.allocator.enabled
    for seq, num in [(s, 1) for s in batch.decodes] + batch.prefills:
        seq.num_computed += num
        if publish:
            engine.scheduler.publish(seq)
    spec = engine.speculator
    states = spec.before_draw(batch.decodes) if spec is not None else None
    tokens, logprobs = draw_tokens(
        logits, samplers, engine.grammars, engine.model_config.eos_token_ids
    )
    if engine.model.mtp is not None:
        draft_after_step(
            engine.model, engine.kv.data, passes, samplers, tokens,
            engine.config.speculative_mtp, engine.max_context_len, engine.scheduler.hold_ahead,
            collective=engine.ep is not None,
        )  # fmt: skip
    engine.num_steps += 1
    engine.step_logits = ([s.rid for s in samplers], logits)
    if states is not None:
        return _take_guesses(engine, samplers, tokens, logprobs, states)
    deltas = (
        append_token(engine, seq, tok, lp)
        for seq, tok, lp in zip(samplers, tokens, logprobs, strict=True)
    )
    return [d for d in deltas if d is not None]


def _graph_fits(engine: Engine, batch: ScheduledBatch) -> bool:
    if engine.graphs is None or not batch.decodes:
        return False
    longest = max(seq.num_computed + 1 + len(seq.draft) for seq in batch.decodes)
    pages = pages_needed(longest, engine.kv.page_size)
    num_rows = len(batch.decodes) + sum(len(seq.draft) for seq in batch.decodes)
    return engine.graphs.can_run(num_rows, len(batch.prefills), pages)


def _replay_decode(engine: Engine, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
    assert engine.graphs is not None
    logits = engine.graphs.run(*decode_rows(batch.decodes, engine.kv.page_size))
    return logits, row_samplers(batch.decodes)


def _take_guesses(
    engine: Engine,
    samplers: list[Sequence],
    tokens: list[int],
    logprobs: list[TokenLogprob | None],
    states: dict[str, torch.Tensor],
) -> list[TokenDelta]:
    """`run_step`'s deltas when some requests' rows read guessed tokens (`Sequence.draft`):
    such a request keeps the guesses its rows' choices confirm, and the choice after the
    last of them, in one delta (`Speculator.verify`)."""
    assert engine.speculator is not None
    deltas: list[TokenDelta] = []
    i = 0
    while i < len(samplers):
        seq = samplers[i]
        if not seq.draft:
            delta = append_token(engine, seq, tokens[i], logprobs[i])
            i += 1
        else:
            rows = slice(i, i + len(seq.draft) + 1)
            i = rows.stop
            run = engine.speculator.verify(seq, tokens[rows], states.get(seq.rid))
            delta = _append_run(engine, seq, run, logprobs[rows])
        if delta is not None:
            deltas.append(delta)
    return deltas


def _append_run(
    engine: Engine, seq: Sequence, run: list[int], logprobs: list[TokenLogprob | None]
) -> TokenDelta:
    """Append the tokens `run` (its guesses confirmed, then the model's next choice, with
    their rows' logprobs) to a decoding request, up to the first that ends it."""
    finish = None
    for n, token in enumerate(run, 1):
        seq.token_ids.append(token)
        engine.num_generated_tokens += 1
        if seq.matcher is not None and not seq.matcher.accept(token):  # masked: not seen
            _end(engine, seq)
            return constraint_error(seq, run[:n], logprobs[:n])
        finish = finish_reason(seq, token, engine.model_config.eos_token_ids,
                               engine.max_context_len)  # fmt: skip
        if finish is not None:
            run = run[:n]
            break
    if finish is not None:
        _end(engine, seq, finished=True)
    else:
        seq.num_computed += len(run) - 1  # the confirmed guesses' KV is in the cache
        if engine.kv.allocator.enabled:
            engine.scheduler.publish(seq)
    return token_delta(seq, run, finish, logprobs[: len(run)])


def append_token(
    engine: Engine, seq: Sequence, token: int, logprob: TokenLogprob | None = None
) -> TokenDelta | None:
    """Append `token` to `seq`: the delta it reports, or None when `seq` is prefill-only (it is
    handed off; the decode side reports the token)."""
    seq.token_ids.append(token)
    engine.num_generated_tokens += 1
    if seq.prefill_only:
        if seq.kept_first is not None:  # computed again after being parked: drawn before
            (token, logprob), seq.kept_first = seq.kept_first, None
            seq.token_ids[-1] = token
            engine.num_generated_tokens -= 1
        seq.first_logprob = logprob
        engine.scheduler.hand_off(seq)
        engine.handoffs.append(seq)
        return None  # the decode side reports the token
    if seq.matcher is not None and not seq.matcher.accept(token):
        # Only a token the constraint allowed is drawn; one that is not (the prefill
        # rank's, built from other settings) ends the request rather than break it.
        _end(engine, seq)
        return constraint_error(seq, [token], [logprob])
    finish = finish_reason(seq, token, engine.model_config.eos_token_ids, engine.max_context_len)
    if finish is not None:
        _end(engine, seq, finished=True)
    return token_delta(seq, [token], finish, [logprob])


def _end(engine: Engine, seq: Sequence, finished: bool = False) -> None:
    """`seq` ends with the token just appended (`finished`: by the finish rules, its
    output then joins the shared n-gram index); its pages are freed."""
    engine.requests.pop(seq.rid, None)
    engine.scheduler.remove(seq)
    if finished and engine.speculator is not None:
        engine.speculator.finished(seq)
