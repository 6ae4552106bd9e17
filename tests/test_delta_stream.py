"""A rank's output stream (`workers.engine.delta_stream`) over loopback: frames in order, the
heartbeat, the token check, a second connection after the first broke, and `close`."""

from __future__ import annotations

import pickle
import queue
import socket
import threading
import time
from typing import Any

import pytest

from workers.engine.delta_stream import FRAME_HEADER, HEARTBEAT_S, DeltaStream
from workers.engine.messages import FinishReason, TokenDelta, router_of

pytestmark = pytest.mark.timeout(60)


class Output:
    """What a rank's `_take_output` does: wait up to `timeout_s` for what was put."""

    def __init__(self) -> None:
        self.items: queue.Queue[list[TokenDelta]] = queue.Queue()
        self.stuck = threading.Event()  # set: `take` never returns (a rank that hangs)

    def take(self, timeout_s: float, router: str = "") -> list[TokenDelta]:
        if self.stuck.is_set():
            time.sleep(3600)
        try:
            return self.items.get(timeout=timeout_s)
        except queue.Empty:
            return []


def _connect(stream: DeltaStream, token: str | None = None, tag: str = "") -> socket.socket:
    conn = socket.create_connection((stream.address.host, stream.address.port), timeout=10)
    token = token if token is not None else stream.address.token
    conn.sendall(token.encode() + (b" " + tag.encode() if tag else b"") + b"\n")
    return conn


def _read_frame(conn: socket.socket) -> list[TokenDelta]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError("the stream ended")
            data += chunk
        return data

    (size,) = FRAME_HEADER.unpack(exactly(FRAME_HEADER.size))
    items: list[TokenDelta] = pickle.loads(exactly(size))
    return items


def test_frames_arrive_in_order_with_heartbeats_between():
    out = Output()
    stream = DeltaStream(out.take, "127.0.0.1")
    try:
        conn = _connect(stream)
        first = [TokenDelta("a", [1, 2]), TokenDelta("b", [3], FinishReason.STOP)]
        out.items.put(first)
        out.items.put([TokenDelta("a", [4])])
        assert _read_frame(conn) == first
        assert _read_frame(conn) == [TokenDelta("a", [4])]
        start = time.monotonic()
        assert _read_frame(conn) == []  # nothing to send: a heartbeat
        assert HEARTBEAT_S * 0.5 < time.monotonic() - start < HEARTBEAT_S * 3
        conn.close()
    finally:
        stream.close()


def test_a_wrong_token_is_refused_and_the_next_router_is_served():
    out = Output()
    stream = DeltaStream(out.take, "127.0.0.1")
    try:
        intruder = _connect(stream, token="0" * 32)
        with pytest.raises((EOFError, ConnectionResetError)):
            _read_frame(intruder)  # closed without a frame
        router = _connect(stream)
        out.items.put([TokenDelta("a", [7])])
        assert _read_frame(router) == [TokenDelta("a", [7])]
        router.close()  # the router went away; the stream waits for the next one
        out.items.put([TokenDelta("a", [8])])  # taken for the closed connection: kept
        again = _connect(stream)
        out.items.put([TokenDelta("a", [9])])
        received = [d for _ in range(2) for d in _read_frame(again)]
        assert received == [TokenDelta("a", [8]), TokenDelta("a", [9])]
    finally:
        stream.close()


class RoutedOutput:
    """What a rank's `_take_output` does with several routers: each takes its own requests'
    output (`router_of`)."""

    def __init__(self) -> None:
        self.queues: dict[str, queue.Queue[list[TokenDelta]]] = {}
        self.lock = threading.Lock()

    def _queue(self, router: str) -> queue.Queue[list[TokenDelta]]:
        with self.lock:
            return self.queues.setdefault(router, queue.Queue())

    def put(self, items: list[TokenDelta]) -> None:
        by_router: dict[str, list[TokenDelta]] = {}
        for item in items:
            by_router.setdefault(router_of(item.rid), []).append(item)
        for router, mine in by_router.items():
            self._queue(router).put(mine)

    def take(self, timeout_s: float, router: str = "") -> list[TokenDelta]:
        try:
            return self._queue(router).get(timeout=timeout_s)
        except queue.Empty:
            return []


def _frame_with_items(conn: socket.socket) -> list[TokenDelta]:
    for _ in range(10):  # past heartbeats
        items = _read_frame(conn)
        if items:
            return items
    raise AssertionError("only heartbeats")


