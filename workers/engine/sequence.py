"""`Sequence`: one request's tokens, pages and progress inside an engine rank."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from workers.engine.grammar import Matcher
from workers.engine.messages import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from workers.engine.speculative import NgramIndex


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)computation of its tokens
    RUNNING = "running"
    AWAITING_KV = "awaiting_kv"  # decode side: queued for pages to receive its prompt's KV into
    RECEIVING = "receiving"  # decode side: pages reserved, the prefill side is writing them
    HANDOFF = "handoff"  # prefill side: prefill done, pages held until they are sent
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        arrival: int,
        generator: torch.Generator | None = None,
        prefill_only: bool = False,
        stream: bool = True,
    ):
        self.rid = rid
        self.token_ids = list(prompt_ids)  # prompt, then generated tokens
        self.num_prompt_tokens = len(prompt_ids)
        self.sampling = sampling
        self.arrival = arrival  # admission order; the newest is preempted first
        self.generator = generator
        self.prefill_only = prefill_only  # prefill side of a disaggregated request
        self.stream = stream  # False: its deltas may be held until it ends (StreamBuffer)
        self.status = SeqStatus.WAITING
        self.pages: list[int] = []
        self.num_computed = 0  # tokens whose latent KV is in the cache
        self.num_preemptions = 0
        # Prefix caching: leading pages published (or found) in the cache, the key of the last
        # one, and the prompt tokens the cache spared the request's first admission.
        self.num_published = 0
        self.last_key = b""
        self.num_cached_tokens = 0
        # Decode side: leading prompt pages this rank's prefix cache held when the request got
        # pages; the prefill rank sends only the pages after them.
        self.num_reused_pages = 0
        # Decode side: it moves here from another decode rank, whose KV of all its tokens but
        # the last arrives (`num_sent_tokens`); no token comes with it.
        self.migrated = False
        self.cacheable = True  # False after a cache flush, for the pages it holds then
        # Asked for prompt logprobs: one per prompt token scored so far (None for the first).
        self.prompt_logprobs: list[TokenLogprob | None] = []
        # Prefill side: the first token's logprob (when asked), sent along with the KV.
        self.first_logprob: TokenLogprob | None = None
        # Prefill side, parked (`Scheduler.park`): the first token and its logprob, sampled
        # before its pages were taken back; its next prefill sends them instead of a new draw.
        self.kept_first: tuple[int, TokenLogprob | None] | None = None
        # Structured output: where the output stands in its constraint (None: free text).
        self.matcher: Matcher | None = None
        # Speculative decoding (`workers.engine.speculative`): the tokens guessed to follow the
        # pending one, read in this step's decode rows ([] when none), and the n-gram index
        # the guesses come from (built at the first guess).
        self.draft: list[int] = []
        self.ngrams: NgramIndex | None = None
        # With the MTP draft model: its guess at the token after the pending one, from the
        # step that appended the pending one (`workers.engine.mtp_draft`).
        self.mtp_draft: list[int] = []
        self.num_verify_steps = 0  # decode steps it took on a rank that guesses (SGLang's
        # `spec_verify_ct`: output tokens / this is how many tokens a step gave it)
        self._slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the prompt (or its rest) or the last sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def num_sent_tokens(self) -> int:
        """Decode side, before its KV arrives: the tokens whose KV the sending rank writes —
        the prompt (and a resumed request's output), or a migrated request's tokens but its
        last, which the next step computes."""
        return self.num_tokens - 1 if self.migrated else self.num_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_computed > 0 and self.num_pending == 1

    def add_pages(self, pages: list[int]) -> None:
        self.pages.extend(pages)
        self._slots = None

    def release_pages(self) -> list[int]:
        pages, self.pages, self._slots = self.pages, [], None
        self.num_published, self.last_key, self.cacheable = 0, b"", True
        return pages

    def slots(self, num_tokens: int, page_size: int) -> torch.Tensor:
        """Cache slots `[num_tokens]` of the first `num_tokens` tokens (int64, CPU)."""
        if self._slots is None:
            pages = torch.tensor(self.pages, dtype=torch.int64)
            self._slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()
        return self._slots[:num_tokens]
