"""Speculative decoding by n-gram lookup: drafts from a request's own tokens, verified in one step.

Outputs often repeat what came before them — code being edited, a document being summarized
or quoted, a list that follows a pattern, a model stuck in a loop. When the last `n` tokens of
a request (prompt and output) occurred earlier, the tokens that followed them then are a cheap
guess at what follows now. The decode step then reads the request's pending token and up to
`k` guessed ones as `k + 1` decode rows at consecutive positions (each row writes its KV before
any row attends, so each sees the ones before it), and the model's own greedy choice at each
row says how far the guess holds: the guessed tokens that match are kept, plus the model's
token after the last of them. A step thus yields 1 to `k + 1` tokens, exactly those greedy
decoding would have yielded one step at a time, and rows that missed cost only their share of
the step (their KV, past the request's computed tokens, is written over later).

How many tokens a request guesses adapts to how its guesses fare: after a step it guesses one
more than its guesses kept (all of `k` while every guess holds, one after a miss), so a request
whose output does not repeat costs at most one extra row a step.

Only requests whose next token is the argmax of the model's plain logits take part: greedy,
without penalties, logit bias, a minimum length, logprobs or a constraint (each of those makes
a row's choice depend on the tokens before it in ways the rows would have to replay).
"""

from __future__ import annotations

from workers.engine.sequence import Sequence


def can_speculate(seq: Sequence) -> bool:
    sp = seq.sampling
    return (
        sp.is_greedy
        and not sp.adjusts_logits
        and not sp.logprobs
        and seq.matcher is None
        and not seq.prefill_only
    )


class NgramIndex:
    """Where each n-gram (`min_n <= n <= max_n`) of one request's tokens last ended, kept up to
    date as tokens are appended; `propose` looks the newest tokens up."""

    def __init__(self, min_n: int, max_n: int, max_guess: int):
        self.min_n, self.max_n = min_n, max_n
        self.max_guess = max_guess
        self.guess_len = max_guess  # how many to guess next (`update`)
        self._last_end: dict[tuple[int, ...], int] = {}
        # For each n, where the n tokens ending the sequence last occurred before (or -1).
        self._earlier = [-1] * (max_n + 1)
        self._num_indexed = 0

    def _catch_up(self, tokens: list[int]) -> None:
        last_end, earlier = self._last_end, self._earlier
        for end in range(self._num_indexed, len(tokens)):
            for n in range(self.min_n, self.max_n + 1):
                if end + 1 < n:
                    earlier[n] = -1
                    continue
                gram = tuple(tokens[end + 1 - n : end + 1])
                earlier[n] = last_end.get(gram, -1)
                last_end[gram] = end
        self._num_indexed = len(tokens)

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` (and `guess_len`) tokens that followed the longest earlier occurrence
        of the newest n-gram (the most recent such occurrence); [] when none occurred."""
        limit = min(limit, self.guess_len)
        if len(tokens) < self._num_indexed:  # the tokens were cut back: start over
            self._last_end.clear()
            self._num_indexed = 0
        self._catch_up(tokens)
        for n in range(self.max_n, self.min_n - 1, -1):
            end = self._earlier[n]
            if end >= 0:
                return tokens[end + 1 : end + 1 + limit]
        return []

    def update(self, num_guessed: int, num_kept: int) -> None:
        """A step verified `num_guessed` guesses and kept `num_kept`: guess one more than
        that next time, up to `max_guess`."""
        self.guess_len = min(self.max_guess, num_kept + 1)


def num_accepted(draft: list[int], predicted: list[int]) -> int:
    """How many guessed tokens hold: `predicted[i]` is the model's choice after the row that
    read `draft[i - 1]` (row 0 read the pending token), so guess `i` holds while every guess
    up to it equals the choice before it."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return n