def test_several_routers_each_get_their_own_requests_output():
    """The primary router and a front router (tagged) connected at once: each request's
    output goes to the router whose tag its id carries; a front router's connection that
    ends is reported (the rank then aborts its requests), one that connects again under the
    same tag replaces the first, and a malformed tag is refused."""
    out = RoutedOutput()
    events: queue.Queue[tuple[str, bool]] = queue.Queue()
    stream = DeltaStream(out.take, "127.0.0.1", on_router=lambda r, up: events.put((r, up)))
    try:
        primary = _connect(stream)
        front = _connect(stream, tag="ab12")
        assert {events.get(timeout=10), events.get(timeout=10)} == {("", True), ("ab12", True)}
        out.put([TokenDelta("x#1", [1]), TokenDelta("y#2@ab12", [2]), TokenDelta("z", [3])])
        assert _frame_with_items(primary) == [TokenDelta("x#1", [1]), TokenDelta("z", [3])]
        assert _frame_with_items(front) == [TokenDelta("y#2@ab12", [2])]
        again = _connect(stream, tag="ab12")  # replaces `front`
        assert events.get(timeout=10) == ("ab12", True)
        with pytest.raises((EOFError, ConnectionResetError)):
            for _ in range(5):
                _read_frame(front)
        out.put([TokenDelta("y#2@ab12", [4])])
        assert _frame_with_items(again) == [TokenDelta("y#2@ab12", [4])]
        assert events.empty()  # replaced, not gone
        again.close()
        assert events.get(timeout=10) == ("ab12", False)
        out.put([TokenDelta("x#1", [5])])  # the primary is served on
        assert _frame_with_items(primary) == [TokenDelta("x#1", [5])]
        bad = _connect(stream, tag="not-hex!")
        with pytest.raises((EOFError, ConnectionResetError)):
            _read_frame(bad)
        assert sorted(stream.routers) == [""]
    finally:
        stream.close()


def test_router_of_reads_the_tag_a_front_router_puts_in_its_ids():
    assert router_of("client#3@ab12") == "ab12"
    assert router_of("client#3") == ""
    assert router_of("user@example.com#3") == ""  # a client id may hold '@'
    assert router_of("a#b@c#3") == ""
    assert router_of("a#b@c") == ""  # not `#N@TAG`
    assert router_of("r1") == ""


def test_close_ends_the_router_connection():
    out = Output()
    stream = DeltaStream(out.take, "127.0.0.1")
    conn = _connect(stream)
    out.items.put([TokenDelta("a", [1])])
    assert _read_frame(conn) == [TokenDelta("a", [1])]
    stream.close()
    with pytest.raises((EOFError, ConnectionResetError)):
        for _ in range(5):
            _read_frame(conn)
    with pytest.raises(OSError):
        _connect(stream)  # nobody listens any more


@pytest.mark.parametrize("tag", ["", "ab12"])
def test_the_router_fails_a_rank_whose_stream_goes_silent(tag, monkeypatch):
    """The router reads a rank's stream (a real `DeltaStream` here, behind a fake actor
    handle): its tokens reach the request; a stream that stops sending, heartbeats too (a hung
    rank, a lost node), fails the rank and its requests after `stream_silence_s`. The primary
    router then kills the rank for Ray to restart; a front router (tagged) does not — its own
    stall would look the same, and the ranks are shared."""
    import asyncio

    import orchestrator.rank_watch
    from orchestrator.router import Router
    from workers.engine.messages import SamplingParams
    from workers.engine.rank_reports import RankInfo

    out = Output()
    stream = DeltaStream(out.take, "127.0.0.1")
    added: list[Any] = []  # the requests the fake rank took (their ids are the router's own)

    class Call:
        def __init__(self, fn):
            self.remote = lambda *args: asyncio.get_running_loop().run_in_executor(None, fn, *args)

    class Handle:
        ready = Call(lambda: RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256))
        stream_address = Call(lambda: stream.address)
        add_requests = Call(lambda reqs: added.extend(reqs) or [None] * len(reqs))
        abort = Call(lambda rid, sender_idle=False: None)

    class Tok:
        def decode(self, ids: object, skip_special_tokens: bool = True) -> str:
            return "".join(f"<{i}>" for i in ids)

    async def run() -> None:
        router = Router([Handle()], tokenizer=Tok(), model_name="m", stream_silence_s=2.5, tag=tag)  # type: ignore[arg-type]
        router.restart_poll_s = 60  # keep a failed rank failed for the test
        await router.start()
        await router.wait_ready(10)
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=2), rid="r")
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.3)
        rank_rid = added[0].rid
        out.items.put([TokenDelta(rank_rid, [5], num_prompt_tokens=3, num_output_tokens=1)])
        assert (await asyncio.wait_for(first, 10)).token_ids == [5]
        out.stuck.set()  # the stream's thread hangs: no frame, no heartbeat
        following = await asyncio.wait_for(gen.__anext__(), 10)
        assert following.finish_reason == "error"
        assert "no output or heartbeat for 2.5 s" in (following.error or "")
        assert router.rank_errors[0] is not None and not router.is_ready
        assert killed == ([] if tag else [True])
        await router.close()

    killed: list[bool] = []
    monkeypatch.setattr(
        orchestrator.rank_watch.ray, "kill", lambda h, no_restart: killed.append(True)
    )
    try:
        asyncio.run(run())
    finally:
        stream.close()


