"""A rank's output to the router, and the router's commands to the rank, over one TCP
connection of their own.

Why not Ray actor calls: a decode rank has output after every step, and a Ray actor call cost
the router's process ~1 ms of CPU (submission, the reply's object, the threads behind them) and
the rank about as much; a frame on a socket costs tens of microseconds. On a small machine that
decided throughput. The other way, a request's `add` took ~1.5 ms to reach its rank by actor
call, on the way to its first token; a command frame takes ~0.1 ms.

Protocol (both ends in this repository; nothing else speaks it):

- The rank listens on its node's address (`DeltaStream.address`: host, port and a random
  token, handed to the router through the `stream_address` actor call); the router connects
  and sends the token, its tag after a space when it is a front router (see below), and a
  newline. A connection without the right token is closed.
- Both ends then send frames: an 8-byte little-endian length, then a pickled list.
  - Rank → router: `TokenDelta | TransferReady | AddsTaken` items, the rank's output since the
    previous frame; an empty list every `HEARTBEAT_S` while there is nothing to send, so the
    router can tell a silent rank from a dead one.
  - Router → rank: commands, in order (`COMMANDS`): `("add", seq, [GenerateRequest])`
    (answered by an `AddsTaken(seq, ...)` item), `("abort", rid)` (or `("abort", rid,
    True)`: the request's receive may free its pages at once, see `KVHandoff.abort`), `("targets", [(rid,
    TransferTarget)])`, `("migrate", [(rid, new_rid)])`, `("wake",)`. One connection carries them in the order they were sent:
    an abort sent after its add cannot overtake it. The rank unpickles them with an
    unpickler that builds only the classes the message modules define (by plain name) and plain
    containers (`_CommandUnpickler`): even a peer that has the token cannot make it run
    anything.
- Several routers at once: the deployment's primary router (no tag) and its front routers
  (`pdserve serve --front NAME`), each tagged. A request's output goes to the router whose
  tag its id carries (`messages.router_of`), an `AddsTaken` to the router that sent the add.
  When a router's connection breaks the rank waits for the next: what it had taken for the
  primary goes first to its next connection (the router treats a broken stream as a failed
  rank, as it did a failed poll, and asks for the address again once the rank answers
  `ready`); a front router's requests are aborted (`on_router`), as that router has given
  them up. A router that connects again replaces its earlier connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import pickle
import re
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


COMMANDS = ("add", "abort", "targets", "migrate", "wake")
MAX_COMMAND_FRAME = 256 * 1024 * 1024  # bytes: a batch of adds with long prompts fits


def encode_frame(items: list[Any]) -> bytes:
    body = pickle.dumps(items, protocol=5)
    return FRAME_HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> list[Any]:
    """The next frame's items (the router's side); IncompleteReadError when the stream ends."""
    (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    items: list[Any] = pickle.loads(await reader.readexactly(size))
    return items


class _CommandUnpickler(pickle.Unpickler):
    """Builds only what commands are made of: the message classes of the engine and of the KV
    transfer, and plain containers."""

    _MODULES = ("workers.engine.messages", "workers.transfer.messages")
    _BUILTINS = frozenset(
        {"tuple", "list", "dict", "set", "frozenset", "str", "bytes", "bytearray", "int",
         "float", "bool", "complex", "object", "NoneType"}
    )  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        # Only a class defined in one of those modules, by its plain name: the unpickler
        # follows dotted names, and those modules import others (found by an audit:
        # "torch.<...>.subprocess.Popen" under workers.transfer.messages ran a program).
        if module in self._MODULES and name.isidentifier() and not name.startswith("_"):
            cls = super().find_class(module, name)
            if isinstance(cls, type) and cls.__module__ == module:
                return cls
        elif (
            module == "builtins"
            and name in self._BUILTINS
            or module == "copyreg"
            and name in ("_reconstructor", "__newobj__")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a command may not hold {module}.{name}")


def decode_commands(body: bytes) -> list[Any]:
    """A router frame's commands; UnpicklingError (or ValueError) when it is not one."""
    items = _CommandUnpickler(io.BytesIO(body)).load()
    if not isinstance(items, list) or not all(
        isinstance(c, tuple) and c and c[0] in COMMANDS for c in items
    ):
        raise ValueError("a command frame holds a list of commands")
    return items


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    """`size` bytes from `conn`; ConnectionError when it ends first."""
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the router closed the stream")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


ROUTER_TAG = re.compile(r"[0-9a-f]{1,32}")  # a front router's tag (`messages.router_of`)
MAX_HANDSHAKE = 128  # bytes: the token, a space and a tag, a newline


