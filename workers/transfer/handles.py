"""`KVSender` / `KVReceiver`: the caller's view of one transfer, one per side. The caller reads
`state`, `error` (and the receiver's `first_token`); only the engine's thread writes them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from workers.transfer.ahead import AheadWrites
from workers.transfer.messages import FirstLogprob, TransferState, TransferTarget


@dataclass(eq=False)
class KVSender:
    """The sending side of one transfer. The caller reads `state` and `error`; the engine's
    thread moves them."""

    transfer_id: str
    src_pages: tuple[int, ...]
    first_token: int
    deadline: float
    target: TransferTarget | None = None
    first_logprob: FirstLogprob | None = None
    num_cached_tokens: int = 0
    guesses: tuple[int, ...] = ()
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    layers_ahead: int = 0  # layers its writes ahead had landed (`write_ahead`), once it wrote
    _abort: str | None = field(default=None, repr=False)
    _handle: Any = field(default=None, repr=False)
    _ahead: AheadWrites | None = field(default=None, repr=False)  # adopted, until settled
    _attempts: int = field(default=0, repr=False)
    _retry_at: float = field(default=0.0, repr=False)
    _cancel_failed_at: float | None = field(default=None, repr=False)


@dataclass(eq=False)
class KVReceiver:
    """The receiving side of one transfer: give `target` to the sending rank. The caller reads
    `state`, `error` and, once SUCCESS, `first_token`; the engine's thread moves them."""

    transfer_id: str
    target: TransferTarget
    deadline: float
    timeout_s: float = 0.0  # how far a `wait` or `start` from the sender moves `deadline`
    state: TransferState = TransferState.WAITING
    error: str | None = None
    first_token: int | None = None
    first_logprob: FirstLogprob | None = None
    num_cached_tokens: int = 0
    guesses: tuple[int, ...] = ()
    started: float = field(default_factory=time.monotonic)
    heard: float = field(default_factory=time.monotonic)  # the sender's last word (or the post)
    _abort: str | None = field(default=None, repr=False)
    _peer_error: str | None = field(default=None, repr=False)
    # The sender writes no more into `target` (it said `done` or `fail`, or the caller knows it
    # never had the target): a failed receive's pages are free again at once.
    _sender_quiet: bool = field(default=False, repr=False)
