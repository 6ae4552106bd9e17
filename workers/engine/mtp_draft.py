"""The MTP module's guesses, made right after each step (`--speculative-mtp`).

The module reads the batch the step's forward read — the same rows, positions, KV slots —
with each row's token replaced by the one after it: for a prefill chunk the next prompt token
(the first sampled token after a prompt's last row), for a decode row the token its logits
drew. Its KV then covers the positions the main model's does, and at each request's last row
that holds (after a step with a guess: the row whose guess was turned down, or the last) it
guesses the token after the request's new pending one: what the next step verifies.

Rows past that — after a guess that did not hold — write KV that a later step writes over,
as the main model's own rejected rows do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.engine.speculative import num_accepted
from workers.model.batch import AttentionMetadata
from workers.model.model import DeepseekForCausalLM


def next_token_ids(
    batch: ScheduledBatch,
    input_ids: torch.Tensor,  # [T] the step's
    meta: AttentionMetadata,
    tokens: list[int],  # drawn, one per logits row (decode rows first, then prompts' last)
) -> torch.Tensor:
    """`[T]` the token after each row's. Call after the batch's `num_computed` advanced and
    before the drawn tokens are appended."""
    nxt = torch.empty_like(input_ids)
    nxt[:-1] = input_ids[1:]  # within a prefill chunk: the next prompt token
    rows = list(range(meta.num_decode))
    values = tokens[: meta.num_decode]
    drawn = iter(tokens[meta.num_decode :])
    for span, (seq, _) in zip(meta.prefills, batch.prefills, strict=True):
        rows.append(span.start + span.num_tokens - 1)
        end = seq.num_computed
        if end < seq.num_tokens:
            values.append(seq.token_ids[end])
        else:
            token = next(drawn)
            values.append(seq.kept_first[0] if seq.kept_first is not None else token)
    if rows:
        nxt[torch.tensor(rows, device=nxt.device)] = torch.tensor(values, device=nxt.device)
    return nxt


class ForwardPass(NamedTuple):
    """One forward of a step (two with two-batch overlap): its batch, token ids, layout, and
    how many of the step's logits rows (`samplers`, in order) are its."""

    batch: ScheduledBatch
    input_ids: torch.Tensor
    meta: AttentionMetadata
    num_samplers: int


@torch.inference_mode()
def draft_after_step(
    model: DeepseekForCausalLM,
    kv_cache: torch.Tensor,
    passes: list[ForwardPass],
    samplers: list[Sequence],
    tokens: list[int],
) -> None:
    """Run the MTP module over each of the step's forwards and set each sampled request's
    `mtp_draft` to its guess after the tokens it keeps. Call before the step's guesses are
    verified (`Sequence.draft` still set); on an expert-parallel rank, for an empty batch too
    (with no samplers): the module's MoE is a collective."""
    first = 0
    for batch, input_ids, meta, num in passes:
        rows = slice(first, first + num)
        _draft(model, kv_cache, batch, input_ids, meta, samplers[rows], tokens[rows])
        first += num


def _draft(
    model: DeepseekForCausalLM,
    kv_cache: torch.Tensor,
    batch: ScheduledBatch,
    input_ids: torch.Tensor,
    meta: AttentionMetadata,
    samplers: list[Sequence],
    tokens: list[int],
) -> None:
    logits = model.draft_logits(next_token_ids(batch, input_ids, meta, tokens), meta, kv_cache)
    guesses = logits.argmax(dim=-1).tolist()
    i = 0
    while i < len(samplers):
        seq = samplers[i]
        num_rows = 1 + len(seq.draft) if i < meta.num_decode else 1
        kept = num_accepted(seq.draft, tokens[i : i + num_rows]) if num_rows > 1 else 0
        seq.mtp_draft = [guesses[i + kept]]
        i += num_rows
