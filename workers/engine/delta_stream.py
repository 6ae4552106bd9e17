"""A rank's output to the router over one TCP connection of their own.

Why not a Ray call per batch of output (the long `poll` the router used to make): a decode rank
has output after every step, and a Ray actor call cost the router's process ~1 ms of CPU
(submission, the reply's object, the threads behind them) and the rank about as much; a frame on
a socket costs tens of microseconds. On a small machine that decided throughput.

Protocol (both ends in this repository; nothing else speaks it):

- The rank listens on its node's address (`DeltaStream.address`: host, port and a random
  token, handed to the router through the `stream_address` actor call); the router connects
  and sends the token and a newline. A connection without the right token is closed.
- The rank then sends frames: an 8-byte little-endian length, then a pickled list of
  `TokenDelta | TransferReady`, the rank's output since the previous frame. An empty list
  every `HEARTBEAT_S` while there is nothing to send, so the router can tell a silent rank
  from a dead one.
- One router at a time. When its connection breaks the rank waits for the next (the router
  treats a broken stream as a failed rank, as it did a failed poll, and asks for the address
  again once the rank answers `ready`); what it had taken for the broken one goes first to
  the next.

The rank never unpickles anything from the socket: it only checks the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an empty frame after this long without one
HANDSHAKE_TIMEOUT_S = 5.0
FRAME_HEADER = struct.Struct("<Q")


class StreamAddress(NamedTuple):
    host: str
    port: int
    token: str


def encode_frame(items: list[Any]) -> bytes:
    body = pickle.dumps(items, protocol=5)
    return FRAME_HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> list[Any]:
    """The next frame's items (the router's side); IncompleteReadError when the stream ends."""
    (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    items: list[Any] = pickle.loads(await reader.readexactly(size))
    return items


class DeltaStream:
    def __init__(self, take: Callable[[float], list[Any]], host: str):
        """`take(timeout_s)`: the rank's new output, waiting up to `timeout_s` when there is
        none (the rank's only consumer of it while the stream runs). Starts listening on
        `host` at once; a daemon thread serves one router connection at a time."""
        self._take = take
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.create_server((host, 0), family=family)
        self._server.settimeout(HEARTBEAT_S)  # so that `close` is noticed while idle
        self.address = StreamAddress(host, self._server.getsockname()[1], secrets.token_hex(16))
        self._closed = threading.Event()
        self._pending: list[Any] = []  # taken, not delivered: the next connection's first frame
        self._thread = threading.Thread(target=self._serve, name="delta-stream", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (the router sees the connection end); idempotent."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * HEARTBEAT_S)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                if self._handshake(conn):
                    self._send_until_broken(conn)

    def _handshake(self, conn: socket.socket) -> bool:
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        expected = self.address.token.encode() + b"\n"
        received = b""
        try:
            while len(received) < len(expected) and not received.endswith(b"\n"):
                chunk = conn.recv(len(expected) - len(received))
                if not chunk:
                    break
                received += chunk
        except OSError:
            return False
        if not secrets.compare_digest(received, expected):
            logger.warning("output stream: a connection without the rank's token was refused")
            return False
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True

    def _send_until_broken(self, conn: socket.socket) -> None:
        last_sent = time.monotonic()
        while not self._closed.is_set():
            items = self._pending + self._take(HEARTBEAT_S)
            self._pending = []
            now = time.monotonic()
            if not items and now - last_sent < HEARTBEAT_S:
                continue  # woken for something else: nothing to send yet
            try:
                if _peer_closed(conn):
                    raise ConnectionResetError("the router closed the stream")
                conn.sendall(encode_frame(items))
            except OSError:
                # Kept for the next router (which ignores what it no longer waits for).
                self._pending = items
                return
            last_sent = now


def _peer_closed(conn: socket.socket) -> bool:
    """The router sends nothing after its token: anything readable is its end of the stream."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