class DeltaStream:
    def __init__(
        self,
        take: Callable[[float, str], list[Any]],
        host: str,
        on_commands: Callable[[list[Any], str], None] | None = None,
        on_router: Callable[[str, bool], None] | None = None,
    ):
        """`take(timeout_s, router)`: the rank's new output for `router` (its tag, "" for the
        primary router), waiting up to `timeout_s` when there is none (that router's
        connection is its only consumer). `on_commands(commands, router)`: called with each
        command frame a router sends, in order, on that connection's reading thread.
        `on_router(router, connected)`: a router's connection began or ended. Starts
        listening on `host` at once; a daemon thread accepts routers, a thread each serves
        them."""
        self._take = take
        self._on_commands = on_commands
        self._on_router = on_router
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.create_server((host, 0), family=family)
        self._server.settimeout(HEARTBEAT_S)  # so that `close` is noticed while idle
        self.address = StreamAddress(host, self._server.getsockname()[1], secrets.token_hex(16))
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[str, socket.socket] = {}  # router tag -> its connection
        self._threads: list[threading.Thread] = []
        # Per router: taken and not delivered, its next connection's first frame; and the lock
        # its connection takes and sends under, so that a connection that replaces another
        # sends only after what the other took (in order).
        self._pending: dict[str, list[Any]] = {}
        self._send_locks: dict[str, threading.Lock] = {}
        self._thread = threading.Thread(target=self._serve, name="delta-stream", daemon=True)
        self._thread.start()

    @property
    def routers(self) -> list[str]:
        """The tags of the routers connected now ("" for the primary)."""
        with self._lock:
            return list(self._connections)

    def close(self) -> None:
        """Stop serving (every router sees its connection end); idempotent."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * HEARTBEAT_S)
            for thread in list(self._threads):
                thread.join(timeout=2 * HEARTBEAT_S)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            tag = self._handshake(conn)
            if tag is None:
                conn.close()
                continue
            thread = threading.Thread(
                target=self._serve_router, args=(conn, tag),
                name=f"delta-stream-{tag or 'primary'}", daemon=True,
            )  # fmt: skip
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve_router(self, conn: socket.socket, tag: str) -> None:
        """One router's connection, until it breaks. A router that connects again (the same
        tag) replaces its earlier connection."""
        with self._lock:
            earlier = self._connections.get(tag)
            self._connections[tag] = conn
        if earlier is not None:
            with contextlib.suppress(OSError):
                earlier.shutdown(socket.SHUT_RDWR)
        if self._on_router is not None:
            self._on_router(tag, True)
        with conn:
            broken = threading.Event()
            reader = threading.Thread(
                target=self._read_commands, args=(conn, tag, broken),
                name="delta-stream-commands", daemon=True,
            )  # fmt: skip
            reader.start()
            self._send_until_broken(conn, tag, broken)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # ends the reader's recv
            reader.join(timeout=2 * HEARTBEAT_S)
        with self._lock:
            replaced = self._connections.get(tag) is not conn
            if not replaced:
                del self._connections[tag]
        if not replaced and self._on_router is not None:
            self._on_router(tag, False)

    def _handshake(self, conn: socket.socket) -> str | None:
        """The connecting router's tag ("" for the primary), or None when it is refused."""
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        received = b""
        try:
            # A byte at a time: the router's first commands may follow in the same segment.
            while len(received) < MAX_HANDSHAKE and not received.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    break
                received += chunk
        except OSError:
            return None
        token, _, tag = received.rstrip(b"\n").partition(b" ")
        if not received.endswith(b"\n") or not secrets.compare_digest(
            token, self.address.token.encode()
        ):
            logger.warning("output stream: a connection without the rank's token was refused")
            return None
        if tag and not ROUTER_TAG.fullmatch(tag.decode("ascii", "replace")):
            logger.warning("output stream: a router with a malformed tag was refused")
            return None
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return tag.decode()

    def _read_commands(self, conn: socket.socket, tag: str, broken: threading.Event) -> None:
        """Hand each command frame to `on_commands` until the connection ends (then `broken`
        is set) or a frame is not one (then the connection is dropped)."""
        try:
            while True:
                (size,) = FRAME_HEADER.unpack(_recv_exactly(conn, FRAME_HEADER.size))
                if size > MAX_COMMAND_FRAME:
                    raise ValueError(f"a command frame of {size} bytes")
                commands = decode_commands(_recv_exactly(conn, size))
                if self._on_commands is not None:
                    self._on_commands(commands, tag)
        except (OSError, ConnectionError):
            pass
        except (pickle.UnpicklingError, ValueError, EOFError) as e:
            logger.warning("output stream: the router sent a frame that is not a command: %s", e)
        except Exception:
            logger.exception("output stream: handling the router's commands failed")
        finally:
            broken.set()

    def _send_until_broken(self, conn: socket.socket, tag: str, broken: threading.Event) -> None:
        with self._lock:
            send_lock = self._send_locks.setdefault(tag, threading.Lock())
        last_sent = time.monotonic()
        while not self._closed.is_set():
            with send_lock:
                replaced = self._connections.get(tag) is not conn
                if replaced:
                    return
                items = self._pending.pop(tag, []) + self._take(HEARTBEAT_S, tag)
                now = time.monotonic()
                if not items and now - last_sent < HEARTBEAT_S and not broken.is_set():
                    continue  # woken for something else: nothing to send yet
                try:
                    if broken.is_set() or _peer_closed(conn):
                        raise ConnectionResetError("the router closed the stream")
                    conn.sendall(encode_frame(items))
                except OSError:
                    # Kept for the router's next connection (which ignores what it no longer
                    # waits for) — the primary's always, a front router's when it connected
                    # again; otherwise a front router's requests end with its connection.
                    if not tag or self._connections.get(tag) is not conn:
                        self._pending[tag] = items
                    return
                last_sent = now


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the router closed its end (checked before each frame, as the reading thread may
    not have seen it yet: what is taken for a closed connection is kept for the next)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
