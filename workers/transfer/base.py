"""KV transfer between ranks: messages, handles, and the state machine every backend shares.

One `KVTransferEngine` per rank registers the rank's whole KV pool once and drives all of its
transfers from one background thread, so the rank's scheduler loop never blocks on the network.

A transfer moves one request's KV: the same pages in every layer of a pool laid out as
`[num_layers, num_pages * page_size, kv_dim]`, from the prefill rank's pages (`src_pages`) to
the decode rank's pages (`dst_pages`), then signals completion with a notification carrying the
first sampled token. Page ownership: the sender's pages must stay untouched until its
`TransferResult` is reported; the receiver's pages hold the KV only once its result is ok.

    sender:   BOOTSTRAPPING (no target yet) → WAITING (connecting) → TRANSFERRING → SUCCESS | FAILED
    receiver: WAITING (for the notification) → SUCCESS | FAILED

Every transfer reports exactly one `TransferResult` per side: on success, timeout, abort, a
layout mismatch or a dead peer alike.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

HANDSHAKE_RETRIES = 3


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_slots: int
    page_size: int
    kv_dim: int
    dtype: str
    device: str

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.kv_dim * (torch.finfo(getattr(torch, self.dtype)).bits // 8)

    @property
    def layer_bytes(self) -> int:
        return self.num_slots * self.kv_dim * (torch.finfo(getattr(torch, self.dtype)).bits // 8)

    def compatible(self, other: KVLayout) -> bool:
        """Same page geometry: pages can be copied between the two pools one to one."""
        return (self.num_layers, self.page_size, self.kv_dim, self.dtype) == (
            other.num_layers, other.page_size, other.kv_dim, other.dtype,
        )  # fmt: skip


@dataclass(frozen=True)
class AgentInfo:
    """What a peer needs to write into this rank's pool (picklable)."""

    name: str
    backend: str
    layout: KVLayout
    base_addr: int
    device_id: int
    metadata: bytes = b""  # backend-specific (NIXL agent metadata)


@dataclass(frozen=True)
class TransferTarget:
    """Posted by the receiving rank for one request, handed to the sending rank."""

    transfer_id: str
    agent: AgentInfo
    dst_pages: tuple[int, ...]


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    role: str  # "send" | "recv"
    ok: bool
    error: str | None = None
    first_token: int | None = None
    num_bytes: int = 0
    elapsed_s: float = 0.0


@dataclass
class KVSender:
    transfer_id: str
    src_pages: tuple[int, ...]
    first_token: int
    deadline: float
    target: TransferTarget | None = None
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    handle: Any = None
    attempts: int = 0
    abort_reason: str | None = None


@dataclass
class KVReceiver:
    transfer_id: str
    target: TransferTarget
    deadline: float
    state: TransferState = TransferState.WAITING
    error: str | None = None
    first_token: int | None = None
    started: float = field(default_factory=time.monotonic)
    abort_reason: str | None = None


