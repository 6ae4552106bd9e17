"""`TransferStateMachine`: the half of a `KVTransferEngine` that runs on the engine's thread.

It holds every transfer in flight and advances each sender and receiver through the states
described in `workers.transfer.base` (whose API only records intent), and the layers written
ahead of a send (`workers.transfer.ahead`), calling the backend hooks declared in
`workers.transfer.backend`; every backend shares it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import ClassVar

import torch

from workers.transfer.ahead import AheadWrites, SharedWrite
from workers.transfer.backend import TransferBackend
from workers.transfer.handles import KVReceiver, KVSender
from workers.transfer.messages import (
    KVLayout,
    Notification,
    TransferResult,
    TransferState,
    TransferTarget,
)
from workers.transfer.pages import page_runs, refusal
from workers.transfer.wake import PENDING_POLL_MAX_S, Waker, poll_interval

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3  # connecting to the peer and posting the write, before the sender fails
CONNECT_BACKOFF_S = 0.05  # doubled after each failed attempt
CANCEL_GRACE_S = 5.0  # an aborted write that cannot be cancelled is waited for this long
# A failed receive's pages are held until its sender's word that it stopped (`fail`, `done`),
# or until the sender has been silent for the receive's timeout, plus `CANCEL_GRACE_S`, plus
# this: the longest a live sender may still be writing after its last word.
HOLD_MARGIN_S = 1.0
POKE_MISSES = 16  # writes started in a row without a poke: pokes do not get through


class TransferStateMachine(TransferBackend):
    """The transfers in flight of one rank's engine and the thread that advances them
    (`KVTransferEngine` adds the caller's API)."""

    backend: ClassVar[str]

    def __init__(self, name: str, kv: torch.Tensor, page_size: int, poke_host: str | None = None):
        self.name = name
        self.kv = kv
        self.layout = KVLayout.of(kv, page_size)
        self._cv = threading.Condition()  # guards the tables below (the thread sleeps in _waker)
        # Wakes the thread: API calls, and (at `poke_host`) peers that start a write here.
        self._waker = Waker(poke_host)
        self._pokes_missed = 0  # writes that started here in a row without a poke seen
        self._poked = self._waker.address is not None  # poll slowly: peers poke
        self._senders: dict[str, KVSender] = {}
        self._receivers: dict[str, KVReceiver] = {}
        self._results: list[TransferResult] = []
        self._keep_alives: list[TransferTarget] = []  # receivers to tell `wait` (keep_alive)
        self._ahead: dict[str, AheadWrites] = {}  # layers written before their send
        self._dropped: list[AheadWrites] = []  # writes ahead with no send, still stopping
        # Failed receives whose sender may still write their pages: id -> (the sender's last
        # word, how long after it the pages are held); `_released`: ids whose pages are free
        # again, for `poll_released`.
        self._held: dict[str, tuple[float, float]] = {}
        self._released: list[str] = []
        # Sending side: transfers whose receivers are to be told `fail` once nothing of them is
        # being written any more (`give_up`): (id, target, why).
        self._give_ups: list[tuple[str, TransferTarget, str]] = []
        self._silent: set[str] = set()  # given up with a write that could not be stopped
        self._peer_used: dict[str, float] = {}  # the engine's thread only
        self._moves = 0  # progress seen by the engine's thread (notes, writes posted, ends)
        self._closed = False
        self._thread: threading.Thread | None = None
        # Called (on the engine's thread) after a result is ready to `poll`, so that the caller
        # can wait for results instead of polling for them.
        self.on_result: Callable[[], None] | None = None

    def _start_thread(self) -> None:
        """Backends call this at the end of their constructor."""
        self._thread = threading.Thread(target=self._run, name=f"kv-{self.name}", daemon=True)
        self._thread.start()

    # ---- the engine's thread -----------------------------------------------------------------

    def _run(self) -> None:
        quiet = 0  # polls in a row in which nothing moved
        while True:
            moves = self._moves
            try:
                self._tick()
            except Exception:  # a backend failing outside any one transfer: keep going
                logger.exception("KV transfer engine %s", self.name)
            quiet = 0 if self._moves != moves else quiet + 1
            with self._cv:
                if self._closed:
                    break
                interval = self._poll_interval(quiet)
            if self._waker.wait(interval):
                quiet = 0  # an API call (a new transfer, a target, an abort) or a poke
        for s in list(self._senders.values()):
            self._fail_send(s, "the transfer engine was closed", cancel_grace=False)
        left = [*self._ahead.values(), *self._dropped]
        for a in left:
            a.dropped = True
        self._advance_aheads(left)
        self._tell_given_up(closing=True)
        for r in list(self._receivers.values()):
            self._finish_recv(r, "the transfer engine was closed")

    def _poll_interval(self, quiet: int) -> float:
        handles: list[KVSender | KVReceiver] = [*self._senders.values(), *self._receivers.values()]
        transferring = any(h.state is TransferState.TRANSFERRING for h in handles)
        # Writes ahead in flight, or layers waiting for their CUDA events: poll as fast.
        aheads = [*self._ahead.values(), *self._dropped]
        aheads += [s._ahead for s in self._senders.values() if s._ahead is not None]
        transferring = transferring or any(not a.settled for a in aheads)
        return poll_interval(len(handles) + len(aheads), transferring, quiet, self._poked)

    def _tick(self) -> None:
        for data in self._notifications():
            note = Notification.decode(data)
            if note is not None:
                self._on_notification(note)
        now = time.monotonic()
        with self._cv:
            senders = list(self._senders.values())
            receivers = list(self._receivers.values())
            keep_alives, self._keep_alives = self._keep_alives, []
            aheads = [*self._ahead.values(), *self._dropped]
            aheads += [s._ahead for s in senders if s._ahead is not None]
        self._advance_aheads(aheads)
        self._tell_given_up()
        self._expire_held(now)
        for target in keep_alives:
            try:
                self._reach(target.agent)
                self._notify(target.agent, Notification("wait", target.transfer_id))
            except Exception:
                logger.debug("keep-alive to %s failed", target.agent.name, exc_info=True)
        for s in senders:
            try:
                self._advance_send(s, now)
            except Exception as e:  # a bug in one transfer fails that transfer only
                logger.exception("KV transfer %s (send)", s.transfer_id)
                self._fail_send(s, f"internal error: {e!r}", cancel_grace=False)
        for r in receivers:
            self._advance_recv(r, now)

    def _on_notification(self, note: Notification) -> None:
        self._moves += 1
        now = time.monotonic()
        with self._cv:
            r = self._receivers.get(note.transfer_id)
            held = self._held.get(note.transfer_id)
            if r is None and held is not None:  # a failed receive whose sender may write
                if note.kind in ("start", "wait"):  # it still may: hold on from now
                    self._held[note.transfer_id] = (now, held[1])
                else:  # `done` or `fail`: it stopped writing
                    self._release(note.transfer_id)
        if r is None:
            if held is None:  # a receive that ended and was released: nothing to do
                logger.debug("KV transfer engine %s: stray notification %s", self.name, note)
            elif note.kind in ("done", "fail"):
                self._result_ready()
        elif note.kind in ("start", "wait"):  # the sender is alive: a full timeout from now
            r.heard = now
            r.deadline = max(r.deadline, now + r.timeout_s)
            if note.kind == "start" and r.state is TransferState.WAITING:
                r.state = TransferState.TRANSFERRING
                self._note_poke(r)
        elif note.kind == "done":
            r.first_token, r.first_logprob = note.first_token, note.first_logprob
            r.num_cached_tokens, r.guesses = note.num_cached_tokens, note.guesses
            r._sender_quiet = True
            self._finish_recv(r, None)
        elif note.kind == "fail":
            r._peer_error = note.error or "unknown error"
            r._sender_quiet = True

    def _release(self, transfer_id: str) -> None:
        """(Under `_cv`.) The pages of failed receive `transfer_id` are free again."""
        del self._held[transfer_id]
        self._released.append(transfer_id)

    def _expire_held(self, now: float) -> None:
        """Release the failed receives whose senders have been silent too long to be still
        writing (a sending rank that died or was cut off never says it stopped)."""
        with self._cv:
            late = [
                (i, now - heard) for i, (heard, hold) in self._held.items() if now - heard > hold
            ]
            for transfer_id, _ in late:
                self._release(transfer_id)
        for transfer_id, silent in late:
            logger.info(
                "KV transfer engine %s: receive %s: no word from its sender for %.0f s; its "
                "pages are reused", self.name, transfer_id, silent,
            )  # fmt: skip
        if late:
            self._result_ready()

    def _tell_given_up(self, closing: bool = False) -> None:
        """Tell the receivers of the transfers given up (`give_up`) that no more of their KV
        comes, once nothing of them is being written (their sends fail and say so themselves);
        never one whose write could not be stopped (`_silent`). `closing`: the engine is
        closing: those still writing are not told."""
        with self._cv:
            if not self._give_ups:
                return
            writing = {a.transfer_id for a in self._dropped if not a.settled}
            writing.update(self._ahead)
            pending, tell = [], []
            for item in self._give_ups:
                transfer_id = item[0]
                sender = self._senders.get(transfer_id)
                if transfer_id in self._silent:
                    self._silent.discard(transfer_id)
                elif sender is not None and not closing:  # its send fails and tells
                    if sender._abort is None:
                        sender._abort = item[2]
                elif transfer_id in writing:
                    ahead = self._ahead.pop(transfer_id, None)
                    if ahead is not None:
                        ahead.dropped = True
                        self._dropped.append(ahead)
                    if not closing:
                        pending.append(item)
                elif sender is None:
                    tell.append(item)
            self._give_ups = pending
        for transfer_id, target, why in tell:
            try:  # best effort: the receiver otherwise holds its pages until its sender is silent
                self._reach(target.agent)
                self._notify(target.agent, Notification("fail", transfer_id, error=why))
            except Exception:
                logger.debug("telling %s that %s ended failed", target.agent.name, transfer_id)

    def _note_poke(self, r: KVReceiver) -> None:
        """A write into `r` started: whether a poke came since `r` was posted. After
        `POKE_MISSES` writes in a row without one, pokes do not get here (a firewall): poll
        often again."""
        if not self._poked:
            return
        if self._waker.last_poke >= r.started:
            self._pokes_missed = 0
            return
        self._pokes_missed += 1
        if self._pokes_missed >= POKE_MISSES:
            self._poked = False
            logger.warning(
                "KV transfer engine %s: %d writes started without a poke (UDP to %s blocked?); "
                "polling every %g ms while receives wait",
                self.name, POKE_MISSES, self._waker.address, PENDING_POLL_MAX_S * 1000,
            )  # fmt: skip

    def _advance_recv(self, r: KVReceiver, now: float) -> None:
        if r._abort is not None:
            self._finish_recv(r, f"aborted: {r._abort}")
        elif r._peer_error is not None:
            self._finish_recv(r, f"the sending rank failed: {r._peer_error}")
        elif now > r.deadline:
            what = "the rest of the KV" if r.state is TransferState.TRANSFERRING else "the KV"
            self._finish_recv(r, f"timed out waiting for {what} from the sending rank")

    def _advance_send(self, s: KVSender, now: float) -> None:
        if s.state is TransferState.TRANSFERRING:
            return self._advance_write(s, now)
        if s._abort is not None:
            return self._fail_send(s, f"aborted: {s._abort}")
        if now > s.deadline:
            if s.target is None:
                return self._fail_send(s, "timed out waiting for the receiving rank's pages")
            return self._fail_send(s, f"timed out connecting to {s.target.agent.name}")
        if s.target is None or now < s._retry_at:
            return None
        target = s.target
        if s.state is TransferState.BOOTSTRAPPING:
            s.state = TransferState.WAITING
            error = refusal(
                self.layout, self.backend, self.name, s.transfer_id, s.src_pages, target
            )
            if error:
                return self._fail_send(s, error)
        layers: tuple[int, ...] | None = None  # all
        if s._ahead is not None:  # layers written ahead: once they landed, the others
            if not s._ahead.settled:
                return None
            layers = s._ahead.layers_left(self.layout.num_layers, s.src_pages, target)
            s.layers_ahead = self.layout.num_layers - len(layers)
            s._ahead = None
        runs = page_runs(s.src_pages[target.skip_pages :], target.dst_pages)
        done = Notification(
            "done", s.transfer_id, s.first_token, first_logprob=s.first_logprob,
            num_cached_tokens=s.num_cached_tokens, guesses=s.guesses,
        )  # fmt: skip
        try:
            self._reach(target.agent)
            if layers == ():  # every layer has landed: the notification alone
                self._notify(target.agent, done)
                return self._finish_send(s, None)
            self._notify(target.agent, Notification("start", s.transfer_id))
            s._handle = self._start_write(target.agent, runs, done, layers)
        except Exception as e:
            s._attempts += 1
            self._forget_if_unused(target.agent.name, s)
            if s._attempts >= CONNECT_ATTEMPTS:
                return self._fail_send(
                    s, f"cannot reach {target.agent.name} after {s._attempts} attempts: {e}"
                )
            s._retry_at = now + CONNECT_BACKOFF_S * 2 ** (s._attempts - 1)
            return None
        s.state = TransferState.TRANSFERRING
        self._moves += 1
        self._waker.poke(target.agent.poke)  # the receiver polls now, not at its next turn
        return self._advance_write(s, now)

    def _advance_write(self, s: KVSender, now: float) -> None:
        assert s.target is not None
        try:
            if self._check(s._handle):
                return self._finish_send(s, None)
        except Exception as e:
            self._forget_if_unused(s.target.agent.name, s)
            return self._fail_send(s, f"the write to {s.target.agent.name} failed: {e}")
        if s._cancel_failed_at is not None:  # an abort is waiting for the write to stop
            stopped = self._cancel(s._handle)
            if stopped:
                s._handle = None  # released: `_fail_send` must not release it again
            if stopped or now > s._cancel_failed_at + CANCEL_GRACE_S:
                self._fail_send(s, s.error or "aborted", cancel_grace=False)
        elif s._abort is not None:
            self._fail_send(s, f"aborted: {s._abort}")
        elif now > s.deadline:
            self._fail_send(s, f"timed out writing to {s.target.agent.name}")
        return None

    def _advance_aheads(self, aheads: list[AheadWrites]) -> None:
        """Post the layers of `aheads` that are ready — one write per peer and set of layers,
        for all the transfers that have them — and reap their writes that ended. A failure
        gives a transfer's writes ahead up (its send then writes every layer), as does
        `dropped`."""
        groups: dict[tuple[str, tuple[int, ...]], list[AheadWrites]] = {}
        for a in aheads:
            with self._cv:
                layers = a.take_ready() if a.failed is None and not a.dropped else ()
                if a.failed is not None or a.dropped:
                    a.ready.clear()
            if layers and self._start_ahead(a):
                groups.setdefault((a.target.agent.name, layers), []).append(a)
        for (name, layers), group in groups.items():
            runs = []
            for a in group:
                runs += page_runs(a.src_pages[a.target.skip_pages :], a.target.dst_pages)
            try:
                handle = self._start_write(group[0].target.agent, runs, None, layers)
            except Exception as e:
                for a in group:
                    a.give_up(f"writing layers {layers} ahead to {name}: {e}")
                continue
            write = SharedWrite(handle, users=len(group))
            for a in group:
                a.handles.append(write)
                a.posted.extend(layers)
            self._moves += 1
        for a in aheads:
            self._reap_ahead(a)

    def _start_ahead(self, a: AheadWrites) -> bool:
        """Before `a`'s first write: check the target and tell the receiver the transfer
        started (it then drives its backend at the active rate); whether `a` may write."""
        if a.started:
            return True
        peer = a.target.agent
        try:
            error = refusal(
                self.layout, self.backend, self.name, a.transfer_id, a.src_pages, a.target
            )
            if error:
                raise ValueError(error)
            self._reach(peer)
            self._notify(peer, Notification("start", a.transfer_id))
            self._waker.poke(peer.poke)
        except Exception as e:
            a.give_up(f"starting to write ahead to {peer.name}: {e}")
            return False
        a.started = True
        return True

    def _reap_ahead(self, a: AheadWrites) -> None:
        """Let go of `a`'s writes that ended (all of them once it failed or was dropped: the
        last user of a write releases it, stopping it if it is still in flight). A write let
        go of in flight (shared with transfers that go on, or not stopped by its cancel yet)
        lingers on `a` until it has stopped, or is abandoned."""
        peer = a.target.agent.name
        for write in list(a.handles):
            self._look_at(write, peer)
            if write.error is not None:
                a.give_up(write.error)
            if not (write.ended or a.failed is not None or a.dropped):
                continue
            a.handles.remove(write)
            write.users -= 1
            if write.users == 0:
                self._stop_write(write, a.transfer_id)
            if not write.stopped:
                a.lingering.append(write)
        for write in list(a.lingering):
            if not (write.stopped or write.abandoned):
                if write.users > 0 or write.cancel_failed_at is not None:  # (not released)
                    self._look_at(write, peer)
                if write.users == 0 and not write.stopped:
                    self._stop_write(write, a.transfer_id)  # a cancel that failed may work now
            if write.abandoned:
                a.abandoned = True
            if write.stopped or write.abandoned:
                a.lingering.remove(write)
        if a.dropped and a.settled:
            with self._cv:
                if a in self._dropped:
                    self._dropped.remove(a)
                # Its receiver is not told it stopped (it did not): the give-up waiting for it
                # is dropped.
                if a.abandoned and any(g[0] == a.transfer_id for g in self._give_ups):
                    self._silent.add(a.transfer_id)

    def _look_at(self, write: SharedWrite, peer: str) -> None:
        """Whether `write` (not released) has ended or failed: it writes no more."""
        if write.stopped or write.ended or write.error is not None:
            return
        try:
            write.ended = self._check(write.handle)
        except Exception as e:
            write.error = f"a write ahead to {peer} failed: {e}"
        write.stopped = write.ended or write.error is not None

    def _stop_write(self, write: SharedWrite, transfer_id: str) -> None:
        """`write` has no user left: release it (ended) or cancel it (in flight). One whose
        cancel fails is tried again at each turn until `CANCEL_GRACE_S` has passed, then
        abandoned (it may still land)."""
        try:
            cancelled = self._cancel(write.handle)
        except Exception:
            logger.debug("releasing a write ahead of %s failed", transfer_id, exc_info=True)
            cancelled = False
        if cancelled or write.stopped:
            write.stopped = True
            return
        now = time.monotonic()
        if write.cancel_failed_at is None:
            write.cancel_failed_at = now
        elif now > write.cancel_failed_at + CANCEL_GRACE_S:
            write.abandoned = True
            logger.warning(
                "KV transfer engine %s: a write ahead of %s could not be stopped in %g s; its "
                "receiver is not told it stopped", self.name, transfer_id, CANCEL_GRACE_S,
            )  # fmt: skip

    def _fail_send(self, s: KVSender, error: str, cancel_grace: bool = True) -> None:
        """Fail `s`; a write in flight is cancelled first. One that cannot be cancelled keeps
        the source pages (no result yet) until it stops or `CANCEL_GRACE_S` passes. The
        receiver is told `fail` — its pages are free again — once nothing of `s` writes into
        them any more (its writes ahead may linger: then once they stopped); never when a
        write could not be stopped (it waits out the sender's silence instead)."""
        tell = s.target is not None  # (bootstrapping too: the target came, nothing written)
        later = False  # told once the writes ahead stopped
        if s._ahead is not None:
            ahead, s._ahead = s._ahead, None
            ahead.dropped = True
            self._advance_aheads([ahead])
            if ahead.abandoned:
                tell = False
            elif not ahead.settled:
                later = True
                with self._cv:
                    self._dropped.append(ahead)
        if s._handle is not None:
            cancelled = False
            try:
                cancelled = self._cancel(s._handle)
            except Exception:
                logger.debug("cancelling transfer %s failed", s.transfer_id, exc_info=True)
            if not cancelled and cancel_grace and s._cancel_failed_at is None:
                s.error, s._cancel_failed_at = error, time.monotonic()
                return
            s._handle = None
            tell = tell and cancelled
        if tell and later:
            assert s.target is not None
            with self._cv:
                self._give_ups.append((s.transfer_id, s.target, error))
        elif tell:
            assert s.target is not None
            try:  # best effort: the receiver would otherwise wait for its timeout
                self._reach(s.target.agent)
                self._notify(s.target.agent, Notification("fail", s.transfer_id, error=error))
            except Exception:
                logger.debug("telling %s about %s failed", s.target.agent.name, s.transfer_id)
        self._finish_send(s, error)

    def _finish_send(self, s: KVSender, error: str | None) -> None:
        if error is None and s._handle is not None:
            try:
                self._cancel(s._handle)  # releases a finished write
            except Exception:
                logger.debug("releasing transfer %s failed", s.transfer_id, exc_info=True)
        s._handle = None
        sent = len(s.src_pages) - (s.target.skip_pages if s.target is not None else 0)
        num_bytes = sent * self.layout.num_layers * self.layout.page_bytes
        result = TransferResult(
            s.transfer_id, "send", error is None, error, s.first_token,
            0 if error else num_bytes, time.monotonic() - s.started,
            layers_ahead=0 if error else s.layers_ahead,
        )  # fmt: skip
        with self._cv:
            if self._senders.get(s.transfer_id) is not s:
                return  # ended, or withdrawn (and maybe sent anew under the same id)
            del self._senders[s.transfer_id]
            s.error = error
            s.state = TransferState.FAILED if error else TransferState.SUCCESS
            self._results.append(result)
        self._result_ready()

    def _finish_recv(self, r: KVReceiver, error: str | None) -> None:
        num_bytes = len(r.target.dst_pages) * self.layout.num_layers * self.layout.page_bytes
        with self._cv:
            if self._receivers.pop(r.transfer_id, None) is not r:
                return
            if error is not None:  # its pages: free now, or once the sender cannot write them
                if r._sender_quiet or self._closed:
                    self._released.append(r.transfer_id)
                else:
                    hold = r.timeout_s + CANCEL_GRACE_S + HOLD_MARGIN_S
                    self._held[r.transfer_id] = (r.heard, hold)
            r.error = error
            r.state = TransferState.FAILED if error else TransferState.SUCCESS
            self._results.append(
                TransferResult(
                    r.transfer_id, "recv", error is None, error,
                    None if error else r.first_token, 0 if error else num_bytes,
                    time.monotonic() - r.started, None if error else r.first_logprob,
                    0 if error else r.num_cached_tokens, () if error else r.guesses,
                )
            )  # fmt: skip
        self._result_ready()

    def _result_ready(self) -> None:
        self._moves += 1
        if self.on_result is not None:
            try:
                self.on_result()
            except Exception:
                logger.exception("KV transfer engine %s: on_result failed", self.name)