def _send_frame(conn: socket.socket, body: bytes) -> None:
    conn.sendall(FRAME_HEADER.pack(len(body)) + body)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch /tmp/pdserve-delta-stream-exploit",))


def test_commands_reach_the_rank_in_order_and_nothing_else_is_built(tmp_path):
    """The router's commands come in order on the stream's reading thread; a frame that would
    build anything but messages and plain containers is refused (the connection dropped,
    nothing run), and the next router is served."""
    import os

    from workers.engine.messages import GenerateRequest, SamplingParams

    received: queue.Queue[list[object]] = queue.Queue()
    out = Output()
    stream = DeltaStream(out.take, "127.0.0.1", lambda frame, router: received.put(frame))
    marker = "/tmp/pdserve-delta-stream-exploit"
    if os.path.exists(marker):
        os.remove(marker)
    try:
        conn = _connect(stream)
        req = GenerateRequest("r1", [1, 2, 3], SamplingParams(max_new_tokens=4))
        _send_frame(conn, pickle.dumps([("add", 7, [req]), ("abort", "r1")]))
        _send_frame(conn, pickle.dumps([("targets", [("r1", None)]), ("wake",)]))
        assert received.get(timeout=10) == [("add", 7, [req]), ("abort", "r1")]
        assert received.get(timeout=10) == [("targets", [("r1", None)]), ("wake",)]
        for bad in (pickle.dumps([_Exploit()]), pickle.dumps([("rm", "-rf")]), b"junk"):
            _send_frame(conn, bad)
            with pytest.raises((EOFError, ConnectionResetError)):
                for _ in range(5):  # heartbeats, then the end
                    _read_frame(conn)
            assert not os.path.exists(marker) and received.empty()
            conn = _connect(stream)  # the next router is served
        _send_frame(conn, pickle.dumps([("abort", "r2")]))
        assert received.get(timeout=10) == [("abort", "r2")]
    finally:
        stream.close()


