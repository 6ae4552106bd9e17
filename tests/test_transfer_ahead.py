"""Layers written ahead of a send (`KVTransferEngine.write_ahead`): they land before the send,
the send writes only the others (or notifies alone), and anything that goes wrong with them
makes the send write every layer instead of failing."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from tests.test_transfer import DST, PAGE, SRC, _drain, _pages, _pool, engines, nixl_only
from workers.transfer import KVTransferEngine, TransferTarget, create_transfer_engine

__all__ = ["engines"]  # the fixture, shared with test_transfer


def _until(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _landed(dst: KVTransferEngine, src: KVTransferEngine, layer: int) -> bool:
    return torch.equal(_pages(dst.kv, DST)[layer], _pages(src.kv, SRC)[layer])


class _Event:
    """Stands in for a CUDA event: `query` is False until `done` is set."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


@pytest.mark.timeout(15)
def test_layers_written_ahead_are_not_written_again(engines):
    src, dst = engines(1), engines()
    target = dst.expect("t", DST, timeout_s=5).target
    event = _Event()
    src.write_ahead("t", SRC, 0, target)
    src.write_ahead("t", SRC, 1, target, ready=event)
    _until(lambda: _landed(dst, src, 0))
    time.sleep(0.05)
    assert not _landed(dst, src, 1), "a layer was written before its event completed"
    event.done = True
    _until(lambda: _landed(dst, src, 1))
    assert not _landed(dst, src, 2)
    sent_layer0 = _pages(src.kv, SRC)[0].clone()
    for p in SRC:  # layer 0 changes after it went ahead: the send must not write it again
        src.kv[0, p * PAGE : (p + 1) * PAGE] = -1.0
    src.send("t", SRC, first_token=7, timeout_s=5, target=target)
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].ok and res["recv"].ok and res["recv"].first_token == 7
    assert res["send"].layers_ahead == 2
    got = _pages(dst.kv, DST)
    assert torch.equal(got[0], sent_layer0)
    assert torch.equal(got[1:], _pages(src.kv, SRC)[1:])
    assert not src._ahead


@pytest.mark.timeout(15)
def test_a_send_whose_layers_all_went_ahead_only_notifies(engines):
    src, dst = engines(1), engines()
    target = dst.expect("t", DST, timeout_s=5).target
    for layer in range(3):
        src.write_ahead("t", SRC, layer, target)
    _until(lambda: all(_landed(dst, src, layer) for layer in range(3)))
    src.kv.fill_(0.5)  # nothing may be written again
    src.send("t", SRC, first_token=3, timeout_s=5, target=target)
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].ok and res["recv"].ok and res["send"].layers_ahead == 3
    assert not (_pages(dst.kv, DST) == 0.5).any()


@pytest.mark.timeout(15)
def test_other_pages_or_a_failed_write_ahead_make_the_send_write_every_layer(engines, monkeypatch):
    src, dst = engines(1), engines()
    # Pages that changed by the send (its pages are what count).
    target = dst.expect("a", DST, timeout_s=5).target
    src.write_ahead("a", [0, 1, 2, 8], 0, target)
    src.send("a", SRC, first_token=1, timeout_s=5, target=target)
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].ok and res["send"].layers_ahead == 0
    assert torch.equal(_pages(dst.kv, DST), _pages(src.kv, SRC))
    # A write ahead the backend refuses: the send still succeeds, writing all layers.
    dst.kv.zero_()
    real = src._start_write

    def refuse_ahead(peer, runs, done, layers=None):
        if done is None:
            raise ConnectionError("refused on purpose")
        return real(peer, runs, done, layers)

    monkeypatch.setattr(src, "_start_write", refuse_ahead)
    target = dst.expect("b", DST, timeout_s=5).target
    src.write_ahead("b", SRC, 0, target)
    src.send("b", SRC, first_token=1, timeout_s=5, target=target)
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert res["send"].ok and res["send"].layers_ahead == 0
    assert torch.equal(_pages(dst.kv, DST), _pages(src.kv, SRC))


