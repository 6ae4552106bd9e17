"""`TransferStateMachine`: the half of a `KVTransferEngine` that runs on the engine's thread.

It holds every transfer in flight and advances each sender and receiver through the states
described in `workers.transfer.base` (whose API only records intent), calling the backend hooks
declared here; every backend shares it.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from workers.transfer.handles import KVReceiver, KVSender
from workers.transfer.messages import (
    AgentInfo,
    KVLayout,
    Notification,
    TransferResult,
    TransferState,
    TransferTarget,
)
from workers.transfer.pages import PageRun, page_runs
from workers.transfer.wake import PENDING_POLL_MAX_S, Waker, poll_interval

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3  # connecting to the peer and posting the write, before the sender fails
CONNECT_BACKOFF_S = 0.05  # doubled after each failed attempt
# A peer not written to for this long is forgotten when a new one appears (`_reach`).
PEER_IDLE_FORGET_S = 600.0
CANCEL_GRACE_S = 5.0  # an aborted write that cannot be cancelled is waited for this long
POKE_MISSES = 16  # writes started in a row without a poke: pokes do not get through


class TransferStateMachine(ABC):
    """The transfers in flight of one rank's engine, the thread that advances them, and the
    hooks a backend implements for it (`KVTransferEngine` adds the caller's API)."""

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
        # When each peer (agent name) was last written to or told something (the engine's
        # thread only): peers unused for PEER_IDLE_FORGET_S are forgotten (`_reach`).
        self._peer_used: dict[str, float] = {}
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

    # ---- backend hooks (called on the engine's thread only) ---------------------------------

    @abstractmethod
    def info(self) -> AgentInfo:
        """This rank's description for peers (picklable)."""

    @abstractmethod
    def _connect(self, peer: AgentInfo) -> None:
        """Make `peer` reachable (idempotent); raise on failure (retried)."""

    @abstractmethod
    def _start_write(self, peer: AgentInfo, runs: list[PageRun], done: Notification) -> Any:
        """Post the write of `runs` (every layer) into `peer`'s pool, which notifies `done`
        once every page has landed; return a handle for `_check` / `_cancel`. Raise on failure
        (retried)."""

    @abstractmethod
    def _check(self, handle: Any) -> bool:
        """Whether the write finished; raise if it failed."""

    @abstractmethod
    def _cancel(self, handle: Any) -> bool:
        """Cancel (if still running) and release the write; False if it could not be."""

    @abstractmethod
    def _notify(self, peer: AgentInfo, note: Notification) -> None:
        """Send `note` to a connected peer; raise on failure."""

    @abstractmethod
    def _notifications(self) -> list[bytes]:
        """Notifications that arrived since the last call (also drives the backend's progress,
        which a receiver may need for incoming data)."""

    def _forget(self, peer_name: str) -> None:  # noqa: B027 (optional hook)
        """Drop the connection to a peer that failed, so that a later transfer reconnects."""

    def _shutdown(self) -> None:  # noqa: B027 (optional hook)
        """Release the backend (the driving thread has stopped)."""

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
        for r in list(self._receivers.values()):
            self._finish_recv(r, "the transfer engine was closed")

    def _poll_interval(self, quiet: int) -> float:
        handles: list[KVSender | KVReceiver] = [*self._senders.values(), *self._receivers.values()]
        transferring = any(h.state is TransferState.TRANSFERRING for h in handles)
        return poll_interval(len(handles), transferring, quiet, self._poked)

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
        with self._cv:
            r = self._receivers.get(note.transfer_id)
        if r is None:  # a receive that already ended (timed out, aborted): nothing to do
            logger.debug("KV transfer engine %s: stray notification %s", self.name, note)
        elif note.kind in ("start", "wait"):  # the sender is alive: a full timeout from now
            r.deadline = max(r.deadline, time.monotonic() + r.timeout_s)
            if note.kind == "start" and r.state is TransferState.WAITING:
                r.state = TransferState.TRANSFERRING
                self._note_poke(r)
        elif note.kind == "done":
            r.first_token, r.first_logprob = note.first_token, note.first_logprob
            r.num_cached_tokens, r.guesses = note.num_cached_tokens, note.guesses
            self._finish_recv(r, None)
        elif note.kind == "fail":
            r._peer_error = note.error or "unknown error"

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
            error = self._refusal(s, target)
            if error:
                return self._fail_send(s, error)
        runs = page_runs(s.src_pages[target.skip_pages :], target.dst_pages)
        try:
            self._reach(target.agent)
            self._notify(target.agent, Notification("start", s.transfer_id))
            s._handle = self._start_write(
                target.agent,
                runs,
                Notification(
                    "done",
                    s.transfer_id,
                    s.first_token,
                    first_logprob=s.first_logprob,
                    num_cached_tokens=s.num_cached_tokens,
                    guesses=s.guesses,
                ),
            )
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
            if self._cancel(s._handle) or now > s._cancel_failed_at + CANCEL_GRACE_S:
                self._fail_send(s, s.error or "aborted", cancel_grace=False)
        elif s._abort is not None:
            self._fail_send(s, f"aborted: {s._abort}")
        elif now > s.deadline:
            self._fail_send(s, f"timed out writing to {s.target.agent.name}")
        return None

    def _refusal(self, s: KVSender, target: TransferTarget) -> str | None:
        peer = target.agent
        if target.transfer_id != s.transfer_id:
            return f"the target is for transfer {target.transfer_id!r}, not {s.transfer_id!r}"
        if peer.backend != self.backend:
            return f"{peer.name} uses the {peer.backend} transfer backend, this rank {self.backend}"
        mismatch = self.layout.mismatch(peer.layout)
        if mismatch:
            return f"{mismatch} (here {self.name}, there {peer.name})"
        sent = len(s.src_pages) - target.skip_pages
        if not 0 <= target.skip_pages < len(s.src_pages) or len(target.dst_pages) != sent:
            held = (
                f" ({target.skip_pages} of them held by the receiver)" if target.skip_pages else ""
            )
            return (
                f"{len(s.src_pages)} source pages but {len(target.dst_pages)} destination "
                f"pages{held}"
            )
        return None

    def _reach(self, peer: AgentInfo) -> None:
        """`_connect` to `peer`, noting the use. A peer not seen before first makes the engine
        forget the peers unused for `PEER_IDLE_FORGET_S`: a decode rank that Ray restarted
        comes back as a new agent, and its old one would otherwise stay loaded (with its
        sockets) for good. A peer forgotten while merely idle is connected again on its next
        use (every target carries its metadata)."""
        now = time.monotonic()
        if peer.name not in self._peer_used:
            self._forget_idle_peers(now)
        self._connect(peer)
        self._peer_used[peer.name] = now

    def _forget_idle_peers(self, now: float) -> None:
        with self._cv:
            in_use = {s.target.agent.name for s in self._senders.values() if s.target is not None}
        for name, used in list(self._peer_used.items()):
            if now - used > PEER_IDLE_FORGET_S and name not in in_use:
                del self._peer_used[name]
                try:
                    self._forget(name)
                except Exception:
                    logger.debug("forgetting %s failed", name, exc_info=True)

    def _forget_if_unused(self, peer_name: str, failed: KVSender) -> None:
        with self._cv:
            in_use = any(
                o is not failed and o.target is not None and o.target.agent.name == peer_name
                and o.state is TransferState.TRANSFERRING
                for o in self._senders.values()
            )  # fmt: skip
        if not in_use:
            self._peer_used.pop(peer_name, None)
            try:
                self._forget(peer_name)
            except Exception:
                logger.debug("forgetting %s failed", peer_name, exc_info=True)

    def _fail_send(self, s: KVSender, error: str, cancel_grace: bool = True) -> None:
        """Fail `s`; a write in flight is cancelled first. One that cannot be cancelled keeps
        the source pages (no result yet) until it stops or `CANCEL_GRACE_S` passes."""
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
        if s.target is not None and s.state is not TransferState.BOOTSTRAPPING:
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