def test_the_router_sends_its_commands_on_the_stream():
    """With a rank's stream connected, the router's adds, aborts and targets go on it, not by
    actor call: an add is answered on the stream (`AddsTaken`), and an abort made in the same
    event-loop pass as its add still reaches the rank after it."""
    import asyncio

    from orchestrator.router import Router
    from workers.engine.messages import AddsTaken, SamplingParams
    from workers.engine.rank_reports import RankInfo

    commands: list[tuple[object, ...]] = []
    out = Output()

    def on_commands(frame: list[tuple[object, ...]], router: str) -> None:
        for command in frame:
            commands.append(command)
            if command[0] == "add":
                refusals = [None if r.input_ids else "empty" for r in command[2]]  # type: ignore[attr-defined]
                out.items.put([AddsTaken(command[1], refusals)])  # type: ignore[list-item]

    stream = DeltaStream(out.take, "127.0.0.1", on_commands)
    calls: list[str] = []

    class Call:
        def __init__(self, name, fn):
            def remote(*args):
                calls.append(name)
                return asyncio.get_running_loop().run_in_executor(None, fn, *args)

            self.remote = remote

    class Handle:
        ready = Call("ready", lambda: RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256))
        stream_address = Call("stream_address", lambda: stream.address)
        add_requests = Call("add_requests", lambda reqs: [None] * len(reqs))
        abort = Call("abort", lambda rid: None)

    class Tok:
        def decode(self, ids: object, skip_special_tokens: bool = True) -> str:
            return ""

    async def run() -> None:
        router = Router([Handle()], tokenizer=Tok(), model_name="m")  # type: ignore[arg-type]
        await router.start()
        await router.wait_ready(10)
        while router.ranks.streams[0] is None:
            await asyncio.sleep(0.01)
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=2), rid="r")
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.2)
        rank_rid = commands[0][2][0].rid  # type: ignore[index]
        out.items.put([TokenDelta(rank_rid, [5], num_prompt_tokens=3, num_output_tokens=1)])
        assert (await asyncio.wait_for(first, 10)).token_ids == [5]
        await gen.aclose()  # the client leaves: the rank is told to abort
        # A request aborted at once: its add and its abort leave in the same pass.
        gen2 = router.generate([4, 5], SamplingParams(max_new_tokens=2), rid="s")
        task = asyncio.ensure_future(gen2.__anext__())
        await asyncio.sleep(0)
        assert await router.abort("s")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.3)
        await router.close()

    try:
        asyncio.run(run())
    finally:
        stream.close()
    kinds = [  # (the ranks know a request by the router's id of it, "rid#n")
        (c[0], str(c[1] if c[0] == "abort" else c[2][0].rid).split("#")[0])  # type: ignore[index]
        for c in commands
    ]
    for rid in ("r", "s"):  # each added once, then aborted (idempotent: maybe twice)
        mine = [kind for kind, of in kinds if of == rid]
        assert mine[0] == "add" and mine.count("add") == 1 and "abort" in mine[1:], kinds
    assert "add_requests" not in calls and "abort" not in calls, calls


def test_the_router_fails_a_rank_whose_stream_does_not_connect(monkeypatch):
    """A rank that reports ready but does not give its stream's address (stuck between the
    two calls) fails after `stream_silence_s`, as a silent stream does: the requests it may
    hold by then do not wait for it. (Found by an audit: the connection had no bound.)"""
    import asyncio
    import threading

    import orchestrator.rank_watch
    from orchestrator.router import Router
    from workers.engine.rank_reports import RankInfo

    release = threading.Event()

    class Call:
        def __init__(self, fn):
            self.remote = lambda *args: asyncio.get_running_loop().run_in_executor(None, fn, *args)

    class Handle:
        ready = Call(lambda: RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256))
        stream_address = Call(lambda: release.wait(30))

    async def run() -> None:
        router = Router([Handle()], tokenizer=None, model_name="m", stream_silence_s=1.0)  # type: ignore[arg-type]
        router.restart_poll_s = 60  # keep a failed rank failed for the test
        await router.start()
        for _ in range(100):
            if router.rank_errors[0] is not None:
                break
            await asyncio.sleep(0.05)
        assert "did not connect in 1 s" in (router.rank_errors[0] or ""), router.rank_errors
        assert killed == [True]  # stuck: Ray starts it afresh
        release.set()
        await router.close()

    killed: list[bool] = []
    monkeypatch.setattr(
        orchestrator.rank_watch.ray, "kill", lambda h, no_restart: killed.append(True)
    )
    asyncio.run(run())


def test_a_command_frame_cannot_reach_a_class_through_a_dotted_name(tmp_path):
    """The unpickler follows dotted names, and the message modules import others: a name
    like `torch.<...>.subprocess.Popen` under one of them reached `subprocess.Popen`, and a
    frame ran a program on the rank (found by an audit). Only a class the module defines,
    by its plain name, is built."""
    import pickle

    from workers.engine.delta_stream import decode_commands
    from workers.engine.messages import GenerateRequest, SamplingParams

    def short(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    marker = tmp_path / "ran"
    path = "torch._strobelight.cli_function_profiler.subprocess.Popen"
    body = (
        b"\x80\x04]" + short("wake") + short("workers.transfer.messages") + short(path)
        + b"\x93]" + short("touch") + b"a" + short(str(marker)) + b"a\x85R\x86a."
    )  # fmt: skip
    with pytest.raises(pickle.UnpicklingError, match="may not hold"):
        decode_commands(body)
    assert not marker.exists()
    # A class imported into a message module, by its plain name: refused too.
    with pytest.raises(pickle.UnpicklingError, match="may not hold"):
        decode_commands(b"\x80\x04]" + short("workers.engine.messages") + short("Any") + b"\x93a.")
    request = GenerateRequest("r", [1, 2], SamplingParams())  # real commands still pass
    assert decode_commands(pickle.dumps([("add", 1, [request])]))[0][2][0] == request
