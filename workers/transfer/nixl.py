"""`NixlTransferEngine`: KV pages written with NIXL over UCX (RDMA where there is an RDMA NIC,
TCP or shared memory otherwise), from CPU (DRAM) or CUDA (VRAM) pools alike.

One NIXL agent per rank registers the whole pool once. A transfer is one WRITE of page-granular
descriptors (one per run of consecutive pages and layer) with the completion notification
attached, so the receiver sees it only after every page has landed; layers written ahead
(`write_ahead`) are WRITEs of their own, without a notification, each of which ends with a
flush of the endpoint (NIXL's UCX backend), so that once all of them report done the
notification that follows them finds their pages landed.

NIXL's own progress thread is off: it spins a whole core per agent even when idle. The engine's
thread drives UCX instead (every `_check` and `_notifications` call progresses the worker), at
a fast rate while pages are in flight. Without RDMA, UCX emulates the one-sided write with
messages that the *receiving* worker must progress; the sender's `start` notification switches
the receiver to the fast rate for that time.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, ClassVar

import numpy as np
import torch

from workers.transfer.base import KVTransferEngine
from workers.transfer.messages import AgentInfo, Notification
from workers.transfer.pages import PageRun, run_descriptors

logger = logging.getLogger(__name__)

_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")


def import_nixl() -> Any:
    """NIXL's Python API module (`nixl_agent`, `nixl_agent_config`), whichever package
    provides it; ImportError naming what to install when none does."""
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
    """`name` must be unique among the agents that talk to each other (it is the NIXL agent
    name). `progress_thread=True` turns NIXL's progress thread back on."""

    backend: ClassVar[str] = "nixl"

    def __init__(
        self,
        name: str,
        kv: torch.Tensor,
        page_size: int,
        progress_thread: bool = False,
        poke_host: str | None = None,
    ):
        super().__init__(name, kv, page_size, poke_host)
        api = import_nixl()
        config = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
        self._agent = api.nixl_agent(name, config)
        if "UCX" not in self._agent.backends:
            raise RuntimeError("NIXL has no UCX backend plugin (check the nixl installation)")
        self._mem_type = "VRAM" if kv.is_cuda else "DRAM"
        self._device_id = kv.get_device() if kv.is_cuda else 0
        self._registration = self._agent.register_memory(kv)
        self._metadata = self._agent.get_agent_metadata()  # after registering: holds its keys
        self._peers: set[str] = set()
        self._start_thread()

    def info(self) -> AgentInfo:
        return AgentInfo(
            name=self.name, backend=self.backend, layout=self.layout,
            base_addr=self.kv.data_ptr(), device_id=self._device_id, metadata=self._metadata,
            poke=self._waker.address,
        )  # fmt: skip

    def _connect(self, peer: AgentInfo) -> None:
        if peer.name != self.name and peer.name not in self._peers:  # self: NIXL loopback
            self._agent.add_remote_agent(peer.metadata)
            self._peers.add(peer.name)

    def _start_write(
        self,
        peer: AgentInfo,
        runs: list[PageRun],
        done: Notification | None,
        layers: tuple[int, ...] | None = None,
    ) -> Any:
        table = np.array(runs, dtype=np.int64)  # [num_runs, 3]: src page, dst page, count
        src_first, dst_first, counts = table[:, 0], table[:, 1], table[:, 2]
        local = run_descriptors(
            self.layout, self.kv.data_ptr(), self._device_id, src_first, counts, layers
        )
        remote = run_descriptors(
            peer.layout, peer.base_addr, peer.device_id, dst_first, counts, layers
        )
        handle = self._agent.initialize_xfer(
            "WRITE",
            self._agent.get_xfer_descs(local, self._mem_type),
            self._agent.get_xfer_descs(remote, "VRAM" if peer.layout.is_cuda else "DRAM"),
            peer.name,
            b"" if done is None else done.encode(),
        )
        if self._agent.transfer(handle) == "ERR":
            with contextlib.suppress(Exception):
                self._agent.release_xfer_handle(handle)
            raise RuntimeError(f"NIXL refused to post the write to {peer.name}")
        return handle

    def _check(self, handle: Any) -> bool:
        state = self._agent.check_xfer_state(handle)  # raises on a disconnected peer
        if state == "ERR":
            raise RuntimeError("NIXL reported a transfer error")
        return state == "DONE"

    def _cancel(self, handle: Any) -> bool:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:
            return False
        return True

    def _notify(self, peer: AgentInfo, note: Notification) -> None:
        self._agent.send_notif(peer.name, note.encode())

    def _notifications(self) -> list[bytes]:
        return [msg for msgs in self._agent.get_new_notifs().values() for msg in msgs]

    def _forget(self, peer_name: str) -> None:
        # Also needed for a clean exit: UCX aborts the process at teardown if an endpoint to a
        # dead peer with a failed request is still loaded.
        if peer_name in self._peers:
            self._peers.discard(peer_name)
            self._agent.remove_remote_agent(peer_name)

    def _shutdown(self) -> None:
        for peer in list(self._peers):
            with contextlib.suppress(Exception):
                self._forget(peer)
        with contextlib.suppress(Exception):
            self._agent.deregister_memory(self._registration)
