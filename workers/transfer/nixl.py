"""`NixlTransferEngine`: KV pages written with NIXL (UCX: RDMA where there is RDMA, TCP or
shared memory otherwise), CPU (DRAM) or CUDA (VRAM) pools alike."""

from __future__ import annotations

import contextlib
import importlib
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

_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")


def import_nixl() -> Any:
    """NIXL's Python API module; ImportError naming what to install when it is missing."""
    errors = []
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError(
        "NIXL is not installed (pip install nixl-cu12, or nixl-cu13 on CUDA 13): "
        + "; ".join(errors)
    )


def nixl_available() -> bool:
    try:
        import_nixl()
    except ImportError:
        return False
    return True


class NixlTransferEngine(KVTransferEngine):
    backend = "nixl"

    def __init__(self, name: str, kv: torch.Tensor, page_size: int):
        super().__init__(name, kv, page_size)
        api = import_nixl()
        self._agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        self._reg = self._agent.register_memory(kv)
        self._mem_type = "DRAM" if kv.device.type == "cpu" else "VRAM"
        self._device_id = 0 if kv.device.type == "cpu" else kv.device.index or 0
        self._metadata = self._agent.get_agent_metadata()
        self._peers: set[str] = set()
        self._start_thread()

    def info(self) -> AgentInfo:
        return AgentInfo(
            name=self.name, backend=self.backend, layout=self.layout,
            base_addr=self.kv.data_ptr(), device_id=self._device_id, metadata=self._metadata,
        )  # fmt: skip

    def _connect(self, peer: AgentInfo) -> None:
        if peer.name not in self._peers:
            self._agent.add_remote_agent(peer.metadata)
            self._peers.add(peer.name)

    def _descs(self, base: int, device_id: int, pages: list[tuple[int, int]]) -> list[Any]:
        """(addr, bytes, device) per (first page, num pages) run and layer."""
        page_bytes, layer_bytes = self.layout.page_bytes, self.layout.layer_bytes
        return [
            (base + layer * layer_bytes + first * page_bytes, count * page_bytes, device_id)
            for layer in range(self.layout.num_layers)
            for first, count in pages
        ]

    def _start_write(self, sender: KVSender, target: TransferTarget) -> Any:
        runs = page_runs(sender.src_pages, target.dst_pages)
        local = self._descs(self.kv.data_ptr(), self._device_id, [(s, n) for s, _, n in runs])
        peer = target.agent
        remote = self._descs(peer.base_addr, peer.device_id, [(d, n) for _, d, n in runs])
        handle = self._agent.initialize_xfer(
            "WRITE",
            self._agent.get_xfer_descs(local, self._mem_type),
            self._agent.get_xfer_descs(remote, "DRAM" if peer.layout.device == "cpu" else "VRAM"),
            peer.name,
            encode_notification(sender.transfer_id, sender.first_token),
        )
        if self._agent.transfer(handle) == "ERR":
            self._agent.release_xfer_handle(handle)
            raise RuntimeError("NIXL refused to post the write")
        return handle

    def _check(self, handle: Any) -> str:
        return str(self._agent.check_xfer_state(handle))

    def _release(self, handle: Any) -> None:
        self._agent.release_xfer_handle(handle)

    def _notifications(self) -> list[bytes]:
        return [m for msgs in self._agent.get_new_notifs().values() for m in msgs]

    def _shutdown_backend(self) -> None:
        for peer in self._peers:
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(peer)
        with contextlib.suppress(Exception):
            self._agent.deregister_memory(self._reg)
