"""Random cuts of a text, as a stream's deltas would arrive (for the streaming parsers)."""

from __future__ import annotations

import random


def random_pieces(text: str, rng: random.Random, max_len: int) -> list[str]:
    """`text` cut into consecutive pieces of 1 to `max_len` characters."""
    pieces = []
    i = 0
    while i < len(text):
        k = rng.randint(1, max_len)
        pieces.append(text[i : i + k])
        i += k
    return pieces
