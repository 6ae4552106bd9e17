"""`AheadWrites`: layers of one transfer written before its `send`, as the prefill computes them.

A prefill rank whose request's target is known when the step that finishes its prompt starts
calls `KVTransferEngine.write_ahead` after each layer of that step: the layer's KV of the
request's pages is final then (on CUDA once the event recorded after the layer has completed),
so the engine's thread writes it to the receiver while the later layers compute. The `send`
that follows the step adopts the writes: it waits for them to land, then writes only the layers
not written ahead (the MTP module's, one computed after the step) with the completion
notification — or, when every layer went ahead, sends the notification alone. The time from
the end of the prefill to the receiver's notification then no longer grows with the size of
the KV.

The layers that are ready at one turn of the engine's thread, for every transfer to one peer,
go as one backend write (`SharedWrite`): a step that finishes many prompts costs a write per
layer and peer, not per layer and prompt.

Writing ahead only ever saves work: a write ahead that cannot be posted or fails, a target or
page list that changed by the time of the send, all make the send write every layer itself
(after the writes ahead have stopped). A late landing of one of them writes the bytes the
send writes too: a layer is written ahead only once its KV is final.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from workers.transfer.messages import TransferTarget

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class SharedWrite:
    """One backend write carrying layers of the pages of one or more transfers to one peer;
    each of their `AheadWrites.handles` holds it until it has ended (or they stopped), and
    the last one to let go releases it.

    `stopped`: it writes no more (it ended, failed, or a cancel stopped it); `abandoned`: a
    cancel could not stop it within `CANCEL_GRACE_S` (it may still land)."""

    handle: Any
    users: int
    ended: bool = False
    error: str | None = None
    stopped: bool = False
    abandoned: bool = False
    cancel_failed_at: float | None = None


@dataclass(eq=False)
class AheadWrites:
    """The writes ahead of one transfer. The caller's thread appends to `ready` (under the
    engine's lock); the engine's thread moves everything else."""

    transfer_id: str
    src_pages: tuple[int, ...]
    target: TransferTarget
    # Layers computed, not yet posted: (layer, a CUDA event to wait for, or None), in order.
    ready: list[tuple[int, Any]] = field(default_factory=list)
    posted: list[int] = field(default_factory=list)  # layers whose writes were posted
    handles: list[SharedWrite] = field(default_factory=list)  # posted, not yet ended
    started: bool = False  # the receiver was told the transfer started
    failed: str | None = None  # why the writes ahead were given up (the send writes all)
    dropped: bool = False  # no send follows (`drop_ahead`): stop and forget them
    # Writes let go of (given up, dropped) that may still be writing into the target: a
    # write shared with transfers that go on, or one a cancel has not stopped yet.
    lingering: list[SharedWrite] = field(default_factory=list)
    abandoned: bool = False  # one of them could not be stopped: it may land at any time

    def give_up(self, why: str) -> None:
        """Stop writing ahead (the first reason is kept and logged): the send writes all."""
        if self.failed is None:
            self.failed = why
            logger.info("KV transfer %s: %s; its send writes every layer", self.transfer_id, why)

    def take_ready(self) -> tuple[int, ...]:
        """The layers at the head of `ready` whose computation has finished (no event, or
        its event completed), taken off it."""
        n = 0
        while n < len(self.ready) and _finished(self.ready[n][1]):
            n += 1
        out = tuple(layer for layer, _ in self.ready[:n])
        del self.ready[:n]
        return out

    @property
    def settled(self) -> bool:
        """Nothing left to post and no write in flight into the target (but one abandoned)."""
        return not self.ready and not self.handles and not self.lingering

    def layers_left(
        self, num_layers: int, src_pages: tuple[int, ...], target: TransferTarget
    ) -> tuple[int, ...]:
        """The layers a send of `src_pages` to `target` still has to write once these writes
        have settled: all of them when the writes ahead were given up or were for other pages
        or another target."""
        if self.failed is not None or src_pages != self.src_pages or target != self.target:
            return tuple(range(num_layers))
        done = set(self.posted)
        return tuple(layer for layer in range(num_layers) if layer not in done)


def _finished(event: Any) -> bool:
    return event is None or bool(event.query())
