"""`IncrementalDetokenizer`: one request's output tokens → text deltas, with stop strings.

Decoding token by token breaks two things: a character whose UTF-8 bytes span several tokens
decodes to U+FFFD until its last byte arrives, and tokenizers that drop a word's leading space at
the start of a decode would glue words together. So each step decodes a short window that starts
a few tokens back (`prefix_offset`) and emits only what the new tokens add to it, holding back
text that still ends in an incomplete character.

A tokenizer that offers an incremental decoder (`decode_stream`: `tokenizers`' `DecodeStream`,
which does the same in one native call per step, ~5x cheaper) is stepped instead; the window
decode then serves only `flush`, for a last character left incomplete.

Stop strings are searched in the text, not the tokens: a match may span deltas, the text is cut
before it, and while streaming, a tail that could be the start of a stop string is held back until
it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, for correct spacing


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class TokenStream(Protocol):
    def step(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        min_new_tokens: int = 0,
    ):
        """`min_new_tokens`: stop strings count only from that many output tokens on (a match
        that ends earlier is ignored, as in vLLM and SGLang)."""
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self.text = ""  # the output text so far (cut before a matched stop string)
        self._num_sent = 0  # characters of `text` already returned
        self.matched_stop: str | None = None
        self._min_new_tokens = min_new_tokens
        self._num_output_tokens = 0
        self.num_taken = 0  # of the last `add`'s tokens, those the output keeps
        make_stream = getattr(tokenizer, "decode_stream", None)
        self._stream: TokenStream | None = (
            make_stream(self._ids, skip_special_tokens) if make_stream is not None else None
        )

    @property
    def stopped(self) -> bool:
        return self.matched_stop is not None

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text that is now safe to show.

        Once a stop string is found, `matched_stop` is set, the returned text ends right before
        it, and later calls return ''. `num_taken` then says how many of these tokens the output
        keeps: those up to the one that completed the stop string (all of them otherwise)."""
        self.num_taken = 0
        if self.stopped or not token_ids:
            return ""
        if self._stop and len(token_ids) > 1:
            # One at a time: the output ends at the token that completes a stop string, the
            # same token however the rank's deltas happen to group them.
            for token in token_ids:
                self._add_tokens((token,))
                self.num_taken += 1
                if self.stopped:
                    break
        else:
            self._add_tokens(token_ids)
            self.num_taken = len(token_ids)
        return self._take(final=False)

    def _add_tokens(self, token_ids: Sequence[int]) -> None:
        self._ids.extend(token_ids)
        self._num_output_tokens += len(token_ids)
        if self._stream is not None:
            piece = self._stream.step(token_ids)
            if piece:  # else an incomplete character: `flush` decodes it if nothing follows
                self._prefix_offset = max(0, len(self._ids) - _PROMPT_CONTEXT_TOKENS)
                self._read_offset = len(self._ids)
                self._append(piece)
            return
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(window)
        if full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text):
            return  # an incomplete character (or nothing visible yet): wait for more tokens
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._append(full_text[len(prefix_text) :])

    def flush(self) -> str:
        """Generation ended: return everything still held back (an incomplete character too)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full_text = self._decode(self._ids[self._prefix_offset :])
            self._read_offset = self._prefix_offset = len(self._ids)
            self._append(full_text[len(prefix_text) :])
        return self._take(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _append(self, new_text: str) -> None:
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += new_text
        if self._num_output_tokens < self._min_new_tokens:
            return
        best: tuple[int, str] | None = None
        for s in self._stop:
            at = self.text.find(s, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            self.text = self.text[: best[0]]
            self.matched_stop = best[1]

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._stop_prefix_len(self.text[self._num_sent :])
        out = self.text[self._num_sent : end]
        self._num_sent = end
        return out

    def _stop_prefix_len(self, tail: str) -> int:
        """Length of the longest end of `tail` that begins some stop string."""
        for k in range(min(len(tail), self._max_stop_len - 1), 0, -1):
            end = tail[-k:]
            if any(s.startswith(end) for s in self._stop):
                return k
        return 0
