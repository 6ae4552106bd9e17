"""Which ranks take a new request: a pure function of the router's view of each rank's load.

The router keeps the load it put on each rank itself (exact and current, unlike stats polled
from the ranks): prompt tokens waiting for prefill, tokens reserved (prompt + max new tokens of
each request, what the request may come to hold in KV), and running requests.

- Prefill rank: the fewest queued prompt tokens (it finishes the new prompt first); ties go to
  fewer running requests, then to the lower index.
- Decode (or colocated) rank: the most free KV tokens after its reservations (so that a rank with
  a larger KV pool takes more); ties go to fewer running requests, then to the lower index.
- A request moving with its KV (its decode or colocated instance is scaled down, or another
  joined) goes to the rank of that role with the most free KV tokens, as a new one would
  (`pick_receiver`).
- Prefix affinity: prompts that begin alike prefer one rank to compute them (its prefix cache
  then holds that beginning: `orchestrator.ranks.preferred_rank`, the same in every router of
  a deployment), and one decode rank (whose prefix cache then holds the beginning's KV, which
  needs no transfer), each taking one while it is within `slack_tokens` of the best choice
  above (queued prompt tokens for a prefill rank, free KV tokens for a decode or colocated
  one); otherwise the best choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple


class RankLoad(NamedTuple):  # (a tuple: a table of hundreds of ranks builds one per rank per pick)
    role: str  # colocated | prefill | decode
    alive: bool
    kv_capacity_tokens: int
    num_queued_prefill_tokens: int = 0  # prompt tokens sent to it whose prefill is not done
    num_reserved_tokens: int = 0  # prompt + max_new_tokens of the requests it holds
    num_running: int = 0  # requests it holds

    @property
    def free_kv_tokens(self) -> int:
        return self.kv_capacity_tokens - self.num_reserved_tokens


class Affinity(NamedTuple):
    """Prefer `rank` to compute the prompt, and `decode_rank` to generate (disaggregated),
    each while its load is within `slack_tokens` of the best rank's of its role."""

    rank: int | None
    slack_tokens: int
    decode_rank: int | None = None


class Pick(NamedTuple):
    rank: int  # generates: a decode or colocated rank
    prefill_rank: int | None  # disaggregated: computes the prompt


def pick_ranks(
    loads: Sequence[RankLoad], avoid: frozenset[int] = frozenset(), affinity: Affinity | None = None
) -> Pick | None:
    """The ranks for a new request, or None when no live rank (outside `avoid`) can take it.
    Disaggregated when any rank is a prefill or decode rank: then it needs one live of each.
    `affinity` may pick the rank that computes the prompt (prefill or colocated) and the
    decode rank."""
    live = [i for i, load in enumerate(loads) if load.alive and i not in avoid]
    slack = affinity.slack_tokens if affinity is not None else 0

    def best(
        role: str, key: Callable[[int], tuple[int, int, int]], preferred: int | None
    ) -> int | None:
        candidates = [i for i in live if loads[i].role == role]
        if not candidates:
            return None
        top = min(candidates, key=key)
        if preferred in candidates and key(preferred)[0] <= key(top)[0] + slack:
            return preferred
        return top

    def prefill_key(i: int) -> tuple[int, int, int]:
        return (loads[i].num_queued_prefill_tokens, loads[i].num_running, i)

    def decode_key(i: int) -> tuple[int, int, int]:
        return (-loads[i].free_kv_tokens, loads[i].num_running, i)

    if any(load.role in ("prefill", "decode") for load in loads):
        prefill = best("prefill", prefill_key, affinity.rank if affinity else None)
        decode = best("decode", decode_key, affinity.decode_rank if affinity else None)
        if prefill is None or decode is None:
            return None
        return Pick(decode, prefill)
    rank = best("colocated", decode_key, affinity.rank if affinity else None)
    return None if rank is None else Pick(rank, None)


def pick_receiver(
    loads: Sequence[RankLoad], avoid: frozenset[int] = frozenset(), role: str = "decode"
) -> int | None:
    """The rank of `role` a request moving with its KV goes to (no prefill rank is
    involved), or None when no live one outside `avoid` is left."""
    live = [i for i, load in enumerate(loads) if load.alive and i not in avoid]
    candidates = [i for i in live if loads[i].role == role]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (-loads[i].free_kv_tokens, loads[i].num_running, i))
