"""`LocalTransferEngine`: engines of one process, found by name in a process-global registry,
copying pages with torch. The same state machine as the real backends; for unit tests of that
state machine only."""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import torch

from workers.transfer.base import KVTransferEngine
from workers.transfer.messages import AgentInfo, Notification
from workers.transfer.pages import PageRun

_REGISTRY: dict[str, LocalTransferEngine] = {}
_REGISTRY_LOCK = threading.Lock()


class _Write:
    """A write that lands `latency_s` after it was posted, unless cancelled before."""

    def __init__(
        self,
        peer: LocalTransferEngine,
        runs: list[PageRun],
        done: Notification | None,
        layers: tuple[int, ...] | None,
        at: float,
    ):
        self.peer, self.runs, self.done, self.layers, self.at = peer, runs, done, layers, at
        self.landed = False


class LocalTransferEngine(KVTransferEngine):
    """`write_latency_s` delays every write (so that tests can abort or time out a sender in
    TRANSFERRING); the pages land, and the receiver is notified, only when it has passed."""

    backend: ClassVar[str] = "local"

    def __init__(
        self,
        name: str,
        kv: torch.Tensor,
        page_size: int,
        write_latency_s: float = 0.0,
        poke_host: str | None = None,
    ):
        super().__init__(name, kv, page_size, poke_host)
        self.write_latency_s = write_latency_s
        self._inbox: list[bytes] = []
        self._inbox_lock = threading.Lock()
        with _REGISTRY_LOCK:
            if name in _REGISTRY:
                raise ValueError(f"a local transfer engine named {name!r} exists already")
            _REGISTRY[name] = self
        self._start_thread()

    def info(self) -> AgentInfo:
        return AgentInfo(
            self.name, self.backend, self.layout, self.kv.data_ptr(), 0, poke=self._waker.address
        )

    def _peer(self, peer: AgentInfo) -> LocalTransferEngine:
        with _REGISTRY_LOCK:
            engine = _REGISTRY.get(peer.name)
        if engine is None:
            raise ConnectionError(f"no local transfer engine named {peer.name!r}")
        return engine

    def _connect(self, peer: AgentInfo) -> None:
        self._peer(peer)

    def _start_write(
        self,
        peer: AgentInfo,
        runs: list[PageRun],
        done: Notification | None,
        layers: tuple[int, ...] | None = None,
    ) -> Any:
        at = time.monotonic() + self.write_latency_s
        write = _Write(self._peer(peer), runs, done, layers, at)
        self._check(write)
        return write

    def _check(self, handle: Any) -> bool:
        write: _Write = handle
        if not write.landed and time.monotonic() >= write.at:
            ps = self.layout.page_size
            layers = range(self.layout.num_layers) if write.layers is None else write.layers
            for layer in layers:
                src_kv, dst_kv = self.kv[layer], write.peer.kv[layer]
                for src, dst, n in write.runs:
                    dst_kv[dst * ps : (dst + n) * ps] = src_kv[src * ps : (src + n) * ps]
            if write.done is not None:
                write.peer._deliver(write.done.encode())
            write.landed = True
        return write.landed

    def _cancel(self, handle: Any) -> bool:
        return True  # a write that has not landed never will

    def _notify(self, peer: AgentInfo, note: Notification) -> None:
        self._peer(peer)._deliver(note.encode())

    def _deliver(self, data: bytes) -> None:
        with self._inbox_lock:
            self._inbox.append(data)

    def _notifications(self) -> list[bytes]:
        with self._inbox_lock:
            out, self._inbox = self._inbox, []
        return out

    def _shutdown(self) -> None:
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
