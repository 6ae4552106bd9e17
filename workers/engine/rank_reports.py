"""What an engine rank reports about itself rather than about a request: `RankInfo` once it is
ready (the `ready` actor call: its model, limits and KV capacity, its role and place), and
`RankStats` when polled (`stats`: its queue, pages, prefix cache, preemptions, guesses and
garbage collector so far, with `TransferTotals`, a disaggregated rank's KV transfers), and
`RouterLoad`, what each router's requests hold on it (`load_by_router`: a deployment's routers
count each other's load, `orchestrator.peer_load`). Small frozen dataclasses returned by actor
calls; the router's metrics read them (`orchestrator.cluster_metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from workers.engine.messages import router_of


class RouterLoad(NamedTuple):
    """What one router's requests (or all) hold on a rank."""

    reserved_tokens: int = 0  # prompt + max_new_tokens of each
    unstarted_prompt_tokens: int = 0  # the prompt tokens of those without output yet
    requests: int = 0
    # KV transfers in flight (a prompt's or a moving request's KV being sent, or received):
    # a request that left the rank's batch may still be sending its pages.
    transfers: int = 0


def loads_by_router(held: Iterable[Any], transfers: Iterable[str] = ()) -> dict[str, RouterLoad]:
    """The load of the requests `held` (an engine's `Sequence`s) and of the KV transfers in
    flight (their ids) by their router's tag (`messages.router_of`; "" for the primary)."""
    out: dict[str, list[int]] = {}
    for s in held:
        load = out.setdefault(router_of(s.rid), [0, 0, 0, 0])
        load[0] += s.num_prompt_tokens + s.sampling.max_new_tokens
        load[1] += s.num_prompt_tokens if len(s.token_ids) == s.num_prompt_tokens else 0
        load[2] += 1
    for rid in transfers:
        out.setdefault(router_of(rid), [0, 0, 0, 0])[3] += 1
    return {tag: RouterLoad(*load) for tag, load in out.items()}


@dataclass(frozen=True)
class RankInfo:
    """What a rank tells the router once it is ready."""

    model_name: str
    model_type: str
    vocab_size: int
    max_context_len: int
    eos_token_ids: tuple[int, ...]
    kv_capacity_tokens: int
    page_size: int
    num_pages: int
    role: str = "colocated"  # colocated | prefill | decode
    node: str = ""  # address of the node the rank runs on
    node_id: str = ""  # Ray node id
    instance: int = 0  # which instance of its pool
    pool_rank: int = 0  # its rank within the pool instance (expert-parallel group)
    pool_size: int = 1
    pid: int = 0  # the rank's process (it changes when Ray restarts the rank)
    # It hands requests off to another rank of its role with their KV and takes them
    # (`KVMoves.move_from`): decode ranks, and colocated ones started with a transfer engine.
    migrates: bool = False


@dataclass(frozen=True)
class TransferTotals:
    """A disaggregated rank's KV transfers since it started, by side (a prefill rank sends, a
    decode rank receives): ended ones by outcome, the bytes the successful ones moved and
    their seconds from `send` / `expect` to the end (a sender's include the wait for its
    target, a receiver's the wait for the prompt to be computed)."""

    sent: int = 0
    send_failed: int = 0
    sent_bytes: int = 0
    send_seconds: float = 0.0
    received: int = 0
    receive_failed: int = 0
    received_bytes: int = 0
    receive_seconds: float = 0.0
    sent_ahead: int = 0  # of the sent ones, those with layers written as the prefill computed them

    def add(
        self, role: str, ok: bool, num_bytes: int, elapsed_s: float, ahead: bool = False
    ) -> TransferTotals:
        """These totals with one more ended transfer (`role`: "send" or "recv"; `ahead`: a
        send with layers written ahead)."""
        done, failed, moved, took = TRANSFER_FIELDS["send" if role == "send" else "receive"]
        if not ok:
            return replace(self, **{failed: getattr(self, failed) + 1})
        return replace(
            self,
            **{
                done: getattr(self, done) + 1,
                moved: getattr(self, moved) + num_bytes,
                took: getattr(self, took) + elapsed_s,
            },
            sent_ahead=self.sent_ahead + (role == "send" and ahead),
        )


# `TransferTotals`' fields per side: (ended ok, failed, bytes moved, seconds).
TRANSFER_FIELDS = {
    "send": ("sent", "send_failed", "sent_bytes", "send_seconds"),
    "receive": ("received", "receive_failed", "received_bytes", "receive_seconds"),
}


@dataclass(frozen=True)
class RankStats:
    num_running: int
    num_waiting: int
    num_pages_total: int
    num_pages_free: int
    num_steps: int
    num_generated_tokens: int
    num_in_transfer: int = 0  # disaggregated: waiting for pages, receiving or sending KV
    num_pages_cached: int = 0  # of the free pages, those holding a published prefix
    num_prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache so far
    num_prefix_hit_tokens: int = 0  # of those, found computed (not computed again)
    num_prefix_host_hit_tokens: int = 0  # of those, found in the host tier (copied back)
    num_host_cached_pages: int = 0  # pages in the prefix cache's host tier now
    # Decode side: prompt tokens whose KV was already here (its prefix cache), not transferred.
    num_transfer_skipped_tokens: int = 0
    # Prefill side: computed prompts whose pages were taken back for a prompt whose decode
    # pages were reserved (`Scheduler.park`).
    num_parked: int = 0
    num_preemptions: int = 0  # running requests put back in the queue for lack of pages
    num_swapped_out: int = 0  # of those, the ones whose KV went to host memory (`KVSwap`)
    num_swapped_tokens: int = 0  # tokens of KV held in host memory now
    # Speculative decoding: tokens guessed so far, and of those the ones the model confirmed.
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    # Requests that came with their KV from another rank of its role (a scale-down, KV relief:
    # whichever router moved them), counted as each is announced to wait for its KV.
    num_moved_in: int = 0
    # Decode side: pages of failed receives, held (in use, by no request) until their sender
    # cannot write them any more (`KVHandoff`).
    num_pages_held: int = 0
    transfers: TransferTotals = TransferTotals()
    # The requests it holds, whichever router sent them (`EngineWorker.stats` counts them):
    # prompt + max_new_tokens of each, and the prompt tokens of those without output yet.
    num_reserved_tokens: int = 0
    num_unstarted_prompt_tokens: int = 0
    # The process's garbage collector since the rank started (`workers.gc_pauses`).
    gc_seconds: float = 0.0
    gc_longest_pause_s: float = 0.0

    @property
    def num_pages_used(self) -> int:
        return self.num_pages_total - self.num_pages_free
