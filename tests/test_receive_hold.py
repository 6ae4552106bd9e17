"""A failed receive's pages are not reused while its sender may still write them: the transfer
engine holds them until the sender says it stopped (`fail`, `done`), the caller says the sender
never had the target, or the sender has been silent longer than it could still write; the
decode side's hand-off keeps them allocated until then. (An audit found the receiver freeing
them after a fixed 2 s while a sender, told of the abort only later, still wrote.)"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator

import pytest
import torch

import workers.transfer.state_machine as state_machine
from tests.checkpoints import make_checkpoint
from tests.test_kv_pressure import _Rank
from workers.engine.messages import FinishReason, SamplingParams
from workers.transfer import TransferState
from workers.transfer.local import LocalTransferEngine

pytestmark = pytest.mark.timeout(60)

PAGE = 4
_ids = itertools.count()


def _pool(seed: int | None) -> torch.Tensor:
    if seed is None:
        return torch.zeros(2, 16 * PAGE, 8)
    return torch.randn(2, 16 * PAGE, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def engines():
    made: list[LocalTransferEngine] = []

    def make(seed: int | None = None, latency_s: float = 0.0) -> LocalTransferEngine:
        made.append(LocalTransferEngine(f"hold-{next(_ids)}", _pool(seed), PAGE, latency_s))
        return made[-1]

    yield make
    for e in made:
        e.close()


def _released(engine: LocalTransferEngine, within_s: float) -> list[str]:
    """What `poll_released` names within `within_s` (all of it, waiting out the time)."""
    out: list[str] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        out += engine.poll_released()
        time.sleep(0.01)
    return out


def _released_at(engine: LocalTransferEngine, timeout_s: float) -> float:
    """When `poll_released` first names something (fails after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not engine.poll_released():
        assert time.monotonic() < deadline, f"nothing released within {timeout_s} s"
        time.sleep(0.005)
    return time.monotonic()


def _result(engine: LocalTransferEngine, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = engine.poll()
        if out:
            (r,) = out
            return r
        time.sleep(0.005)
    raise AssertionError(f"no result within {timeout_s} s")


def test_an_aborted_receive_is_held_while_its_sender_writes_then_released_by_its_fail(engines):
    src, dst = engines(1, latency_s=30), engines()
    receiver = dst.expect("h", [1, 2], timeout_s=60)
    src.send("h", [3, 4], 9, timeout_s=60, target=receiver.target)
    deadline = time.monotonic() + 5
    while receiver.state is not TransferState.TRANSFERRING:  # the write is in flight
        assert time.monotonic() < deadline
        time.sleep(0.005)
    dst.abort("h", "client gone")
    r = _result(dst)
    assert not r.ok and r.error == "aborted: client gone"
    assert _released(dst, 0.5) == [] and dst.num_held == 1  # the sender may still write
    src.abort("h", "aborted on the sending rank")  # it cancels its write, then says `fail`
    assert _released(dst, 1.0) == ["h"] and dst.num_held == 0
    assert not _result(src).ok


def test_a_held_receive_is_released_when_its_sender_s_write_lands(engines):
    """The sender was not told of the abort: its write lands, then its `done` releases."""
    src, dst = engines(1, latency_s=0.6), engines()
    receiver = dst.expect("l", [1], timeout_s=60)
    src.send("l", [3], 9, timeout_s=60, target=receiver.target)
    deadline = time.monotonic() + 5
    while receiver.state is not TransferState.TRANSFERRING:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    dst.abort("l", "client gone")
    assert not _result(dst).ok
    assert _released(dst, 0.2) == []
    _released_at(dst, 5)
    landed = dst.kv[:, PAGE : 2 * PAGE].clone()
    assert torch.equal(landed, src.kv[:, 3 * PAGE : 4 * PAGE])  # it had landed before
    assert _result(src).ok


def test_a_write_ahead_shared_with_another_transfer_holds_the_given_up_one(engines):
    """Two transfers' layers go in one write (`SharedWrite`); one is given up while the
    write is in flight: it cannot be stopped for the other, so the given-up receiver is
    told only once the write has landed — its pages change no more after the release.
    (Found by an audit: the receiver was told at once, and the write landed after.)"""
    src, dst = engines(1, latency_s=1.0), engines()
    ra, rb = dst.expect("a", [1], timeout_s=60), dst.expect("b", [2], timeout_s=60)
    with src._cv:  # both layers ready at the same turn of the engine's thread: one write
        src.write_ahead("a", [3], 0, ra.target)
        src.write_ahead("b", [4], 0, rb.target)
    deadline = time.monotonic() + 5
    while not src._ahead["a"].handles:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert [w.users for w in src._ahead["a"].handles] == [2]
    src.give_up("a", ra.target, "aborted on the sending rank")
    assert _released(dst, 0.4) == [] and not dst.poll()  # still in flight: not told yet
    _released_at(dst, 5)
    at_release = dst.kv[0, PAGE : 2 * PAGE].clone()
    assert torch.equal(at_release, src.kv[0, 3 * PAGE : 4 * PAGE])  # landed before
    assert "aborted on the sending rank" in (_result(dst).error or "")
    src.drop_ahead("b")


def test_a_receive_failed_by_its_sender_is_released_with_its_result(engines):
    src, dst = engines(1), engines()
    receiver = dst.expect("f", [1], timeout_s=60)
    src.give_up("f", receiver.target, "its request ended")
    r = _result(dst)
    assert "the sending rank failed: its request ended" in (r.error or "")
    assert dst.poll_released() == ["f"]


def test_the_router_s_word_that_the_sender_never_had_the_target_releases_at_once(engines):
    dst = engines()
    dst.expect("a", [1], timeout_s=60)
    dst.abort("a", "aborted", sender_idle=True)  # before the receive ended
    _result(dst)
    assert dst.poll_released() == ["a"]

    dst.expect("b", [2], timeout_s=60)
    dst.abort("b", "aborted")
    _result(dst)
    assert _released(dst, 0.2) == []
    dst.abort("b", "aborted", sender_idle=True)  # after it ended: still releases it
    assert _released(dst, 0.2) == ["b"]


def test_a_silent_sender_s_receive_is_released_after_the_hold_and_words_extend_it(
    engines, monkeypatch
):
    monkeypatch.setattr(state_machine, "CANCEL_GRACE_S", 0.2)
    monkeypatch.setattr(state_machine, "HOLD_MARGIN_S", 0.1)
    src, dst = engines(1), engines()
    receiver = dst.expect("s", [1], timeout_s=0.5)
    dst.abort("s")
    _result(dst)
    # The sender (still computing the prompt) says it is alive: the hold runs from then on.
    for _ in range(3):
        time.sleep(0.4)
        src.keep_alive([receiver.target])
    told = time.monotonic()
    held_for = _released_at(dst, 5) - told
    assert 0.7 <= held_for < 1.5, held_for  # 0.5 + 0.2 + 0.1 s after the last word


def test_give_up_stops_writes_ahead_before_telling_the_receiver(engines):
    src, dst = engines(1, latency_s=30), engines()
    receiver = dst.expect("w", [1, 2], timeout_s=60)
    src.write_ahead("w", [3, 4], 0, receiver.target)
    deadline = time.monotonic() + 5
    while receiver.state is not TransferState.TRANSFERRING:  # the write ahead started
        assert time.monotonic() < deadline
        time.sleep(0.005)
    src.give_up("w", receiver.target, "aborted on the sending rank")
    r = _result(dst)
    assert "aborted on the sending rank" in (r.error or "")
    assert dst.poll_released() == ["w"]
    assert not src._ahead and not src._dropped and not src._give_ups

    receiver = dst.expect("d", [5], timeout_s=60)
    src.write_ahead("d", [6], 0, receiver.target)
    src.drop_ahead("d")  # no send follows: the receiver is told too
    r = _result(dst)
    assert "its request ended" in (r.error or "")
    assert dst.poll_released() == ["d"]


# ---- the hand-off: a decode rank keeps the pages, a prefill rank tells the receiver ---------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("hold"))


def _until(what, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    return value


@contextlib.contextmanager
def _ranks(ckpt, with_target: bool) -> Iterator[tuple[_Rank, _Rank]]:
    """A prefill and a decode rank with request "r" on both, its decode pages reserved;
    `with_target`: its target given to the prefill rank (which has not computed it yet)."""
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    prefill = _Rank(ckpt.path, "prefill", 512, timeout_s=30)
    decode = _Rank(ckpt.path, "decode", 512, timeout_s=30)
    try:
        prompt = list(range(3, 40))
        decode.add("r", prompt, sampling)
        (ready,) = decode.step()[1]
        prefill.add("r", prompt, sampling)
        if with_target:
            assert prefill.handoff.set_target("r", ready.target)
        yield prefill, decode
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("sender_idle", [False, True])
def test_an_aborted_decode_request_ends_at_once_and_its_pages_wait_for_the_sender(
    ckpt, sender_idle
):
    """The decode side is aborted while its prompt still waits on the prefill rank (which
    has the target, or never got it): the request ends at once; its pages stay allocated
    until the prefill rank applies the abort and tells it (or, when the router says the
    sender never had the target, at once), then the quarantine."""
    # Without `sender_idle` the router forwarded the target; the prefill rank has not
    # computed the prompt yet.
    with _ranks(ckpt, with_target=not sender_idle) as (prefill, decode):
        used = decode.pages_in_use()
        assert used == 10

        assert decode.handoff.abort(decode.engine, "r", sender_idle) is None
        deltas = _until(lambda: decode.step()[0])
        assert [(d.rid, d.finish_reason) for d in deltas] == [("r", FinishReason.ABORT)]
        assert "r" not in decode.engine.requests
        if not sender_idle:
            time.sleep(0.3)
            decode.step()
            assert decode.pages_in_use() == used  # the prefill rank may still write them
            assert decode.handoff.num_held_pages == used
            prefill.handoff.abort(prefill.engine, "r")  # tells the receiver
        _until(lambda: (decode.step(), decode.pages_in_use() == 0)[1])
        assert decode.handoff.num_held_pages == 0 and not decode.handoff.busy


# ---- the router: whether the sender ever had the target -------------------------------------


def test_the_router_tells_a_receiving_side_whether_its_sender_can_still_write():
    """`abort_sides` says `sender_idle` to the receiving (decode) side when the target never
    went to the sending side (after it, a late target is no longer forwarded, so the word
    stays true), or when the sending rank's process that had it is gone: restarted since, or
    — when the abort comes while that rank is down — once it is back as a new process."""
    import asyncio
    from types import SimpleNamespace

    from orchestrator.rank_output import dispatch
    from orchestrator.ranks import RankTable
    from orchestrator.request_sides import abort_sides
    from orchestrator.routed import RoutedRequest
    from workers.engine.messages import TransferReady

    async def run() -> list[tuple[int, tuple]]:
        sent: list[tuple[int, tuple]] = []
        tasks = []
        ranks = RankTable([object()] * 3)
        ranks.send_command = lambda rank, command: sent.append((rank, command))  # type: ignore[method-assign]
        ranks.spawn = lambda coro: tasks.append(asyncio.ensure_future(coro))  # type: ignore[method-assign]
        ranks.infos[0] = SimpleNamespace(pid=100)  # type: ignore[call-overload]
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)

        def request(rid: str, prefill_rank: int | None = 0) -> RoutedRequest:
            rank = 1 if prefill_rank is not None else 2
            req = RoutedRequest(rid, rank, 8, 4, prefill_rank, sender_pid=100)
            req.adds = [(rank, done)] + ([(0, done)] if prefill_rank is not None else [])
            return req

        reqs = {r.rid: r for r in map(request, "abde")} | {"c": request("c", None)}
        ready = [TransferReady(rid, f"target-{rid}") for rid in "ade"]
        dispatch(ranks, reqs, 1, ready)  # type: ignore[arg-type]
        assert sent == [(0, ("targets", [(rid, f"target-{rid}") for rid in "ade"]))]
        sent.clear()
        reqs["b"].prefill_rank = None  # (what releasing the attempt does: the word holds)
        for rid in "abc":
            await asyncio.gather(*abort_sides(ranks, reqs[rid]))
        # A target that comes after the abort: not forwarded.
        dispatch(ranks, reqs, 1, [TransferReady("b", "target-b")])  # type: ignore[arg-type]
        await asyncio.gather(*tasks)
        ranks.errors[0] = "engine rank 0 failed"  # down: its process may live on
        await asyncio.gather(*abort_sides(ranks, reqs["e"]))
        ranks.release_orphans(0, process_gone=True)  # back, as a new process
        ranks.errors[0], ranks.infos[0] = None, SimpleNamespace(pid=200)  # type: ignore[call-overload]
        await asyncio.gather(*abort_sides(ranks, reqs["d"]))  # its sender restarted since
        assert not ranks.orphans
        return sent

    assert asyncio.run(run()) == [
        (1, ("abort", "a")), (0, ("abort", "a")),
        (1, ("abort", "b", True)), (0, ("abort", "b")),
        (2, ("abort", "c")),
        (1, ("abort", "e")), (0, ("abort", "e")), (1, ("abort", "e", True)),
        (1, ("abort", "d", True)), (0, ("abort", "d")),
    ]  # fmt: skip


@pytest.fixture
def pair(ckpt):
    """A prefill and a decode rank with request "r" on both, its decode pages reserved and
    its target given to the prefill rank, which has not computed it yet."""
    with _ranks(ckpt, with_target=True) as ranks:
        yield ranks


def test_an_abort_after_the_kv_arrived_frees_the_pages_at_once(pair):
    """The receive ended ok on the transfer engine's thread, and the abort reached the rank
    before its loop saw that result: nothing writes those pages any more, so they are freed
    at once. (Found by an audit: they were held for a release that never came.)"""
    prefill, decode = pair
    _until(lambda: (prefill.step(), not prefill.handoff.busy)[1])  # sent
    _until(lambda: decode.handoff.transfer._results)  # arrived, not yet seen by the loop
    assert decode.handoff.abort(decode.engine, "r") is None
    deltas, _ = decode.step()
    assert [(d.rid, d.finish_reason) for d in deltas] == [("r", FinishReason.ABORT)]
    assert decode.pages_in_use() == 0 and not decode.handoff.busy


def test_a_prefill_rank_that_stalled_past_the_timeout_does_not_write(pair):
    """Its loop did not tell the receiver to wait on for longer than the transfer timeout:
    the receiver may have given its pages up, so the prompt fails without a write and the
    receiver is told."""
    prefill, decode = pair
    target, since, _ = prefill.handoff._targets["r"]
    prefill.handoff._targets["r"] = (target, since, time.monotonic() - 31)  # the stall
    deltas = _until(lambda: prefill.step()[0])
    assert [d.rid for d in deltas] == ["r"] and "did not tell it to wait" in deltas[0].error
    assert prefill.pages_in_use() == 0
    deltas = _until(lambda: decode.step()[0])
    assert "its prompt took too long" in (deltas[0].error or "")
    _until(lambda: (decode.step(), decode.pages_in_use() == 0)[1])
    assert torch.count_nonzero(decode.engine.kv.data) == 0  # nothing was written


def test_a_scaled_down_sender_s_receivers_are_told_once_its_process_ended():
    import asyncio

    from orchestrator.ranks import RankTable
    from orchestrator.request_sides import abort_sides
    from orchestrator.routed import RoutedRequest

    async def run() -> list[tuple[int, tuple]]:
        sent: list[tuple[int, tuple]] = []
        ranks = RankTable([object()] * 2)
        ranks.send_command = lambda rank, command: sent.append((rank, command))  # type: ignore[method-assign]
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        reqs = [RoutedRequest(rid, 1, 8, 4, 0, target_sent=True) for rid in ("a", "b")]
        for req in reqs:
            req.adds = [(1, done)]
        ranks.remove([0])  # scaled down: its process still runs until released
        await asyncio.gather(*abort_sides(ranks, reqs[0]))
        ranks.ranks_exited([0])
        await asyncio.gather(*abort_sides(ranks, reqs[1]))  # after: idle at once
        return sent

    assert asyncio.run(run()) == [
        (1, ("abort", "a")), (1, ("abort", "a", True)), (1, ("abort", "b", True)),
    ]  # fmt: skip


def test_a_request_its_sending_rank_refused_frees_its_receive_at_once():
    import asyncio

    from orchestrator.ranks import RankTable
    from orchestrator.request_sides import abort_sides
    from orchestrator.routed import RoutedRequest

    async def run() -> list[tuple[int, tuple]]:
        sent: list[tuple[int, tuple]] = []
        ranks = RankTable([object()] * 2)
        ranks.send_command = lambda rank, command: sent.append((rank, command))  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        taken, refused = loop.create_future(), loop.create_future()
        taken.set_result(None)
        refused.set_exception(ValueError("input_ids: too long"))
        req = RoutedRequest("r", 1, 8, 4, 0, target_sent=True)
        req.adds = [(1, taken), (0, refused)]
        await asyncio.gather(*abort_sides(ranks, req))
        return sent

    assert asyncio.run(run()) == [(1, ("abort", "r", True)), (0, ("abort", "r"))]
