"""`LocalTransferEngine`: an in-process copy between engines of one process, with the same state
machine as the real backends. For unit tests of that state machine only."""

from __future__ import annotations

import threading
from typing import Any

import torch

from workers.transfer.base import (
    AgentInfo,
    KVSender,
    KVTransferEngine,
    TransferTarget,
    encode_notification,
    page_runs,
)

_REGISTRY: dict[str, LocalTransferEngine] = {}
_REGISTRY_LOCK = threading.Lock()


class LocalTransferEngine(KVTransferEngine):
    backend = "local"

    def __init__(self, name: str, kv: torch.Tensor, page_size: int):
        super().__init__(name, kv, page_size)
        self._inbox: list[bytes] = []
        self._inbox_lock = threading.Lock()
        with _REGISTRY_LOCK:
            _REGISTRY[name] = self
        self._start_thread()

    def info(self) -> AgentInfo:
        return AgentInfo(self.name, self.backend, self.layout, self.kv.data_ptr(), 0)

    def _connect(self, peer: AgentInfo) -> None:
        with _REGISTRY_LOCK:
            if peer.name not in _REGISTRY:
                raise ConnectionError(f"no local transfer engine named {peer.name!r}")

    def _start_write(self, sender: KVSender, target: TransferTarget) -> Any:
        with _REGISTRY_LOCK:
            peer = _REGISTRY.get(target.agent.name)
        if peer is None:
            raise ConnectionError(f"{target.agent.name!r} is gone")
        ps = self.layout.page_size
        for src, dst, n in page_runs(sender.src_pages, target.dst_pages):
            peer.kv[:, dst * ps : (dst + n) * ps] = self.kv[:, src * ps : (src + n) * ps]
        with peer._inbox_lock:
            peer._inbox.append(encode_notification(sender.transfer_id, sender.first_token))
        return "DONE"

    def _check(self, handle: Any) -> str:
        return str(handle)

    def _release(self, handle: Any) -> None:
        pass

    def _notifications(self) -> list[bytes]:
        with self._inbox_lock:
            out, self._inbox = self._inbox, []
        return out

    def _shutdown_backend(self) -> None:
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
