"""What one forward step needs to know about its tokens besides their ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from workers.model.mla import PagedDecodeInputs


@dataclass
class PrefillSpan:
    """A run of `num_tokens` new tokens of one request, at the end of its `ctx_slots`.

    `ctx_slots: [ctx_len]` are the KV-cache slots of every token of the request up to and
    including this span (cached prefix first); query `i` of the span sits at position
    `ctx_len - num_tokens + i` and sees keys `0 ..` that position.
    """

    start: int  # index of the span's first token in the flattened batch
    num_tokens: int
    ctx_slots: torch.Tensor


class PromptScores(NamedTuple):
    """Log-probabilities of `AttentionMetadata.score_targets` (`[R]` float32) and the
    `score_top` most likely tokens per row (`[R, k]` float32 values and int64 ids)."""

    target_logprobs: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor


@dataclass
class AttentionMetadata:
    """Layout of a flattened mixed batch: `num_decode` single-token decode requests first, then
    prefill spans. All index tensors live on the model's device."""

    positions: torch.Tensor  # [T] absolute position of each token
    out_slots: torch.Tensor  # [T] cache slot each token's latent KV is written to
    num_decode: int
    # Decode contexts, paged: request i's token j sits in slot
    # `block_table[i, j // page_size] * page_size + j % page_size`, for j < seq_lens[i].
    block_table: torch.Tensor  # [num_decode, max_pages] int32; entries past a context unspecified
    seq_lens: torch.Tensor  # [num_decode] int32 context length, the new token included; 0: padding
    page_size: int
    prefills: list[PrefillSpan]
    logits_indices: torch.Tensor  # [S] rows whose logits are wanted (a request's last token)
    # Prompt scoring (prompt logprobs): rows whose next token is known, and that token.
    score_rows: torch.Tensor | None = None  # [R] int64 rows of the batch
    score_targets: torch.Tensor | None = None  # [R] int64: the token that follows each row
    score_top: int = 0  # how many of the most likely tokens to report per row
    # Set by the forward when `score_rows` is: the targets' log-probabilities and the top.
    scores: PromptScores | None = field(default=None, init=False, repr=False)
    # Set by a model with an MTP module: every row's final hidden state `[T, hidden]`.
    hidden: torch.Tensor | None = field(default=None, init=False, repr=False)
    # The torch decode attention's inputs derived from block_table/seq_lens, built by the
    # step's first layer and reused by the others (`workers.model.mla.PagedDecodeInputs`).
    paged_decode: PagedDecodeInputs | None = field(default=None, init=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])
