"""`TransferBackend`: what a KV transfer backend implements (the hooks, called on the transfer
engine's thread only), and the peer bookkeeping built on them: reaching a peer, and forgetting
peers that failed or went idle. `TransferStateMachine` drives it.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from workers.transfer.ahead import AheadWrites
from workers.transfer.handles import KVSender
from workers.transfer.messages import AgentInfo, Notification, TransferState
from workers.transfer.pages import PageRun

logger = logging.getLogger(__name__)

# A peer not written to for this long is forgotten when a new one appears (`_reach`).
PEER_IDLE_FORGET_S = 600.0


class TransferBackend(ABC):
    """The hooks of one backend, and its peers (the state machine sets the attributes)."""

    _cv: threading.Condition
    _senders: dict[str, KVSender]
    _ahead: dict[str, AheadWrites]  # writes ahead of their send
    _dropped: list[AheadWrites]  # writes ahead with no send, still stopping
    # When each peer (agent name) was last written to or told something: peers unused for
    # PEER_IDLE_FORGET_S are forgotten (`_reach`).
    _peer_used: dict[str, float]

    # ---- backend hooks (called on the engine's thread only) ---------------------------------

    @abstractmethod
    def info(self) -> AgentInfo:
        """This rank's description for peers (picklable)."""

    @abstractmethod
    def _connect(self, peer: AgentInfo) -> None:
        """Make `peer` reachable (idempotent); raise on failure (retried)."""

    @abstractmethod
    def _start_write(
        self,
        peer: AgentInfo,
        runs: list[PageRun],
        done: Notification | None,
        layers: tuple[int, ...] | None = None,
    ) -> Any:
        """Post the write of `runs` (in `layers`, in that order; None: every layer) into
        `peer`'s pool, which notifies `done` (if any) once every page has landed; return a
        handle for `_check` / `_cancel`. Raise on failure (retried)."""

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
        """Forget peer `peer_name` after `failed`'s write to it failed, unless another
        transfer writes to it now: a send, or writes ahead (their own, or adopted by a send
        waiting for them to land; found by an audit: forgetting the peer tore those down)."""
        with self._cv:
            aheads = [*self._ahead.values(), *self._dropped]
            aheads += [o._ahead for o in self._senders.values() if o._ahead is not None]
            in_use = any(
                o is not failed and o.target is not None and o.target.agent.name == peer_name
                and o.state is TransferState.TRANSFERRING
                for o in self._senders.values()
            ) or any(
                a.handles and a.target.agent.name == peer_name and a is not failed._ahead
                for a in aheads
            )  # fmt: skip
        if not in_use:
            self._peer_used.pop(peer_name, None)
            try:
                self._forget(peer_name)
            except Exception:
                logger.debug("forgetting %s failed", peer_name, exc_info=True)
