"""A scheduled batch as the model takes it: token ids, `AttentionMetadata`, and which requests
sample from which logits row; and the prompt logprobs a forward scored, back to their requests.

Decode rows come first, one per decoding request, then each prefill chunk's tokens. The index
tensors are built from `array`s (`torch.frombuffer`): several times cheaper per element than
`torch.tensor` on a list, which a decode step of a large batch would otherwise pay each step.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import NamedTuple

import torch

from workers.engine.messages import TokenLogprob
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.model.batch import AttentionMetadata, PrefillSpan


class DecodeRows(NamedTuple):
    """The decoding requests' new token each — and, for a request with guessed tokens
    (`Sequence.draft`), a row for each of those after it — : id, position, KV slot, and the
    pages of its context (the row's token included)."""

    input_ids: list[int]
    positions: list[int]
    out_slots: list[int]
    block_rows: list[list[int]]


class ModelInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    samplers: list[Sequence]  # the request of each row of the logits, in order


def decode_rows(decodes: Iterable[Sequence], page_size: int) -> DecodeRows:
    """The rows of one step (read at once: `block_rows` may be the requests' own page lists)."""
    rows = DecodeRows([], [], [], [])
    input_ids, positions, out_slots, block_rows = rows
    for seq in decodes:
        pos = seq.num_computed
        pages = seq.pages
        input_ids.append(seq.token_ids[pos])
        positions.append(pos)
        page, offset = divmod(pos, page_size)
        out_slots.append(pages[page] * page_size + offset)
        # The pages of its context: usually all it holds (a copy only when it holds more).
        block_rows.append(pages if len(pages) == page + 1 else pages[: page + 1])
        for token in seq.draft:
            pos += 1
            page, offset = divmod(pos, page_size)
            input_ids.append(token)
            positions.append(pos)
            out_slots.append(pages[page] * page_size + offset)
            block_rows.append(pages if len(pages) == page + 1 else pages[: page + 1])
    return rows


def row_samplers(decodes: Iterable[Sequence]) -> list[Sequence]:
    """The request of each decode row, in `decode_rows`' order."""
    return [seq for seq in decodes for _ in range(1 + len(seq.draft))]


def prepare_inputs(batch: ScheduledBatch, page_size: int, device: torch.device) -> ModelInputs:
    rows = decode_rows(batch.decodes, page_size)
    ids = array("q", rows.input_ids)
    positions = array("q", rows.positions)
    out_slots = [_ints(rows.out_slots, "q")]
    num_rows = len(rows.input_ids)
    logits_rows = array("q", range(num_rows))
    samplers = row_samplers(batch.decodes) if num_rows > len(batch.decodes) else list(batch.decodes)
    spans = []
    score_rows = array("q")
    score_targets = array("q")
    score_top = 0
    for seq, num in batch.prefills:
        start, end = seq.num_computed, seq.num_computed + num
        ctx = seq.slots(end, page_size)
        spans.append(PrefillSpan(len(ids), num, ctx.to(device)))
        ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        out_slots.append(ctx[start:])
        if seq.sampling.prompt_logprobs:
            if start == 0:
                seq.prompt_logprobs = [None]  # the first token follows nothing
            # Row of position p is scored against prompt token p + 1.
            first_row = len(ids) - num
            for p in scored_positions(seq, start, num):
                score_rows.append(first_row + p - start)
                score_targets.append(seq.token_ids[p + 1])
            score_top = max(score_top, seq.sampling.top_logprobs)
        if end == seq.num_tokens:
            logits_rows.append(len(ids) - 1)
            samplers.append(seq)

    meta = AttentionMetadata(
        positions=_ints(positions).to(device),
        out_slots=(out_slots[0] if len(out_slots) == 1 else torch.cat(out_slots)).to(device),
        num_decode=num_rows,
        block_table=_block_table(rows.block_rows).to(device),
        seq_lens=_ints([p + 1 for p in rows.positions], "i").to(device),
        page_size=page_size,
        prefills=spans,
        logits_indices=_ints(logits_rows).to(device),
    )
    if score_rows:
        meta.score_rows = _ints(score_rows).to(device)
        meta.score_targets = _ints(score_targets).to(device)
        meta.score_top = score_top
    return ModelInputs(_ints(ids).to(device), meta, samplers)


def decode_inputs(rows: DecodeRows, page_size: int, device: torch.device) -> ModelInputs:
    """Decode rows alone as the model takes them, every row's logits wanted (`samplers`
    left empty: the caller knows whose rows they are)."""
    num_rows = len(rows.input_ids)
    meta = AttentionMetadata(
        positions=_ints(rows.positions).to(device),
        out_slots=_ints(rows.out_slots).to(device),
        num_decode=num_rows,
        block_table=_block_table(rows.block_rows).to(device),
        seq_lens=_ints([p + 1 for p in rows.positions], "i").to(device),
        page_size=page_size,
        prefills=[],
        logits_indices=_ints(list(range(num_rows))).to(device),
    )
    return ModelInputs(_ints(rows.input_ids).to(device), meta, [])


def _block_table(block_rows: list[list[int]]) -> torch.Tensor:
    """`[rows, max_pages]` int32: each row's pages, padded (past a context: unspecified)."""
    max_pages = max((len(r) for r in block_rows), default=1)
    table = array("i")
    padding = _zeros(max_pages)
    for r in block_rows:
        table.extend(r)
        if len(r) < max_pages:
            table.extend(padding[len(r) :])
    return _ints(table, "i").view(-1, max_pages)


def take_prompt_scores(batch: ScheduledBatch, meta: AttentionMetadata) -> None:
    """Append the prompt logprobs the forward scored to their requests (in `prepare_inputs`'
    order: span by span, position by position). Call before the batch's `num_computed`
    advance."""
    if meta.scores is None:
        return
    chosen = meta.scores.target_logprobs.tolist()
    top_vals, top_ids = meta.scores.top_logprobs.tolist(), meta.scores.top_ids.tolist()
    row = 0
    for seq, num in batch.prefills:
        if not seq.sampling.prompt_logprobs:
            continue
        k = seq.sampling.top_logprobs
        for _ in scored_positions(seq, seq.num_computed, num):
            pairs = tuple(zip(top_ids[row][:k], top_vals[row][:k], strict=True))
            seq.prompt_logprobs.append(TokenLogprob(chosen[row], pairs))
            row += 1


def scored_positions(seq: Sequence, start: int, num: int) -> range:
    """Positions of a prefill chunk (`num` tokens from `start`) whose rows are scored for
    prompt logprobs: those followed by another prompt token."""
    return range(start, max(start, min(start + num, seq.num_prompt_tokens - 1)))


_DTYPES = {"q": torch.int64, "i": torch.int32}


def _ints(values: array[int] | list[int], typecode: str = "q") -> torch.Tensor:
    """A CPU tensor (int64 for "q", int32 for "i") over `values`' memory when it is an array of
    that type, else over a copy."""
    data = values if isinstance(values, array) and values.typecode == typecode else None
    if data is None:
        data = array(typecode, values)
    if not data:
        return torch.empty(0, dtype=_DTYPES[typecode])
    return torch.frombuffer(data, dtype=_DTYPES[typecode])


def _zeros(n: int) -> array[int]:
    return array("i", bytes(4 * n))
