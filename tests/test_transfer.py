"""KV transfer engines: the state machine (local backend) and real NIXL agents in two Ray actor
processes moving pages across every layer."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from workers.transfer import TransferResult, TransferState, create_transfer_engine
from workers.transfer.nixl import nixl_available

pytestmark = pytest.mark.timeout(120)
_names = itertools.count()


def _pool(seed: int, layers: int = 3, pages: int = 16, page_size: int = 4, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, pages * page_size, dim, generator=g)


def _results(*engines, n: int, timeout_s: float = 10.0) -> list[TransferResult]:
    out: list[TransferResult] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        for e in engines:
            out += e.poll()
        assert time.monotonic() < deadline, f"only {out} after {timeout_s} s"
        time.sleep(0.002)
    time.sleep(0.05)
    for e in engines:
        assert not e.poll(), "a transfer reported twice"
    return out


def _pages(kv: torch.Tensor, pages: list[int], page_size: int = 4) -> torch.Tensor:
    return torch.cat([kv[:, p * page_size : (p + 1) * page_size] for p in pages], dim=1)


@pytest.fixture
def pair():
    src = create_transfer_engine("local", f"src-{next(_names)}", _pool(0), 4)
    dst = create_transfer_engine("local", f"dst-{next(_names)}", torch.zeros_like(_pool(0)), 4)
    yield src, dst
    src.close()
    dst.close()


def test_local_success_with_target_after_send(pair):
    src, dst = pair
    before = dst.kv.clone()
    sender = src.send("t", [3, 5, 6, 7], first_token=42, timeout_s=5)
    time.sleep(0.02)
    assert sender.state is TransferState.BOOTSTRAPPING  # no target yet
    receiver = dst.expect("t", [10, 2, 11, 4], timeout_s=5)
    src.set_target("t", receiver.target)
    results = {r.role: r for r in _results(src, dst, n=2)}
    assert results["send"].ok and results["recv"].ok and results["recv"].first_token == 42
    assert sender.state is receiver.state is TransferState.SUCCESS
    assert torch.equal(_pages(dst.kv, [10, 2, 11, 4]), _pages(src.kv, [3, 5, 6, 7]))
    untouched = [p for p in range(16) if p not in (10, 2, 11, 4)]
    assert torch.equal(_pages(dst.kv, untouched), _pages(before, untouched))


def test_local_timeouts_abort_and_mismatch(pair):
    src, dst = pair
    src.send("no-target", [1], 7, timeout_s=0.2)
    dst.expect("no-sender", [1], timeout_s=0.2)
    res = {r.transfer_id: r for r in _results(src, dst, n=2)}
    assert not res["no-target"].ok and "timed out" in (res["no-target"].error or "")
    assert not res["no-sender"].ok and "timed out" in (res["no-sender"].error or "")

    receiver = dst.expect("aborted", [1], timeout_s=5)
    dst.abort("aborted", "client gone")
    dst.abort("aborted", "twice")  # idempotent
    (r,) = _results(dst, n=1)
    assert not r.ok and "client gone" in (r.error or "")
    assert receiver.state is TransferState.FAILED

    other = create_transfer_engine("local", f"odd-{next(_names)}", torch.zeros(3, 64, 16), 4)
    try:
        target = other.expect("mismatch", [0], timeout_s=5).target
        src.send("mismatch", [0], 1, timeout_s=5, target=target)
        (r,) = _results(src, n=1)
        assert not r.ok and "layouts differ" in (r.error or "")
        other.abort("mismatch")
        _results(other, n=1)
    finally:
        other.close()


def test_local_dead_peer_fails_after_retries(pair):
    src, dst = pair
    target = dst.expect("gone", [0], timeout_s=5).target
    dst.close()
    src.send("gone", [0], 1, timeout_s=5, target=target)
    (r,) = _results(src, n=1)
    assert not r.ok and "cannot reach" in (r.error or "")


# ---- real NIXL agents in two processes ------------------------------------------------------

nixl_only = pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")


class _Rank:
    """A process owning a KV pool and a NIXL transfer engine."""

    def __init__(self, seed: int, device: str = "cpu"):
        kv = _pool(seed) if seed else torch.zeros_like(_pool(1))
        self.kv = kv.to(device)
        self.engine = create_transfer_engine("nixl", f"nixl-{seed}-{time.time_ns()}", self.kv, 4)

    def expect(self, tid, pages, timeout_s):
        return self.engine.expect(tid, pages, timeout_s).target

    def send(self, tid, pages, token, timeout_s, target=None):
        self.engine.send(tid, pages, token, timeout_s, target)

    def abort(self, tid):
        self.engine.abort(tid, "aborted by the test")

    def results(self, n, timeout_s=15.0):
        return _results(self.engine, n=n, timeout_s=timeout_s)

    def pages(self, pages):
        return _pages(self.kv.cpu(), pages)


def _actors(ray_session, device: str = "cpu", num_gpus: float = 0):
    import ray

    cls = ray.remote(num_cpus=0.5, num_gpus=num_gpus)(_Rank)
    return cls.remote(7, device), cls.remote(0, device)


@nixl_only
def test_nixl_moves_pages_between_processes(ray_session):
    import ray

    src, dst = _actors(ray_session)
    try:
        before = ray.get(dst.pages.remote(list(range(16))))
        target = ray.get(dst.expect.remote("t", [10, 2, 11, 4], 10))
        ray.get(src.send.remote("t", [3, 5, 6, 7], 42, 10, target))
        (sent,) = ray.get(src.results.remote(1))
        (received,) = ray.get(dst.results.remote(1))
        assert sent.ok and received.ok and received.first_token == 42
        assert sent.num_bytes == 4 * 3 * 4 * 8 * 4  # pages x layers x page_size x dim x fp32
        moved = ray.get(dst.pages.remote([10, 2, 11, 4]))
        assert torch.equal(moved, ray.get(src.pages.remote([3, 5, 6, 7])))
        untouched = [p for p in range(16) if p not in (10, 2, 11, 4)]
        assert torch.equal(ray.get(dst.pages.remote(untouched)), _pages(before, untouched))

        # The decode side never gets a sender: both sides time out, nothing hangs.
        ray.get(dst.expect.remote("lonely", [0], 0.3))
        ray.get(src.send.remote("orphan", [0], 1, 0.3))
        assert not ray.get(dst.results.remote(1))[0].ok
        assert not ray.get(src.results.remote(1))[0].ok

        # Abort during a transfer, from the receiving side.
        target = ray.get(dst.expect.remote("abort-me", [1, 2], 10))
        ray.get(dst.abort.remote("abort-me"))
        (r,) = ray.get(dst.results.remote(1))
        assert not r.ok and "aborted" in (r.error or "")
        ray.get(src.send.remote("abort-me", [1, 2], 1, 10, target))
        ray.get(src.results.remote(1))  # the sender reports too (its write lands nowhere used)
    finally:
        ray.kill(src)
        ray.kill(dst)


@nixl_only
def test_nixl_sender_fails_cleanly_when_the_peer_dies(ray_session):
    import ray

    src, dst = _actors(ray_session)
    try:
        target = ray.get(dst.expect.remote("t", list(range(16)), 10))
        ray.kill(dst)
        time.sleep(0.5)
        ray.get(src.send.remote("t", list(range(16)), 1, 3.0, target))
        (r,) = ray.get(src.results.remote(1, 20.0))
        assert not r.ok  # an error or a timeout, never a hang
    finally:
        ray.kill(src)


@pytest.mark.gpu
@nixl_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nixl_moves_gpu_pages(ray_session):
    import ray

    src, dst = _actors(ray_session, "cuda", num_gpus=0.5)
    try:
        target = ray.get(dst.expect.remote("t", [10, 2], 10))
        ray.get(src.send.remote("t", [3, 5], 9, 10, target))
        assert ray.get(src.results.remote(1))[0].ok and ray.get(dst.results.remote(1))[0].ok
        assert torch.equal(ray.get(dst.pages.remote([10, 2])), ray.get(src.pages.remote([3, 5])))
    finally:
        ray.kill(src)
        ray.kill(dst)
