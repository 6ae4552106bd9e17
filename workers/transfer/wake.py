"""`Waker`: how a transfer engine's thread sleeps between polls and is woken early — by its own
API calls (a local socket pair), and by a peer that has just posted a write into its pool (a
UDP datagram to its `address`, the *poke*); `poll_interval`: how long it sleeps.

Why: a receiver learns of incoming KV only by polling its backend (NIXL has no callback), and
polling often enough for a short request's first token (every 1–2 ms) took CPU from the rank's
own loop on a small machine. With a poke the receiver can wait up to `POKED_POLL_MAX_S`
between polls and still see a write at once. A lost datagram (it is UDP) costs at most that
long. The datagram carries nothing: whatever arrives only wakes the thread, which then polls.
Where datagrams do not get through (a firewall), the engine notices writes starting without
pokes and goes back to polling often (`TransferStateMachine._note_poke`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time

logger = logging.getLogger(__name__)

# How often the engine's thread drives the backend: right after something moved, then backing
# off (doubling per quiet poll) to the cap, so that many transfers waiting for a long prefill
# do not keep a core busy (nor take the GIL from the rank's loop) with empty polls.
ACTIVE_POLL_S, ACTIVE_POLL_MAX_S = 0.0001, 0.001  # pages in flight
# Transfers waiting (a receiver must still progress the backend to see its notifications).
PENDING_POLL_S, PENDING_POLL_MAX_S = 0.001, 0.002
# ... on an engine that senders poke when they start writing into it.
POKED_POLL_MAX_S = 0.02
IDLE_POLL_S = 0.02


def poll_interval(num_transfers: int, transferring: bool, quiet: int, poked: bool) -> float:
    """How long the engine's thread sleeps before its next poll: `num_transfers` in flight,
    `transferring` when pages of one of them are, after `quiet` polls in a row in which nothing
    moved; `poked`: peers poke this engine when they start writing into it."""
    backoff = 2 ** min(quiet, 16)
    if transferring:
        return min(ACTIVE_POLL_S * backoff, ACTIVE_POLL_MAX_S)
    if not num_transfers:
        return IDLE_POLL_S
    most = POKED_POLL_MAX_S if poked else PENDING_POLL_MAX_S
    return min(PENDING_POLL_S * backoff, most)


class Waker:
    """`poke_host`: the address peers reach this rank at (None: no poke; peers are not told)."""

    def __init__(self, poke_host: str | None = None):
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._udp: socket.socket | None = None
        self.address: tuple[str, int] | None = None  # where peers poke (AgentInfo.poke)
        if poke_host is not None:
            try:
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.bind((poke_host, 0))
                udp.setblocking(False)
            except OSError as e:
                logger.warning("KV transfer: no poke address on %s (%s); polling", poke_host, e)
            else:
                self._udp = udp
                self.address = (poke_host, int(udp.getsockname()[1]))
        self._out: socket.socket | None = None  # sends pokes to peers
        self.last_poke = float("-inf")  # time.monotonic() of the last poke that came

    def wake(self) -> None:
        """Wake the thread (from any thread; a wake-up already pending is enough)."""
        with contextlib.suppress(OSError):  # BlockingIOError: the pair is full of wake-ups
            self._w.send(b"\0")

    def poke(self, address: tuple[str, int] | None) -> None:
        """Wake a peer's thread at `address` (its `AgentInfo.poke`; None: it has none)."""
        if address is None:
            return
        if self._out is None:
            self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._out.setblocking(False)
        try:
            self._out.sendto(b"\0", address)
        except OSError as e:  # best effort: the peer polls anyway
            logger.debug("poke to %s failed: %s", address, e)

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`; whether a wake-up or a poke came."""
        sockets = [self._r] if self._udp is None else [self._r, self._udp]
        ready, _, _ = select.select(sockets, [], [], timeout_s)
        if self._udp is not None and self._udp in ready:
            self.last_poke = time.monotonic()
        for sock in ready:
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
        return bool(ready)

    def close(self) -> None:
        for sock in (self._r, self._w, self._udp, self._out):
            if sock is not None:
                sock.close()