@pytest.mark.timeout(15)
def test_the_layers_of_several_transfers_to_one_peer_go_as_one_write(engines, monkeypatch):
    """A step finishing several prompts: their layers ready at once share a write per peer,
    and a transfer dropped meanwhile does not stop the others' (its pages land too: its
    receive fails, its pages are quarantined)."""
    src, dst = engines(1, latency_s=0.05), engines()
    other = engines()
    pages = {"a": ([3, 5], [10, 2]), "b": ([6, 7], [11, 4]), "c": ([8], [12]), "d": ([9], [0])}
    targets = {tid: (other if tid == "d" else dst).expect(tid, d, timeout_s=5).target
               for tid, (_, d) in pages.items()}  # fmt: skip
    writes: list[tuple[str, int]] = []
    real = src._start_write

    def counted(peer, runs, done, layers=None):
        if done is None:
            writes.append((peer.name, len(runs)))
        return real(peer, runs, done, layers)

    monkeypatch.setattr(src, "_start_write", counted)
    event = _Event()  # holds layer 0 of every transfer until all are queued
    for tid, (src_pages, _) in pages.items():
        src.write_ahead(tid, src_pages, 0, targets[tid], ready=event)
    event.done = True
    _until(lambda: len(writes) == 2)
    assert sorted(writes) == sorted([(dst.name, 5), (other.name, 1)]), writes  # runs
    shared = src._ahead["a"].handles[0]
    assert shared is src._ahead["b"].handles[0] is src._ahead["c"].handles[0]
    src.drop_ahead("c")
    for tid in "abd":
        for layer in (1, 2):
            src.write_ahead(tid, pages[tid][0], layer, targets[tid])
        src.send(tid, pages[tid][0], first_token=5, timeout_s=5, target=targets[tid])
    # ... and c's receiver is told, once the shared write has landed (`drop_ahead`).
    res = _drain(src, dst, other, n=7)
    (dropped,) = [r for r in res if r.transfer_id == "c"]
    assert dropped.role == "recv" and "its request ended" in (dropped.error or "")
    rest = [r for r in res if r.transfer_id != "c"]
    assert all(r.ok for r in rest) and {r.layers_ahead for r in rest if r.role == "send"} == {3}
    for tid in "abd":
        peer = other if tid == "d" else dst
        assert torch.equal(_pages(peer.kv, pages[tid][1]), _pages(src.kv, pages[tid][0]))
    _until(lambda: not src._ahead and not src._dropped)
    assert dst.poll_released() == ["c"]


@pytest.mark.timeout(15)
def test_dropped_writes_ahead_are_forgotten_and_bad_calls_refused(engines):
    src, dst = engines(1, latency_s=0.05), engines()
    target = dst.expect("t", DST, timeout_s=5).target
    src.write_ahead("t", SRC, 0, target)
    _until(lambda: bool(src._ahead["t"].handles))  # in flight (latency 50 ms)
    src.drop_ahead("t")
    src.write_ahead("t", SRC, 1, target)  # the same id again: a new entry; the old one stops
    assert not src._ahead["t"].dropped and src._ahead["t"].posted == []
    _until(lambda: not src._dropped)
    src.drop_ahead("t")
    _until(lambda: not src._ahead and not src._dropped)
    assert src.poll() == []  # no send: no result
    with pytest.raises(ValueError, match="outside"):
        src.write_ahead("t", SRC, 3, target)
    with pytest.raises(ValueError, match="twice"):
        src.write_ahead("u", [1, 1], 0, target)
    src.send("v", SRC, first_token=1, timeout_s=5)
    with pytest.raises(ValueError, match="already being sent"):
        src.write_ahead("v", SRC, 0, target)
    src.drop_ahead("never")  # no-op


@pytest.mark.timeout(15)
def test_an_aborted_send_stops_its_writes_ahead(engines):
    src, dst = engines(1, latency_s=10.0), engines()
    target = dst.expect("t", DST, timeout_s=5).target
    src.write_ahead("t", SRC, 0, target)
    _until(lambda: bool(src._ahead["t"].handles))
    src.send("t", SRC, first_token=1, timeout_s=5, target=target)
    src.abort("t")
    res = {r.role: r for r in _drain(src, dst, n=2)}
    assert not res["send"].ok and "aborted" in (res["send"].error or "")
    assert not res["recv"].ok
    assert not src._ahead and not src._senders


