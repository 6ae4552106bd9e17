"""Speculative decoding by n-gram lookup: drafts from a request's own tokens, verified in one step.

Outputs often repeat what came before them — code being edited, a document being summarized
or quoted, a list that follows a pattern, a model stuck in a loop. When the last `n` tokens of
a request (prompt and output) occurred earlier, the tokens that followed them then are a cheap
guess at what follows now. The decode step then reads the request's pending token and up to
`k` guessed ones as `k + 1` decode rows at consecutive positions (each row writes its KV before
any row attends, so each sees the ones before it), and the model's own choice at each
row says how far the guess holds: the guessed tokens that match are kept, plus the model's
token after the last of them. A step thus yields 1 to `k + 1` tokens, exactly those plain
decoding would have yielded one step at a time, and rows that missed cost only their share of
the step (their KV, past the request's computed tokens, is written over later).

How many tokens a request guesses adapts to how its guesses fare: after a step it guesses one
more than its guesses kept (all of `k` while every guess holds, one after a miss), so a request
whose output does not repeat costs at most one extra row a step.

Sampled requests guess too. Each row draws its token from its own distribution with the
next uniform number of the request's generator, so a row whose guessed tokens before it all
held draws exactly what plain decoding would have drawn at that position; after the step the
generator is set back to have made one draw per token kept (`Speculator.verify`). A seeded
request thus gives the same tokens with guessing as without, and an unseeded one tokens of the
same distribution. Logprobs are per row, so requests that ask for them guess as well; so do
penalized ones and those short of a minimum length: each row's penalties and EOS ban look at
the request's tokens and the guesses before the row, as if they had been drawn.

A request with a constraint (structured output) guesses the text its constraint forces next
when there is such (a JSON schema's keys and punctuation: `Matcher.forced_tokens`), else from
n-grams; each row is masked by what the constraint allows after the guesses before it (the
matcher walks them and back, `Matcher.fill`), and kept tokens are taken by the matcher as
they are appended. Only the prefill side of a disaggregated request never guesses.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from workers.engine.admission import skip_draws
from workers.engine.config import EngineConfig
from workers.engine.sequence import Sequence


def can_speculate(seq: Sequence) -> bool:
    return not seq.prefill_only


_MASK = (1 << 64) - 1
_BULK = 64  # tokens indexed at once with numpy past this many (a prompt), one by one below


def _multipliers(count: int) -> list[int]:
    """A fixed odd 64-bit multiplier per place in an n-gram: its key is the sum of its tokens
    times these, modulo 2**64. Two n-grams sharing a key only make a worse guess, which the
    model's choices then turn down: the output does not depend on the keys."""
    rng = random.Random(0x5EED)
    return [rng.getrandbits(64) | 1 for _ in range(count)]


