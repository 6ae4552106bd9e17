"""`KVTransferEngine`: one per rank; moves requests' KV pages between ranks from one background
thread, with the state machine every backend shares (in `state_machine`).

A transfer moves one request's KV: the same pages in every layer of a pool laid out as
`[num_layers, num_pages * page_size, kv_dim]`, from the sending (prefill) rank's `src_pages`
to the receiving (decode) rank's `dst_pages`, then notifies the receiver with the first sampled
token. The receiving side posts `expect` first and hands `receiver.target` to the sending side,
which may call `send` before or after it has the target (`set_target`).

    sender:   BOOTSTRAPPING (no target) → WAITING (connecting) → TRANSFERRING → SUCCESS | FAILED
    receiver: WAITING (no data yet) → TRANSFERRING (the sender started) → SUCCESS | FAILED

Page ownership (the caller allocates and frees pages; the engine never does):
- sender: `src_pages` must stay untouched until the transfer's `TransferResult` comes out of
  `poll`, success or not; then the caller frees them.
- receiver: `dst_pages` hold the request's KV once its result is ok. After a failed receive the
  sender may still be writing them (an abort here cannot stop a remote write): the engine holds
  them until the sender says it stopped (`fail`, `done`) or has been silent longer than it
  could still write (the receive's timeout + `CANCEL_GRACE_S` + `HOLD_MARGIN_S` from its last
  word), then `poll_released` names the receive. Reuse them after that (and a short grace for
  bytes still on the wire). A sending side that ends a request holding a target without a send
  calls `give_up`, so that its receiver is told at once.

Every transfer reports exactly one `TransferResult` per side — on success, timeout (no target,
no completion within `timeout_s`), abort, a layout mismatch, a dead peer, or `close` — except a
sender taken back by `withdraw` before it had a target, which reports nothing; and no
call blocks on the network: the API only records intent; the engine's thread does the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from workers.transfer.ahead import AheadWrites
from workers.transfer.handles import KVReceiver, KVSender
from workers.transfer.messages import FirstLogprob, TransferResult, TransferState, TransferTarget
from workers.transfer.pages import check_pages
from workers.transfer.state_machine import TransferStateMachine

logger = logging.getLogger(__name__)


class KVTransferEngine(TransferStateMachine):
    """A rank's transfer engine over its KV pool `kv: [num_layers, num_slots, kv_dim]`
    (contiguous, CPU or CUDA). The pool is registered once; the engine keeps a reference to it
    and never frees it. All methods may be called from any thread and return at once."""

    # ---- API ---------------------------------------------------------------------------------

    def expect(
        self, transfer_id: str, dst_pages: list[int], timeout_s: float, skip_pages: int = 0
    ) -> KVReceiver:
        """Receiving side: the caller has reserved `dst_pages`; they will take `transfer_id`'s
        KV, from the sender's page `skip_pages` on (the caller holds the ones before). Returns
        at once; give `receiver.target` to the sending rank. Fails (a result, not an
        exception) if the completion notification is not here within `timeout_s` — of the
        post, or of the sender's last word (`keep_alive`, or the write's start). ValueError
        for bad pages or an id already being received."""
        pages = check_pages(dst_pages, self.layout, f"receive {transfer_id}")
        if skip_pages < 0:
            raise ValueError(f"receive {transfer_id}: skip_pages must be >= 0, got {skip_pages}")
        target = TransferTarget(transfer_id, self.info(), pages, skip_pages)
        receiver = KVReceiver(transfer_id, target, time.monotonic() + timeout_s, timeout_s)
        with self._cv:
            self._check_open()
            if transfer_id in self._receivers or transfer_id in self._held:
                raise ValueError(f"transfer {transfer_id!r} is already being received")
            self._receivers[transfer_id] = receiver
            self._waker.wake()
        return receiver

    def send(
        self,
        transfer_id: str,
        src_pages: list[int],
        first_token: int,
        timeout_s: float,
        target: TransferTarget | None = None,
        first_logprob: FirstLogprob | None = None,
        num_cached_tokens: int = 0,
        guesses: tuple[int, ...] = (),
    ) -> KVSender:
        """Sending side: write `src_pages` (every layer, but those written ahead: `write_ahead`)
        into the target's pages, then notify the receiver with `first_token` (and
        `first_logprob`, `num_cached_tokens`, `guesses`). Without
        `target` the sender waits (BOOTSTRAPPING) for `set_target`. Fails (a result) if not
        done within `timeout_s`. ValueError for bad pages or an id already being sent."""
        pages = check_pages(src_pages, self.layout, f"send {transfer_id}")
        sender = KVSender(transfer_id, pages, int(first_token), time.monotonic() + timeout_s)
        sender.target = target
        sender.first_logprob = first_logprob
        sender.num_cached_tokens = num_cached_tokens
        sender.guesses = guesses
        with self._cv:
            self._check_open()
            if transfer_id in self._senders:
                raise ValueError(f"transfer {transfer_id!r} is already being sent")
            sender._ahead = self._ahead.pop(transfer_id, None)
            self._senders[transfer_id] = sender
            self._waker.wake()
        return sender

    def write_ahead(
        self,
        transfer_id: str,
        src_pages: list[int],
        layer: int,
        target: TransferTarget,
        ready: Any = None,
    ) -> None:
        """Sending side, before `send`: layer `layer` of `src_pages` holds its final KV (once
        `ready`, a CUDA event, has completed): write it to `target` now. The `send` of
        `transfer_id` that follows (with the same pages and target) then writes only the
        layers not written ahead; without one, call `drop_ahead`. Best effort: writes ahead
        that fail only make the send write every layer (see `workers.transfer.ahead`).
        ValueError for bad pages, a layer outside the pool, or an id already being sent."""
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} is outside the pool's {self.layout.num_layers}")
        with self._cv:
            self._check_open()
            if transfer_id in self._senders:
                raise ValueError(f"transfer {transfer_id!r} is already being sent")
            ahead = self._ahead.get(transfer_id)
            if ahead is None:
                pages = check_pages(src_pages, self.layout, f"write ahead {transfer_id}")
                ahead = self._ahead[transfer_id] = AheadWrites(transfer_id, pages, target)
            ahead.ready.append((layer, ready))
            self._waker.wake()

    def drop_ahead(self, transfer_id: str) -> None:
        """Sending side: no `send` follows the writes ahead of `transfer_id` (its request
        ended otherwise); they stop, and then its receiver is told (`give_up`). A no-op when
        there are none."""
        with self._cv:
            ahead = self._ahead.pop(transfer_id, None)
            if ahead is not None:  # the engine's thread stops its writes, then forgets it
                ahead.dropped = True
                self._dropped.append(ahead)
                self._give_ups.append((transfer_id, ahead.target, "its request ended"))
                self._waker.wake()

    def give_up(self, transfer_id: str, target: TransferTarget, why: str) -> None:
        """Sending side: no `send` of `transfer_id` to `target` follows (its request ended
        here, or was never handed off): tell the receiver `fail` with `why` once nothing of it
        is being written (writes ahead stop first; a send in flight is aborted instead, and
        tells it itself), so that it frees its pages at once rather than after the sender's
        silence. Best effort; a no-op once the engine is closed."""
        with self._cv:
            if self._closed:
                return
            self._give_ups.append((transfer_id, target, why))
            self._waker.wake()

    def set_target(self, transfer_id: str, target: TransferTarget) -> None:
        """Where a sender posted without a target writes to. Ignored for an unknown or finished
        transfer, or one that has a target already."""
        with self._cv:
            sender = self._senders.get(transfer_id)
            if sender is not None and sender.target is None:
                sender.target = target
                self._waker.wake()

    def keep_alive(self, targets: list[TransferTarget]) -> None:
        """Sending side, before `send`: tell each target's receiver that its KV is still to
        come (the request is queued or computing here), so that its receive waits another
        timeout from now. Best effort: a receiver that cannot be reached is not told (and
        times out as it would have); nothing is sent once the engine is closed."""
        with self._cv:
            if self._closed:
                return
            self._keep_alives.extend(targets)
            self._waker.wake()

    def withdraw(self, transfer_id: str) -> KVSender | None:
        """Sending side: take back a sender that has no target yet, as if it had never been
        sent — no result, its pages the caller's again at once (nothing was written). The
        withdrawn sender, or None when there is none without a target (it has one: it may be
        writing already; or it ended)."""
        with self._cv:
            sender = self._senders.get(transfer_id)
            if sender is None or sender.target is not None or sender._abort is not None:
                return None
            del self._senders[transfer_id]
            sender.state, sender.error = TransferState.FAILED, "withdrawn"
            self._waker.wake()
        return sender

    def abort(self, transfer_id: str, reason: str = "aborted", sender_idle: bool = False) -> None:
        """Either side; idempotent, and a no-op for an unknown or finished transfer. The
        transfer then fails (a sender also tells its receiver). `sender_idle` (receiving
        side): the caller knows the sender never had this receive's target and never will, so
        nothing is being written into its pages: they are released without waiting for the
        sender (also when the receive has failed already)."""
        with self._cv:
            for handle in (self._senders.get(transfer_id), self._receivers.get(transfer_id)):
                if handle is not None and handle._abort is None:
                    handle._abort = reason
            receiver = self._receivers.get(transfer_id)
            if sender_idle and receiver is not None:
                receiver._sender_quiet = True
            elif sender_idle and transfer_id in self._held:
                self._release(transfer_id)
                self._moves += 1
            self._waker.wake()

    def poll_released(self) -> list[str]:
        """Failed receives whose pages are free again since the last call (see the module
        docstring): each comes after its failed result, from `poll` (call this one first,
        then `poll`, to see every result before its release)."""
        with self._cv:
            out, self._released = self._released, []
        return out

    def poll(self) -> list[TransferResult]:
        """Transfers of either side that finished since the last call."""
        with self._cv:
            out, self._results = self._results, []
        return out

    @property
    def num_in_flight(self) -> int:
        with self._cv:
            return len(self._senders) + len(self._receivers)

    @property
    def num_held(self) -> int:
        """Failed receives whose pages are held for their senders."""
        with self._cv:
            return len(self._held)

    def close(self) -> None:
        """Fail every transfer still in flight (their results stay pollable), stop the thread
        and release the backend. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._waker.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                logger.warning("KV transfer engine %s: thread did not stop", self.name)
                return
        self._shutdown()
        self._waker.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"KV transfer engine {self.name} is closed")
