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

from collections.abc import Callable
from typing import NamedTuple

import torch

from workers.engine.model_inputs import DecodeRows, decode_inputs
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
    num_guesses: int,
    max_context_len: int,
    hold_ahead: Callable[[Sequence, int], int],
    collective: bool = False,
) -> None:
    """Run the MTP module over each of the step's forwards and set each sampled request's
    `mtp_draft` to its guess after the tokens it keeps, then `num_guesses - 1` times more
    the module over its own last guesses (`_guess_on`; none past a request's
    `max_new_tokens` or `max_context_len`: what `Speculator.guess` would cut). Call before the step's guesses are
    verified (`Sequence.draft` still set). `hold_ahead(seq, n)`: pages for `seq`'s positions
    below `n`, where it can have them (`Scheduler.hold_ahead`), returning how many positions
    its pages cover. `collective` (an expert-parallel rank: the
    module's MoE is a collective): every pass runs, with no rows where there are none —
    for an empty batch too."""
    heads: list[Head] = []
    hidden: list[torch.Tensor] = []
    first = 0
    for batch, input_ids, meta, num in passes:
        rows = slice(first, first + num)
        more, h = _guess(
            model, kv_cache, batch, input_ids, meta, samplers[rows], tokens[rows],
            num_guesses, max_context_len,
        )  # fmt: skip
        offset = sum(len(x) for x in hidden)  # (the rows of the hidden states of all passes)
        heads += [head._replace(row=head.row + offset) for head in more]
        hidden.append(h)
        first += num
    state, page_size = torch.cat(hidden), passes[0].meta.page_size
    for _ in range(num_guesses - 1):
        if not heads and not collective:
            return
        heads, state = _guess_on(model, kv_cache, heads, state, page_size, hold_ahead)


class Head(NamedTuple):
    """A request whose guesses go on: the position of the row that made its last guess,
    that row's index in the hidden states the module returned, and how many guesses it
    can use."""

    seq: Sequence
    position: int
    row: int
    limit: int


def _guess(
    model: DeepseekForCausalLM,
    kv_cache: torch.Tensor,
    batch: ScheduledBatch,
    input_ids: torch.Tensor,
    meta: AttentionMetadata,
    samplers: list[Sequence],
    tokens: list[int],
    num_guesses: int,
    max_context_len: int,
) -> tuple[list[Head], torch.Tensor]:
    """The first guesses (over one forward's rows), and where each request goes on from."""
    assert meta.hidden is not None, "a forward of the model with its MTP module"
    next_ids = next_token_ids(batch, input_ids, meta, tokens)
    logits, hidden = model.draft(next_ids, meta.hidden, meta, kv_cache)
    guesses = logits.argmax(dim=-1).tolist()
    positions = meta.positions[meta.logits_indices].tolist()
    heads = []
    i = 0
    while i < len(samplers):
        seq = samplers[i]
        num_rows = 1 + len(seq.draft) if i < meta.num_decode else 1
        kept = num_accepted(seq.draft, tokens[i : i + num_rows]) if num_rows > 1 else 0
        seq.mtp_draft = [guesses[i + kept]]
        num_tokens = seq.num_tokens + kept + 1  # once this step's are appended
        limit = min(
            num_guesses, max_context_len - num_tokens - 1,
            seq.sampling.max_new_tokens - (seq.num_output_tokens + kept + 1) - 1,
        )  # fmt: skip
        if limit > 1:
            heads.append(Head(seq, positions[i + kept], i + kept, limit))
        i += num_rows
    return heads, hidden


def _guess_on(
    model: DeepseekForCausalLM,
    kv_cache: torch.Tensor,
    heads: list[Head],
    hidden: torch.Tensor,
    page_size: int,
    hold_ahead: Callable[[Sequence, int], int],
) -> tuple[list[Head], torch.Tensor]:
    """One more guess for each request of `heads`: the module reads its last guess (at the
    position after that guess's row) and the hidden state it had there. Its KV is written
    at that position (and over later, once the position's token is known): a request goes
    on only where it holds or can take the page (`hold_ahead`; a prefill-only request, whose
    pages are about to be sent as they are, only where it holds one)."""
    rows = DecodeRows([], [], [], [])
    going: list[Head] = []
    for head in heads:
        seq, position = head.seq, head.position + 1
        if len(seq.mtp_draft) >= head.limit:
            continue
        covered = len(seq.pages) * page_size if seq.prefill_only else hold_ahead(seq, position + 1)
        if position >= covered:
            continue
        page, offset = divmod(position, page_size)
        rows.input_ids.append(seq.mtp_draft[-1])
        rows.positions.append(position)
        rows.out_slots.append(seq.pages[page] * page_size + offset)
        rows.block_rows.append(seq.pages[: page + 1])
        going.append(head)
    ids, meta, _ = decode_inputs(rows, page_size, kv_cache.device)
    index = torch.tensor([h.row for h in going], dtype=torch.int64, device=hidden.device)
    logits, out = model.draft(ids, hidden[index], meta, kv_cache)
    for i, (head, guess) in enumerate(zip(going, logits.argmax(dim=-1).tolist(), strict=True)):
        head.seq.mtp_draft.append(guess)
        going[i] = Head(head.seq, head.position + 1, i, head.limit)
    return going, out