class NgramIndex:
    """Where each n-gram (`min_n <= n <= max_n`) of one request's tokens last ended, kept up to
    date as tokens are appended; `propose` looks the newest tokens up. A prompt is indexed in
    bulk (numpy: ~70 ms for 128k tokens, where a Python loop took ~230 ms of one engine
    step), each generated token on its own."""

    def __init__(self, min_n: int, max_n: int, max_guess: int):
        self.min_n, self.max_n = min_n, max_n
        self.max_guess = max_guess
        self.guess_len = max_guess  # how many to guess next (`update`)
        self._mult = _multipliers(max_n)
        self._last_end: list[dict[int, int]] = [{} for _ in range(max_n + 1)]  # by n: key -> end
        # For each n, where the n tokens ending the sequence last occurred before (or -1).
        self._earlier = [-1] * (max_n + 1)
        self._num_indexed = 0

    def _key(self, tokens: list[int], end: int, n: int) -> int:
        m, start = self._mult, end + 1 - n
        return sum(tokens[start + i] * m[i] for i in range(n)) & _MASK

    def _bulk(self, tokens: list[int], start: int, stop: int) -> None:
        """Index the n-grams ending at `start` .. `stop - 1` (later ones win, as one by one)."""
        for n in range(self.min_n, self.max_n + 1):
            first = max(start, n - 1)
            if first >= stop:
                continue
            count = stop - first
            window = np.asarray(tokens[first + 1 - n : stop], dtype=np.uint64)
            keys = np.zeros(count, dtype=np.uint64)
            for i in range(n):  # wraps modulo 2**64, as `_key` masks
                keys += window[i : i + count] * np.uint64(self._mult[i])
            self._last_end[n].update(zip(keys.tolist(), range(first, stop), strict=True))

    def catch_up(self, tokens: list[int]) -> None:
        """Index the n-grams of `tokens` (the same list, grown) not indexed yet."""
        if len(tokens) - self._num_indexed > _BULK:  # all but the newest: only its lookup counts
            self._bulk(tokens, self._num_indexed, len(tokens) - 1)
            self._num_indexed = len(tokens) - 1
        earlier = self._earlier
        for end in range(self._num_indexed, len(tokens)):
            for n in range(self.min_n, self.max_n + 1):
                if end + 1 < n:
                    earlier[n] = -1
                    continue
                key, last_end = self._key(tokens, end, n), self._last_end[n]
                earlier[n] = last_end.get(key, -1)
                last_end[key] = end
        self._num_indexed = len(tokens)

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` (and `guess_len`) tokens that followed the longest earlier occurrence
        of the newest n-gram (the most recent such occurrence); [] when none occurred."""
        limit = min(limit, self.guess_len)
        if len(tokens) < self._num_indexed:  # the tokens were cut back: start over
            for last_end in self._last_end:
                last_end.clear()
            self._num_indexed = 0
        self.catch_up(tokens)
        for n in range(self.max_n, self.min_n - 1, -1):
            end = self._earlier[n]
            if end >= 0:
                return tokens[end + 1 : end + 1 + limit]
        return []

    def update(self, num_guessed: int, num_kept: int) -> None:
        """A step verified `num_guessed` guesses and kept `num_kept`: guess one more than
        that next time, up to `max_guess`."""
        self.guess_len = min(self.max_guess, num_kept + 1)

    def find(self, corpus: list[int], tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed, in `corpus` (what this index has indexed), the
        last occurrence of the longest n-gram that ends `tokens` (another token list)."""
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) < n:
                continue
            end = self._last_end[n].get(self._key(tokens, len(tokens) - 1, n))
            if end is not None and end + 1 < len(corpus):
                return corpus[end + 1 : end + 1 + limit]
        return []


class SharedNgrams:
    """The outputs of a rank's finished requests (each after the last prompt tokens that led
    to it), indexed like a request's own tokens: where a request's newest tokens occurred in
    an earlier request — the same question again, a template, an agent's repeated calls —
    what followed there is its guess. Holds at most `capacity` tokens: past that the newer
    half is kept and indexed afresh."""

    # Between two requests' tokens: no real token id, so no n-gram spans two requests.
    SEPARATOR = 1 << 40

    def __init__(self, min_n: int, max_n: int, capacity: int):
        self.min_n, self.max_n, self.capacity = min_n, max_n, capacity
        self.corpus: list[int] = []
        self.index = NgramIndex(min_n, max_n, 0)

    def add(self, tokens: list[int]) -> None:
        self.corpus += [self.SEPARATOR, *tokens[-self.capacity :]]
        if len(self.corpus) > self.capacity:
            self.corpus = self.corpus[-max(self.capacity // 2, 1) :]
            self.index = NgramIndex(self.min_n, self.max_n, 0)
        self.index.catch_up(self.corpus)

    def find(self, tokens: list[int], limit: int) -> list[int]:
        guess = self.index.find(self.corpus, tokens, limit)
        if self.SEPARATOR in guess:
            guess = guess[: guess.index(self.SEPARATOR)]
        return guess


def num_accepted(draft: list[int], predicted: list[int]) -> int:
    """How many guessed tokens hold: `predicted[i]` is the model's choice after the row that
    read `draft[i - 1]` (row 0 read the pending token), so guess `i` holds while every guess
    up to it equals the choice before it."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return n


class Speculator:
    """A rank's speculative decoding: the guesses `Scheduler.speculate` asks for, and what a
    step's rows make of them, counted."""

    def __init__(self, config: EngineConfig, max_context_len: int):
        self.mtp = config.speculative_mtp > 0  # guesses from the MTP module (else n-grams)
        self.max_guess = config.speculative_mtp if self.mtp else config.speculative_ngram
        self.min_n, self.max_n = config.speculative_ngram_min, config.speculative_ngram_max
        self.max_context_len = max_context_len
        self.shared: SharedNgrams | None = None
        if config.speculative_ngram_shared > 0:
            self.shared = SharedNgrams(self.min_n, self.max_n, config.speculative_ngram_shared)
        self.num_guessed_tokens = 0  # tokens guessed ...
        self.num_accepted_tokens = 0  # ... and of those, the ones the model's choices kept

    def guess(self, seq: Sequence, limit: int) -> list[int]:
        """Tokens guessed to follow `seq`'s pending one, at most `limit`, none past its
        `max_new_tokens` or the context length: what its constraint forces, else its own
        n-gram index's guess, else the shared index's (earlier requests'); with the MTP
        module, its guess (`Sequence.mtp_draft`) instead of n-grams."""
        if not can_speculate(seq):
            return []
        limit = min(
            limit, self.max_guess,
            seq.sampling.max_new_tokens - seq.num_output_tokens - 1,
            self.max_context_len - seq.num_tokens - 1,
        )  # fmt: skip
        if limit <= 0:
            return []
        if seq.matcher is not None:
            forced = seq.matcher.forced_tokens()
            if forced:
                return forced[:limit]
        if self.mtp:
            return seq.mtp_draft[:limit]
        if seq.ngrams is None:
            seq.ngrams = NgramIndex(self.min_n, self.max_n, self.max_guess)
        guess = seq.ngrams.propose(seq.token_ids, limit)
        if not guess and self.shared is not None:
            guess = self.shared.find(seq.token_ids, min(limit, seq.ngrams.guess_len))
        return guess

    def finished(self, seq: Sequence) -> None:
        """`seq` ended: its output (after its last prompt tokens) joins the shared index."""
        if self.shared is not None and seq.num_output_tokens > 0:
            self.shared.add(seq.token_ids[max(0, seq.num_prompt_tokens - self.max_n) :])

    @staticmethod
    def before_draw(decodes: list[Sequence]) -> dict[str, torch.Tensor] | None:
        """Before a step draws: each decoding request's step counted (`num_verify_steps`);
        the generator state of each sampled request whose rows read guesses ({} when only
        greedy ones guess), or None when no request guesses."""
        for seq in decodes:
            seq.num_verify_steps += 1
        guessed = [seq for seq in decodes if seq.draft]
        if not guessed:
            return None
        return {s.rid: s.generator.get_state() for s in guessed if s.generator is not None}

    def verify(self, seq: Sequence, chosen: list[int], state: torch.Tensor | None) -> list[int]:
        """The tokens `seq` keeps of a step whose rows read its guesses and drew `chosen`: the
        guesses confirmed, then the choice after the last of them. A sampled request's
        generator goes back to `state` (before the step) and on by one draw per token kept,
        as if it had drawn them one step at a time."""
        draft, seq.draft = seq.draft, []
        kept = num_accepted(draft, chosen)
        if seq.ngrams is not None:
            seq.ngrams.update(len(draft), kept)
        if seq.generator is not None:
            assert state is not None
            seq.generator.set_state(state)
            skip_draws(seq.generator, kept + 1)
        self.num_guessed_tokens += len(draft)
        self.num_accepted_tokens += kept
        return chosen[: kept + 1]