# ---- real NIXL agents in two Ray actor processes --------------------------------------------


class _Rank:
    def __init__(self, seed: int | None, device: str = "cpu"):
        self.kv = _pool(seed, dim=512).to(device)
        self.engine = create_transfer_engine(
            "nixl", f"ahead-{seed}-{uuid.uuid4().hex[:8]}", self.kv, PAGE
        )

    def expect(self, tid: str, pages: list[int]) -> TransferTarget:
        return self.engine.expect(tid, pages, 10).target

    def write_ahead(self, tid: str, pages: list[int], layers: list[int], target) -> None:
        for layer in layers:
            self.engine.write_ahead(tid, pages, layer, target)

    def write_ahead_after_kernel(self, tid: str, pages: list[int], target) -> None:
        """Layer 0 is rewritten by GPU work queued behind a long kernel; its write ahead
        waits for the event recorded after that work."""
        torch.cuda._sleep(200_000_000)  # a few hundred ms of GPU time
        self.kv[0].fill_(7.0)
        ready = torch.cuda.Event()
        ready.record()
        self.engine.write_ahead(tid, pages, 0, target, ready)

    def fill(self, layer: int, pages: list[int], value: float) -> None:
        for p in pages:
            self.kv[layer, p * PAGE : (p + 1) * PAGE] = value

    def send(self, tid: str, pages: list[int], token: int, target) -> None:
        self.engine.send(tid, pages, token, 10, target)

    def results(self, n: int):
        return _drain(self.engine, n=n, timeout_s=15)

    def pages(self, pages: list[int]) -> torch.Tensor:
        return _pages(self.kv.cpu(), pages)

    def close(self) -> None:
        self.engine.close()


@nixl_only
@pytest.mark.timeout(60)
def test_nixl_layers_written_ahead_land_and_are_not_written_again(ray_session):
    import ray

    cls = ray.remote(num_cpus=0)(_Rank)
    src, dst = cls.remote(1), cls.remote(None)  # type: ignore[attr-defined]
    try:
        want = ray.get(src.pages.remote(SRC))
        target = ray.get(dst.expect.remote("t", DST))
        ray.get(src.write_ahead.remote("t", SRC, [0, 1], target))
        deadline = time.monotonic() + 10
        while not torch.equal(ray.get(dst.pages.remote(DST))[:2], want[:2]):
            assert time.monotonic() < deadline, "the layers written ahead did not land"
            time.sleep(0.01)
        ray.get(src.fill.remote(0, SRC, -1.0))  # must not be written again
        ray.get(src.send.remote("t", SRC, 9, target))
        (sent,) = ray.get(src.results.remote(1))
        (received,) = ray.get(dst.results.remote(1))
        assert sent.ok and received.ok and received.first_token == 9
        assert sent.layers_ahead == 2
        assert torch.equal(ray.get(dst.pages.remote(DST)), want)
    finally:
        ray.get([src.close.remote(), dst.close.remote()])
        for a in (src, dst):
            ray.kill(a)


@pytest.mark.gpu
@nixl_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(120)
def test_nixl_cuda_layer_written_ahead_waits_for_its_event(ray_session):
    import ray

    cls = ray.remote(num_cpus=0, num_gpus=0.5)(_Rank)
    src, dst = cls.remote(1, "cuda"), cls.remote(None, "cuda")  # type: ignore[attr-defined]
    try:
        target = ray.get(dst.expect.remote("t", DST))
        ray.get(src.write_ahead_after_kernel.remote("t", SRC, target))
        ray.get(src.send.remote("t", SRC, 9, target))
        (sent,) = ray.get(src.results.remote(1))
        (received,) = ray.get(dst.results.remote(1))
        assert sent.ok and received.ok and sent.layers_ahead == 1
        got = ray.get(dst.pages.remote(DST))
        assert bool((got[0] == 7.0).all()), "the layer went before the work that wrote it"
        assert torch.equal(got, ray.get(src.pages.remote(SRC)))
    finally:
        ray.get([src.close.remote(), dst.close.remote()])
        for a in (src, dst):
            ray.kill(a)