def page_runs(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(src_page, dst_page, num_pages) runs where both sides are consecutive: one descriptor
    per run and layer instead of one per page."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def encode_notification(transfer_id: str, first_token: int) -> bytes:
    return json.dumps({"id": transfer_id, "token": first_token}).encode()


def decode_notification(data: bytes) -> tuple[str, int] | None:
    try:
        msg = json.loads(data)
        return str(msg["id"]), int(msg["token"])
    except (ValueError, KeyError, TypeError):
        return None


class KVTransferEngine(ABC):
    """Backend-independent part: handles, deadlines, results and the driving thread.

    Backends implement connecting to a peer, starting a page write with a notification,
    checking it, and reading notifications."""

    backend = "abstract"

    def __init__(self, name: str, kv: torch.Tensor, page_size: int):
        if kv.dim() != 3 or not kv.is_contiguous():
            raise ValueError("the KV pool must be one contiguous [layers, slots, dim] tensor")
        if kv.shape[1] % page_size:
            raise ValueError(f"{kv.shape[1]} slots do not divide into pages of {page_size}")
        self.name = name
        self.kv = kv
        self.layout = KVLayout(
            num_layers=kv.shape[0], num_slots=kv.shape[1], page_size=page_size,
            kv_dim=kv.shape[2], dtype=str(kv.dtype).removeprefix("torch."), device=str(kv.device),
        )  # fmt: skip
        self._lock = threading.Condition()
        self._senders: dict[str, KVSender] = {}
        self._receivers: dict[str, KVReceiver] = {}
        self._early_notifs: dict[str, int] = {}  # notifications that beat their `expect`
        self._results: list[TransferResult] = []
        self._closed = False
        self._thread: threading.Thread | None = None

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._drive, name=f"kv-{self.name}", daemon=True)
        self._thread.start()

    # ---- backend hooks ----------------------------------------------------------------------

    @abstractmethod
    def info(self) -> AgentInfo: ...

    @abstractmethod
    def _connect(self, peer: AgentInfo) -> None:
        """Make `peer` writable (idempotent); raise on failure (retried)."""

    @abstractmethod
    def _start_write(self, sender: KVSender, target: TransferTarget) -> Any:
        """Start writing `sender`'s pages into `target`'s, notifying on completion."""

    @abstractmethod
    def _check(self, handle: Any) -> str:
        """ "DONE", "PROC" or "ERR"."""

    @abstractmethod
    def _release(self, handle: Any) -> None: ...

    @abstractmethod
    def _notifications(self) -> list[bytes]:
        """Completion notifications that arrived since the last call."""

    def _shutdown_backend(self) -> None:  # noqa: B027 (optional hook)
        pass

    # ---- API (any thread) -------------------------------------------------------------------

    def expect(self, transfer_id: str, dst_pages: list[int], timeout_s: float) -> KVReceiver:
        """Receiving side: `dst_pages` (reserved by the caller) will take `transfer_id`'s KV.
        Give `receiver.target` to the sending rank."""
        target = TransferTarget(transfer_id, self.info(), tuple(dst_pages))
        receiver = KVReceiver(transfer_id, target, time.monotonic() + timeout_s)
        with self._lock:
            self._receivers[transfer_id] = receiver
            self._lock.notify_all()
        return receiver

    def send(
        self,
        transfer_id: str,
        src_pages: list[int],
        first_token: int,
        timeout_s: float,
        target: TransferTarget | None = None,
    ) -> KVSender:
        """Sending side: write `src_pages` to the target (now, or once `set_target` gives it)."""
        sender = KVSender(transfer_id, tuple(src_pages), first_token, time.monotonic() + timeout_s)
        with self._lock:
            self._senders[transfer_id] = sender
            if target is not None:
                sender.target = target
            self._lock.notify_all()
        return sender

    def set_target(self, transfer_id: str, target: TransferTarget) -> None:
        with self._lock:
            sender = self._senders.get(transfer_id)
            if sender is not None and sender.target is None:
                sender.target = target
                self._lock.notify_all()

    def abort(self, transfer_id: str, reason: str = "aborted") -> None:
        """Either side; idempotent. The transfer then reports a failed result."""
        with self._lock:
            for handle in (self._senders.get(transfer_id), self._receivers.get(transfer_id)):
                if handle is not None and handle.abort_reason is None:
                    handle.abort_reason = reason
            self._lock.notify_all()

    def poll(self) -> list[TransferResult]:
        with self._lock:
            out, self._results = self._results, []
        return out

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._senders) + len(self._receivers)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._shutdown_backend()

    # ---- the driving thread -----------------------------------------------------------------

    def _drive(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                if not self._senders and not self._receivers and not self._early_notifs:
                    self._lock.wait(0.5)
                    continue
            try:
                self._advance()
            except Exception:  # keep driving: one broken transfer must not stall the others
                logger.exception("KV transfer engine %s: unexpected error", self.name)
            with self._lock:
                if not self._closed:
                    self._lock.wait(0.0005)

    def _advance(self) -> None:
        now = time.monotonic()
        for data in self._notifications():
            parsed = decode_notification(data)
            if parsed is not None:
                with self._lock:
                    self._early_notifs[parsed[0]] = parsed[1]
        with self._lock:
            senders = list(self._senders.values())
            receivers = list(self._receivers.values())
        for s in senders:
            self._advance_sender(s, now)
        for r in receivers:
            with self._lock:
                token = self._early_notifs.pop(r.transfer_id, None)
            if r.abort_reason is not None:
                self._finish_recv(r, f"aborted: {r.abort_reason}")
            elif token is not None:
                r.first_token = token
                self._finish_recv(r, None)
            elif now > r.deadline:
                self._finish_recv(r, "timed out waiting for the KV from the prefill rank")
        with self._lock:  # notifications for receives that were never posted: drop when stale
            if len(self._early_notifs) > 4096:
                self._early_notifs.clear()

    def _advance_sender(self, s: KVSender, now: float) -> None:
        if s.abort_reason is not None:
            return self._finish_send(s, f"aborted: {s.abort_reason}")
        if now > s.deadline:
            where = "waiting for the decode rank's pages" if s.target is None else "sending"
            return self._finish_send(s, f"timed out {where}")
        if s.state is TransferState.BOOTSTRAPPING and s.target is not None:
            s.state = TransferState.WAITING
        if s.state is TransferState.WAITING:
            assert s.target is not None
            error = self._validate(s, s.target)
            if error:
                return self._finish_send(s, error)
            try:
                self._connect(s.target.agent)
                s.handle = self._start_write(s, s.target)
                s.state = TransferState.TRANSFERRING
            except Exception as e:
                s.attempts += 1
                if s.attempts >= HANDSHAKE_RETRIES:
                    return self._finish_send(s, f"cannot reach {s.target.agent.name}: {e}")
                time.sleep(0.01 * 2**s.attempts)
                return None
        if s.state is TransferState.TRANSFERRING:
            status = self._check(s.handle)
            if status == "DONE":
                return self._finish_send(s, None)
            if status == "ERR":
                return self._finish_send(
                    s, f"the write to {s.target and s.target.agent.name} failed"
                )
        return None

    def _validate(self, s: KVSender, target: TransferTarget) -> str | None:
        if not self.layout.compatible(target.agent.layout):
            return f"KV layouts differ: {self.layout} vs {target.agent.layout}"
        if len(target.dst_pages) != len(s.src_pages):
            return f"{len(s.src_pages)} source pages but {len(target.dst_pages)} destination pages"
        return None

    def _finish_send(self, s: KVSender, error: str | None) -> None:
        if s.handle is not None:
            try:
                self._release(s.handle)
            except Exception:
                logger.debug("releasing transfer %s failed", s.transfer_id, exc_info=True)
        s.state = TransferState.FAILED if error else TransferState.SUCCESS
        s.error = error
        num_bytes = len(s.src_pages) * self.layout.num_layers * self.layout.page_bytes
        self._report(
            self._senders, s.transfer_id,
            TransferResult(
                s.transfer_id, "send", error is None, error, s.first_token,
                num_bytes if error is None else 0, time.monotonic() - s.started,
            ),
        )  # fmt: skip

    def _finish_recv(self, r: KVReceiver, error: str | None) -> None:
        r.state = TransferState.FAILED if error else TransferState.SUCCESS
        r.error = error
        num_bytes = len(r.target.dst_pages) * self.layout.num_layers * self.layout.page_bytes
        self._report(
            self._receivers, r.transfer_id,
            TransferResult(
                r.transfer_id, "recv", error is None, error, r.first_token,
                num_bytes if error is None else 0, time.monotonic() - r.started,
            ),
        )  # fmt: skip

    def _report(self, table: dict[str, Any], transfer_id: str, result: TransferResult) -> None:
        with self._lock:
            table.pop(transfer_id, None)
            self._results.append(result)
