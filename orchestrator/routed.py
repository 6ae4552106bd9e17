"""What the router's modules share about a request on the ranks: `RoutedRequest` (a request in
flight as the router accounts for it — its ranks, its load, how it ended or moved), `Limits`
(what every rank accepts), and why a request finds no rank to take it (`RouterNotReady`,
`Overloaded`, `RankUnreachable`). Plain data and errors: no Ray, no calls to the ranks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from workers.engine.messages import TokenDelta, short_error


class DuplicateRequest(ValueError):
    """A request named by the `rid` of one still running (HTTP 409, gRPC ALREADY_EXISTS)."""


class RouterNotReady(RuntimeError):
    """No rank can take the request (still loading, or dead)."""


class Overloaded(RouterNotReady):
    """Too many requests wait for their first token (`Router.max_queued_requests`): the
    client should retry later."""


class RankUnreachable(RouterNotReady):
    """A rank's `add_request` failed without refusing the request (the rank died or is
    dying): nothing ran, so another rank may take it."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"engine rank {rank}: {short_error(error)}")
        self.rank = rank


@dataclass(frozen=True)
class Limits:
    """What every rank accepts: the smallest of each value over the ranks."""

    vocab_size: int
    max_context_len: int
    kv_capacity_tokens: int


@dataclass
class RoutedRequest:
    """A request in flight, as the router accounts for it."""

    rid: str
    rank: int  # the rank that generates (colocated or decode)
    num_tokens: int  # prompt + max_new_tokens: the load it puts on its rank
    num_prompt_tokens: int
    prefill_rank: int | None = None  # disaggregated: the rank that computes the prompt
    queue: asyncio.Queue[TokenDelta] = field(default_factory=asyncio.Queue)
    # A prompt being scored on a prefill rank that does the whole request: its prompt tokens
    # count as queued there until its first token (so scoring requests spread by load too).
    queued_here: bool = False
    # Each side's `add_request` (rank, future): an abort is sent once its add reached the rank.
    adds: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    aborted: bool = False  # the client asked (`Router.abort`): a failure then is the abort's
    num_output_tokens: int = 0  # received from its rank so far (a resumed one's included)
    # Set when a failure of a rank (its own, an expert-parallel peer's, its instance scaled
    # down), not of the request, ended it: that rank and why. The router may then resume the
    # request elsewhere (`Router.generate`).
    lost: tuple[int, str] | None = None
    # `RankTable.num_downs` of its ranks when it was sent: whether a rank went down since.
    downs_at_start: dict[int, int] = field(default_factory=dict)
    # Migration between decode ranks (`KVMoves.move_from`): its rank was asked to hand it
    # off with its KV; the transfer id its KV then waits under there (its rank's last delta
    # says). A migrated attempt's `prefill_rank` is the decode rank its KV comes from.
    migrating: bool = False
    moved_to: str = ""
    moved_from: int | None = None  # a migrated attempt: the rank its KV comes from
    move_to: int | None = None  # the rank a move off a pressed rank was planned to
    num_input_tokens: int = 0  # the client's prompt (without output it resumes from)
    client_rid: str = ""  # the client's id for the request
    # Its receiving side's target went to the side that sends the KV (`dispatch`); once its
    # sides are told to abort (`abort_sides`) no target goes any more, so a receive whose
    # target never went may free its pages at once.
    target_sent: bool = False
    targets_closed: bool = False
    sender_pid: int | None = None  # the process of the side that sends the KV, at the start
    # The ranks it was sent to, (rank, prefill_rank): `prefill_rank` is cleared once the
    # prompt is done.
    pair: tuple[int, int | None] = field(init=False)

    def __post_init__(self) -> None:
        self.pair = (self.rank, self.prefill_rank)
