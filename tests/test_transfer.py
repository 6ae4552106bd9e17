"""KV transfer engines: the state machine on the local backend, then real NIXL agents in two Ray
actor processes moving pages across every layer (CPU pools; CUDA pools under `-m gpu`)."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import time
import uuid
from typing import Any

import pytest
import torch

from workers.transfer import (
    KVTransferEngine,
    TransferResult,
    TransferState,
    TransferTarget,
    create_transfer_engine,
)
from workers.transfer.local import LocalTransferEngine
from workers.transfer.nixl import nixl_available
from workers.transfer.pages import PageRun, page_runs
from workers.transfer.state_machine import POKE_MISSES
from workers.transfer.wake import Waker

PAGE = 4  # tokens per page in every pool here
SRC, DST = [3, 5, 6, 7], [10, 2, 11, 4]
_ids = itertools.count()


def _pool(seed: int | None, layers: int = 3, pages: int = 16, dim: int = 8) -> torch.Tensor:
    """A pool `[layers, pages * PAGE, dim]`: random for a seed, zeros for None."""
    if seed is None:
        return torch.zeros(layers, pages * PAGE, dim)
    return torch.randn(layers, pages * PAGE, dim, generator=torch.Generator().manual_seed(seed))


def _pages(kv: torch.Tensor, pages: list[int]) -> torch.Tensor:
    """The given pages of every layer: `[layers, len(pages) * PAGE, dim]`."""
    return torch.cat([kv[:, p * PAGE : (p + 1) * PAGE] for p in pages], dim=1)


def _drain(*engines: KVTransferEngine, n: int, timeout_s: float = 10.0) -> list[TransferResult]:
    """The next `n` results of `engines`; then asserts that no further result comes (each
    transfer reports exactly once per side)."""
    out: list[TransferResult] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        for e in engines:
            out += e.poll()
        assert time.monotonic() < deadline, f"only {out} after {timeout_s} s"
        time.sleep(0.002)
    time.sleep(0.05)
    extra = [r for e in engines for r in e.poll()]
    assert len(out) == n and not extra, f"reported more than once: {out + extra}"
    return out


def _local(seed: int | None = None, latency_s: float = 0.0, **pool) -> LocalTransferEngine:
    return LocalTransferEngine(f"local-{next(_ids)}", _pool(seed, **pool), PAGE, latency_s)


@pytest.fixture
def engines():
    made: list[KVTransferEngine] = []

    def make(seed: int | None = None, latency_s: float = 0.0, **pool) -> LocalTransferEngine:
        made.append(_local(seed, latency_s, **pool))
        return made[-1]  # type: ignore[return-value]

    yield make
    for e in made:
        e.close()


# ---- the state machine (local backend) ------------------------------------------------------


@pytest.mark.timeout(5)
def test_page_runs_coalesce_consecutive_pages_on_both_sides():
    assert page_runs((3, 5, 6, 7), (10, 2, 3, 4)) == [PageRun(3, 10, 1), PageRun(5, 2, 3)]
    assert page_runs((1, 2, 3), (7, 9, 10)) == [PageRun(1, 7, 1), PageRun(2, 9, 2)]
    assert page_runs((4,), (0,)) == [PageRun(4, 0, 1)]


@pytest.mark.timeout(10)
def test_local_moves_scattered_pages_and_the_first_token():
    src = create_transfer_engine("local", f"src-{next(_ids)}", _pool(1), PAGE)
    dst = create_transfer_engine("local", f"dst-{next(_ids)}", _pool(None), PAGE)
    try:
        before = dst.kv.clone()
        receiver = dst.expect("t", DST, timeout_s=5)
        assert receiver.state is TransferState.WAITING
        sender = src.send("t", SRC, first_token=42, timeout_s=5, target=receiver.target)
        res = {r.role: r for r in _drain(src, dst, n=2)}
        assert res["send"].ok and res["recv"].ok and res["recv"].first_token == 42
        assert res["recv"].num_bytes == res["send"].num_bytes == 4 * 3 * PAGE * 8 * 4
        assert sender.state is receiver.state is TransferState.SUCCESS
        assert receiver.first_token == 42
        assert torch.equal(_pages(dst.kv, DST), _pages(src.kv, SRC))
        others = [p for p in range(16) if p not in DST]
        assert torch.equal(_pages(dst.kv, others), _pages(before, others))
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(10)
def test_a_sender_forgets_peers_it_no_longer_writes_to(engines, monkeypatch):
    """A decode rank that Ray restarted comes back as a new agent; the prefill rank's engine
    forgets the old one (and its connections) once it has been unused for
    `PEER_IDLE_FORGET_S`, when a new peer appears, and never one a transfer still uses."""
    from workers.transfer import backend

    src, old, new = engines(1), engines(None), engines(None)
    forgotten: list[str] = []
    monkeypatch.setattr(src, "_forget", forgotten.append)

    def transfer(dst: LocalTransferEngine, tid: str) -> None:
        receiver = dst.expect(tid, DST, timeout_s=5)
        src.send(tid, SRC, first_token=1, timeout_s=5, target=receiver.target)
        assert all(r.ok for r in _drain(src, dst, n=2))

    transfer(old, "a")
    transfer(old, "b")  # a peer in use is not forgotten by its own use
    monkeypatch.setattr(backend, "PEER_IDLE_FORGET_S", 0.0)
    transfer(new, "c")
    assert forgotten == [old.name]
    transfer(new, "d")  # a known peer: no sweep
    assert forgotten == [old.name]
    transfer(old, "e")  # a forgotten peer is reached again on its next use
    assert forgotten == [old.name, new.name]


@pytest.mark.timeout(10)
def test_a_failed_post_keeps_a_peer_that_writes_ahead_still_use(engines, monkeypatch):
    """One transfer's write to a peer cannot be posted while another's writes ahead to that
    peer are in flight: the peer (its connection) is kept for them. (Found by an audit: it
    was forgotten, tearing those writes down.)"""
    src, dst = engines(1, latency_s=0.5), engines()
    forgotten: list[str] = []
    monkeypatch.setattr(src, "_forget", forgotten.append)
    start_write = src._start_write

    def refused(peer: Any, runs: Any, done: Any, layers: Any = None) -> Any:
        if done is not None:  # a send's own write (writes ahead carry no notification)
            raise RuntimeError("post refused")
        return start_write(peer, runs, done, layers)

    monkeypatch.setattr(src, "_start_write", refused)
    ahead = dst.expect("ahead", [1], timeout_s=5)
    failing = dst.expect("failing", [2], timeout_s=5)
    src.write_ahead("ahead", [3], 0, ahead.target)
    time.sleep(0.05)  # its write is in flight
    src.send("failing", [5], 9, timeout_s=5, target=failing.target)
    time.sleep(0.2)
    assert forgotten == []
    src.drop_ahead("ahead")


@pytest.mark.timeout(10)
def test_local_skips_the_pages_the_receiver_holds(engines):
    """A receiver that holds the request's first pages already (its prefix cache) posts
    only the rest: the sender writes its pages from `skip_pages` on, nothing else."""
    src, dst = engines(1), engines()
    before = dst.kv.clone()
    receiver = dst.expect("skip", [9, 12], timeout_s=5, skip_pages=2)
    assert receiver.target.skip_pages == 2
    src.send("skip", SRC, first_token=3, timeout_s=5, target=receiver.target)
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].ok and res["recv"].ok and res["recv"].first_token == 3
    assert res["send"].num_bytes == res["recv"].num_bytes == 2 * 3 * PAGE * 8 * 4
    assert torch.equal(_pages(dst.kv, [9, 12]), _pages(src.kv, SRC[2:]))
    others = [p for p in range(16) if p not in (9, 12)]
    assert torch.equal(_pages(dst.kv, others), _pages(before, others))
    # Pages that do not add up are refused on both sides at once.
    bad = dst.expect("bad", [1], timeout_s=5, skip_pages=1)
    src.send("bad", SRC, first_token=3, timeout_s=5, target=bad.target)
    (r, _) = sorted(_drain(src, dst, n=2), key=lambda r: r.role)
    assert "4 source pages but 1 destination pages (1 of them held" in (r.error or "")
    with pytest.raises(ValueError, match="skip_pages"):
        dst.expect("neg", [2], timeout_s=5, skip_pages=-1)


@pytest.mark.timeout(10)
def test_local_target_posted_after_send(engines):
    src, dst = engines(1), engines()
    sender = src.send("late", [0, 1, 2], first_token=7, timeout_s=5)
    time.sleep(0.03)
    assert sender.state is TransferState.BOOTSTRAPPING
    receiver = dst.expect("late", [5, 6, 7], timeout_s=5)
    src.set_target("late", receiver.target)
    assert all(r.ok for r in _drain(src, dst, n=2))
    assert receiver.first_token == 7 and sender.state is TransferState.SUCCESS
    assert torch.equal(_pages(dst.kv, [5, 6, 7]), _pages(src.kv, [0, 1, 2]))


@pytest.mark.timeout(10)
def test_local_timeouts_on_both_sides(engines):
    src, dst = engines(1, latency_s=30), engines()
    t0 = time.monotonic()
    no_target = src.send("no-target", [1], 7, timeout_s=0.2)
    no_sender = dst.expect("no-sender", [1], timeout_s=0.2)
    res = {r.transfer_id: r for r in _drain(src, dst, n=2)}
    assert time.monotonic() - t0 < 1.5
    assert "timed out waiting for the receiving rank's pages" in (res["no-target"].error or "")
    assert "timed out waiting for the KV" in (res["no-sender"].error or "")
    assert no_target.state is no_sender.state is TransferState.FAILED

    # The write never finishes in time: the sender fails, and tells the receiver at once.
    before = dst.kv.clone()
    receiver = dst.expect("slow", [3], timeout_s=10)
    sender = src.send("slow", [3], 7, timeout_s=0.3, target=receiver.target)
    time.sleep(0.1)
    assert sender.state is receiver.state is TransferState.TRANSFERRING
    res = {r.role: r for r in _drain(src, dst, n=2, timeout_s=3)}
    assert "timed out writing" in (res["send"].error or "")
    assert "the sending rank failed: timed out writing" in (res["recv"].error or "")
    assert torch.equal(dst.kv, before)  # the cancelled write never lands


@pytest.mark.timeout(10)
def test_local_keep_alive_holds_a_receive_past_its_timeout(engines):
    """A sender still computing the request says so (`keep_alive`): the receive waits a
    timeout from each word, then completes once the pages come; with no word it times out
    a timeout after the last one."""
    src, dst = engines(1), engines()
    receiver = dst.expect("kept", [2], timeout_s=0.3)
    quiet = dst.expect("quiet", [3], timeout_s=0.3)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.9:  # three timeouts
        src.keep_alive([receiver.target, quiet.target] if time.monotonic() - t0 < 0.4 else
                       [receiver.target])  # fmt: skip
        time.sleep(0.1)
    # `quiet`, told until about 0.4 s, timed out a timeout after its last word; `kept` waits.
    (ended,) = dst.poll()
    assert ended.transfer_id == "quiet" and "timed out waiting for the KV" in (ended.error or "")
    assert ended.elapsed_s > 0.35  # past its own timeout: the words moved its deadline
    assert receiver.state is TransferState.WAITING
    src.send("kept", [5], 7, timeout_s=5, target=receiver.target)
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["recv"].ok and res["recv"].first_token == 7 and res["send"].ok
    assert torch.equal(_pages(dst.kv, [2]), _pages(src.kv, [5]))


@pytest.mark.timeout(10)
def test_a_poke_wakes_a_waiting_engine_thread_and_transfers_still_complete():
    """`Waker`: a datagram to its address ends its wait at once; without one it sleeps the
    timeout. Engines with poke addresses (the sender pokes the receiver when its write
    starts) move pages as any do."""
    sleeper, poker = Waker("127.0.0.1"), Waker()
    try:
        assert sleeper.address is not None and poker.address is None
        t0 = time.monotonic()
        assert not sleeper.wait(0.1) and time.monotonic() - t0 >= 0.09
        poker.poke(sleeper.address)
        t0 = time.monotonic()
        assert sleeper.wait(5.0) and time.monotonic() - t0 < 1.0
        sleeper.wake()
        assert sleeper.wait(5.0) and not sleeper.wait(0.0)  # drained: one wake, one return
    finally:
        sleeper.close()
        poker.close()

    src = LocalTransferEngine(f"local-{next(_ids)}", _pool(1), PAGE, poke_host="127.0.0.1")
    dst = LocalTransferEngine(f"local-{next(_ids)}", _pool(None), PAGE, poke_host="127.0.0.1")
    try:
        assert dst.info().poke is not None
        receiver = dst.expect("poked", DST, timeout_s=5)
        time.sleep(0.1)  # the receiver's thread backs off towards its longest sleep
        src.send("poked", SRC, 7, timeout_s=5, target=receiver.target)
        res = {r.role: r for r in _drain(src, dst, n=2)}
        assert res["recv"].ok and res["recv"].first_token == 7 and res["send"].ok
        assert torch.equal(_pages(dst.kv, DST), _pages(src.kv, SRC))
        assert dst._poked and dst._pokes_missed == 0  # the poke came before the write
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(20)
def test_an_engine_whose_pokes_do_not_arrive_goes_back_to_polling_often():
    """Pokes sent where they never arrive (a firewall, here a dead port): after
    `POKE_MISSES` writes without one the receiver polls often again; every write lands."""
    src = LocalTransferEngine(f"local-{next(_ids)}", _pool(1), PAGE)
    dst = LocalTransferEngine(f"local-{next(_ids)}", _pool(None), PAGE, poke_host="127.0.0.1")
    try:
        assert dst._poked
        for i in range(POKE_MISSES):
            receiver = dst.expect(f"t{i}", [i % 8], timeout_s=5)
            agent = dataclasses.replace(receiver.target.agent, poke=("127.0.0.1", 9))
            target = dataclasses.replace(receiver.target, agent=agent)
            src.send(f"t{i}", [i % 8], 7, timeout_s=5, target=target)
            res = _drain(src, dst, n=2)
            assert all(r.ok for r in res), res
        assert not dst._poked
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(10)
def test_local_abort_from_either_side(engines):
    src, dst = engines(1, latency_s=30), engines()
    receiver = dst.expect("r", [1], timeout_s=5)
    dst.abort("r", "client gone")
    dst.abort("r", "twice")  # idempotent
    (r,) = _drain(dst, n=1)
    assert not r.ok and r.error == "aborted: client gone"
    assert receiver.state is TransferState.FAILED
    dst.abort("r", "after the end")  # no second result
    dst.abort("never-posted")

    receiver = dst.expect("s", [2], timeout_s=5)
    sender = src.send("s", [2], 9, timeout_s=5, target=receiver.target)
    time.sleep(0.05)
    assert sender.state is TransferState.TRANSFERRING
    src.abort("s", "prefill aborted")
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].error == "aborted: prefill aborted"
    assert "the sending rank failed: aborted: prefill aborted" in (res["recv"].error or "")

    src.send("b", [2], 9, timeout_s=5)  # still bootstrapping
    src.abort("b")
    (r,) = _drain(src, n=1)
    assert not r.ok and "aborted" in (r.error or "")


@pytest.mark.timeout(10)
def test_a_sender_aborted_before_its_first_look_tells_its_receiver(engines):
    """It had its target but its thread had not looked at it yet (bootstrapping): the
    receiver is told at once, not left holding its pages until its timeout. (Found by an
    audit.)"""
    src, dst = engines(1), engines()
    receiver = dst.expect("t", [1], timeout_s=60)
    with src._cv:  # the engine's thread looks at the send only after the abort
        src.send("t", [2], 9, timeout_s=60, target=receiver.target)
        src.abort("t", "client gone")
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].error == "aborted: client gone"
    assert "the sending rank failed: aborted: client gone" in (res["recv"].error or "")


@pytest.mark.timeout(10)
def test_a_write_that_stops_late_is_released_once(engines):
    """The first cancel of an aborted write fails (it is in flight), a later one succeeds:
    the write's handle is released once, not again as the send fails. (Found by an
    audit.)"""
    src, dst = engines(1, latency_s=30), engines()
    released: list[object] = []
    cancel = src._cancel

    def flaky(handle: object) -> bool:
        released.append(handle)
        return len(released) > 1 and cancel(handle)  # the first try: still in flight

    src._cancel = flaky  # type: ignore[method-assign]
    receiver = dst.expect("t", [1], timeout_s=60)
    src.send("t", [2], 9, timeout_s=60, target=receiver.target)
    time.sleep(0.05)
    src.abort("t", "client gone")
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].error == "aborted: client gone"
    assert len(released) == 2 and released[0] is released[1]


@pytest.mark.timeout(10)
def test_local_layout_mismatch_and_bad_requests_are_refused(engines):
    src, wide = engines(1), engines(dim=16)
    receiver = wide.expect("m", [0], timeout_s=5)
    src.send("m", [0], 1, timeout_s=5, target=receiver.target)
    res = {r.role: r for r in _drain(src, wide, n=2)}
    assert "KV layouts differ: kv_dim 8 vs 16" in (res["send"].error or "")
    assert "KV layouts differ" in (res["recv"].error or "")  # told at once, no timeout

    dst = engines()
    receiver = dst.expect("count", [0, 1], timeout_s=5)
    src.send("count", [0], 1, timeout_s=5, target=receiver.target)
    (r, _) = sorted(_drain(src, dst, n=2), key=lambda r: r.role)
    assert "1 source pages but 2 destination pages" in (r.error or "")

    with pytest.raises(ValueError, match="outside the pool"):
        dst.expect("bad", [16], timeout_s=5)
    with pytest.raises(ValueError, match="twice"):
        src.send("bad", [1, 1], 0, timeout_s=5)
    with pytest.raises(ValueError, match="at least one page"):
        src.send("bad", [], 0, timeout_s=5)
    dst.expect("dup", [3], timeout_s=5)
    with pytest.raises(ValueError, match="already being received"):
        dst.expect("dup", [4], timeout_s=5)
    dst.abort("dup")
    _drain(dst, n=1)


@pytest.mark.timeout(10)
def test_local_dead_peer_fails_after_retries(engines):
    src, dst = engines(1), engines()
    target = dst.expect("gone", [0], timeout_s=5).target
    dst.close()
    _drain(dst, n=1)  # closing failed the pending receive
    t0 = time.monotonic()
    src.send("gone", [0], 1, timeout_s=5, target=target)
    (r,) = _drain(src, n=1)
    assert "cannot reach" in (r.error or "") and "after 3 attempts" in (r.error or "")
    assert time.monotonic() - t0 < 2


@pytest.mark.timeout(10)
def test_local_close_fails_what_is_in_flight(engines):
    src = engines(1)
    sender = src.send("pending", [0], 1, timeout_s=30)
    receiver = src.expect("incoming", [1], timeout_s=30)
    src.close()
    assert {r.transfer_id: r.error for r in src.poll()} == {
        "pending": "the transfer engine was closed",
        "incoming": "the transfer engine was closed",
    }
    assert sender.state is receiver.state is TransferState.FAILED
    with pytest.raises(RuntimeError, match="closed"):
        src.send("late", [0], 1, timeout_s=1)


# ---- real NIXL agents in two Ray actor processes --------------------------------------------

nixl_only = pytest.mark.skipif(
    not nixl_available(), reason="NIXL is not installed (pip install nixl-cu12)"
)


class _Rank:
    """An actor process owning a KV pool (random for a seed, zeros for None) and a NIXL engine."""

    def __init__(self, seed: int | None, device: str = "cpu", dim: int = 8):
        self.kv = _pool(seed, dim=dim).to(device)
        self.engine: KVTransferEngine | None = create_transfer_engine(
            "nixl", f"test-{seed}-{uuid.uuid4().hex[:8]}", self.kv, PAGE
        )

    def _e(self) -> KVTransferEngine:
        assert self.engine is not None
        return self.engine

    def expect(self, tid: str, pages: list[int], timeout_s: float) -> TransferTarget:
        return self._e().expect(tid, pages, timeout_s).target

    def send(self, tid, pages, token, timeout_s, target=None, abort_after_s=None) -> None:
        self._e().send(tid, pages, token, timeout_s, target)
        if abort_after_s is not None:
            time.sleep(abort_after_s)
            self._e().abort(tid, "aborted by the test")

    def results(self, n: int, timeout_s: float = 15.0) -> list[TransferResult]:
        return _drain(self._e(), n=n, timeout_s=timeout_s)

    def pages(self, pages: list[int]) -> torch.Tensor:
        return _pages(self.kv.cpu(), pages)

    def shutdown(self) -> bool:
        """Close the engine and destroy its NIXL agent; True if this process survived it."""
        self._e().close()
        self.engine = None
        gc.collect()
        return True


def _actors(*seeds: int | None, device: str = "cpu", num_gpus: float = 0, dim: int = 8):
    import ray

    cls = ray.remote(num_cpus=0, num_gpus=num_gpus)(_Rank)
    return [cls.remote(seed, device, dim) for seed in seeds]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def nixl_pair(ray_session):
    """(sender, receiver) actors; 32 KiB pages so that a write takes a moment."""
    import ray

    src, dst = _actors(1, None, dim=2048)
    yield src, dst
    for a in (src, dst):
        ray.kill(a)


@nixl_only
@pytest.mark.timeout(60)
def test_nixl_moves_pages_between_processes(nixl_pair):
    import ray

    src, dst = nixl_pair
    before = ray.get(dst.pages.remote(list(range(16))))
    target = ray.get(dst.expect.remote("t", DST, 10))
    ray.get(src.send.remote("t", SRC, 42, 10, target))
    (sent,) = ray.get(src.results.remote(1))
    (received,) = ray.get(dst.results.remote(1))
    assert sent.ok and received.ok, (sent, received)
    assert received.first_token == 42
    assert received.num_bytes == sent.num_bytes == 4 * 3 * PAGE * 2048 * 4
    assert torch.equal(ray.get(dst.pages.remote(DST)), ray.get(src.pages.remote(SRC)))
    others = [p for p in range(16) if p not in DST]
    assert torch.equal(ray.get(dst.pages.remote(others)), _pages(before, others))


@nixl_only
@pytest.mark.timeout(60)
def test_nixl_receiver_without_a_sender_times_out_on_both_sides(nixl_pair):
    import ray

    src, dst = nixl_pair
    ray.get(dst.expect.remote("lonely", [0], 0.5))
    ray.get(src.send.remote("lonely", [0], 1, 0.5))  # never gets the target
    (received,) = ray.get(dst.results.remote(1, 5.0))
    (sent,) = ray.get(src.results.remote(1, 5.0))
    for r in (received, sent):
        assert not r.ok and "timed out" in (r.error or "") and 0.5 <= r.elapsed_s < 1.5, r


@nixl_only
@pytest.mark.timeout(60)
def test_nixl_abort_during_a_transfer(nixl_pair):
    import ray

    src, dst = nixl_pair
    target = ray.get(dst.expect.remote("abort-me", list(range(16)), 10))
    ray.get(src.send.remote("abort-me", list(range(16)), 1, 10, target, abort_after_s=0.0))
    (sent,) = ray.get(src.results.remote(1))
    (received,) = ray.get(dst.results.remote(1))
    # The abort races the write; either it stopped the write and both sides failed, or it came
    # too late and both succeeded. Never a hang, never a second result.
    if not sent.ok:
        assert sent.error == "aborted: aborted by the test"
    if not received.ok:
        # Told by the sender's "fail" notification, or — that notification is best effort
        # when the abort races the write — by its own timeout. Either way: one result, no hang.
        error = received.error or ""
        assert "the sending rank failed: aborted" in error or "timed out" in error, error

    target = ray.get(dst.expect.remote("abort-recv", [1, 2], 10))
    ray.get(dst.expect.remote("other", [3], 10))  # unaffected by the abort below
    import ray as _ray

    _ray.get(dst.__ray_call__.remote(lambda self: self.engine.abort("abort-recv", "client gone")))
    (r,) = ray.get(dst.results.remote(1))
    assert r.transfer_id == "abort-recv" and r.error == "aborted: client gone"
    other = ray.get(dst.expect.remote("other2", [4], 10))
    ray.get(src.send.remote("other2", [5], 3, 10, other))
    assert ray.get(src.results.remote(1))[0].ok
    res = {r.transfer_id: r for r in ray.get(dst.results.remote(2))}
    assert res["other2"].ok and not res["other"].ok  # "other" timed out? no: see below


@nixl_only
@pytest.mark.timeout(60)
def test_nixl_sender_fails_cleanly_when_its_peer_dies(nixl_pair):
    import ray

    src, _ = nixl_pair
    (doomed,) = _actors(None, dim=2048)
    target = ray.get(doomed.expect.remote("warm", [0], 10))
    ray.get(src.send.remote("warm", [0], 1, 10, target))
    assert ray.get(src.results.remote(1))[0].ok  # connected
    target = ray.get(doomed.expect.remote("t", list(range(16)), 30))
    ray.kill(doomed)
    time.sleep(0.5)
    ray.get(src.send.remote("t", list(range(16)), 1, 10.0, target))
    (r,) = ray.get(src.results.remote(1, 20.0))
    assert not r.ok and r.elapsed_s < 5, r  # the dead peer is noticed, not waited out
    assert "cannot reach" in (r.error or "") or "failed" in (r.error or "")


@nixl_only
@pytest.mark.timeout(60)
def test_nixl_engine_closes_cleanly_after_a_dead_peer(nixl_pair):
    import ray

    src, _ = nixl_pair  # it lost a peer in the test above (or none, when run alone)
    assert ray.get(src.shutdown.remote())


@pytest.mark.gpu
@nixl_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(120)
def test_nixl_moves_cuda_pages_between_processes(ray_session):
    import ray

    src, dst = _actors(1, None, device="cuda", num_gpus=0.5)
    try:
        before = ray.get(dst.pages.remote(list(range(16))))
        target = ray.get(dst.expect.remote("t", DST, 20))
        ray.get(src.send.remote("t", SRC, 42, 20, target))
        (sent,) = ray.get(src.results.remote(1, 30.0))
        (received,) = ray.get(dst.results.remote(1, 30.0))
        assert sent.ok and received.ok and received.first_token == 42, (sent, received)
        assert torch.equal(ray.get(dst.pages.remote(DST)), ray.get(src.pages.remote(SRC)))
        others = [p for p in range(16) if p not in DST]
        assert torch.equal(ray.get(dst.pages.remote(others)), _pages(before, others))
    finally:
        ray.kill(src)
        ray.kill(dst)
