"""`KVHandoff` ordering: a transfer target that comes from the router's thread while the loop
hands requests off is used exactly once, whichever comes first."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from workers.engine.handoff import KVHandoff

pytestmark = pytest.mark.timeout(60)


class _Transfer:
    """Records what the hand-off asks of a transfer engine (the transfer engine itself is
    tested in test_transfer.py)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.senders: dict[str, Any] = {}  # rid -> target given at send time (or None)
        self.late: dict[str, list[Any]] = {}  # rid -> targets set after the send
        self.lost: list[
            str
        ] = []  # targets for a transfer not started yet: a real engine drops them

    def send(
        self,
        rid: str,
        pages: list[int],
        first: int,
        timeout_s: float,
        target: Any,
        first_logprob: Any = None,
        num_cached_tokens: int = 0,
        guesses: tuple[int, ...] = (),
    ) -> None:
        time.sleep(0.0002)  # widen the window between "in flight" and "the engine knows it"
        with self.lock:
            assert rid not in self.senders, f"{rid} sent twice"
            self.senders[rid] = target

    def set_target(self, rid: str, target: Any) -> None:
        with self.lock:
            if rid in self.senders:
                self.late.setdefault(rid, []).append(target)
            else:
                self.lost.append(rid)

    def poll(self) -> list[Any]:
        return []

    def poll_released(self) -> list[str]:
        return []


class _Engine:
    def __init__(self) -> None:
        self.ready: list[Any] = []

    def take_handoffs(self) -> list[Any]:
        out, self.ready = self.ready, []
        return out

    def take_reserved(self) -> list[Any]:
        return []

    def take_unplaced(self) -> list[Any]:
        return []


def test_targets_from_another_thread_are_used_exactly_once() -> None:
    transfer, engine = _Transfer(), _Engine()
    handoff = KVHandoff("prefill", transfer, timeout_s=5.0)
    rids = [f"r{i}" for i in range(400)]
    rng = random.Random(0)

    def router() -> None:
        for rid in rng.sample(rids, len(rids)):
            handoff.set_target(rid, f"target-{rid}")
            if rng.random() < 0.3:
                time.sleep(0.0002)

    thread = threading.Thread(target=router)
    thread.start()
    for i, rid in enumerate(rids):  # the loop: requests finish their prefill in order
        engine.ready.append(
            SimpleNamespace(
                rid=rid,
                pages=[i],
                token_ids=[7],
                first_logprob=None,
                num_cached_tokens=0,
                mtp_draft=[],
            )  # fmt: skip
        )
        if i % 5 == 0:
            handoff.after_step(engine)  # type: ignore[arg-type]
    handoff.after_step(engine)  # type: ignore[arg-type]
    thread.join()

    assert not transfer.lost
    for rid in rids:
        early = transfer.senders[rid]
        late = transfer.late.get(rid, [])
        targets = ([early] if early is not None else []) + late
        assert targets == [f"target-{rid}"], f"{rid}: {targets}"
    assert not handoff._targets  # nothing left behind


def test_transfer_totals_and_preemptions_reach_the_metrics_summed_over_ranks():
    from prometheus_client.parser import text_string_to_metric_families

    from orchestrator.metrics import Metrics
    from workers.engine.rank_reports import RankStats, TransferTotals

    sender = TransferTotals().add("send", True, 1000, 0.5).add("send", False, 0, 9.0)
    sender = sender.add("send", True, 24, 0.25, ahead=True)
    assert (sender.sent, sender.send_failed, sender.sent_bytes, sender.send_seconds) == (
        2, 1, 1024, 0.75,
    )  # fmt: skip
    assert sender.sent_ahead == 1
    assert TransferTotals().add("send", False, 0, 1.0, ahead=True).sent_ahead == 0
    assert sender.received == sender.receive_failed == sender.received_bytes == 0
    receiver = TransferTotals().add("recv", True, 1024, 2.0).add("recv", False, 0, 1.0)

    def stats(transfers: TransferTotals, preemptions: int) -> RankStats:
        return RankStats(
            1, 0, 64, 60, 10, 100, num_preemptions=preemptions, transfers=transfers,
            num_swapped_out=preemptions // 2, num_swapped_tokens=10 * preemptions,
            num_prefix_host_hit_tokens=16 * preemptions, num_host_cached_pages=preemptions,
            num_spec_draft_tokens=4 * preemptions, num_spec_accepted_tokens=preemptions,
        )  # fmt: skip

    metrics = Metrics()
    metrics.cluster.set_rank_stats([stats(sender, 1), None, stats(receiver, 2), stats(sender, 0)])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert samples[("pdserve_preemptions_total", ())] == 3
    assert samples[("pdserve_kv_swapped_out_total", ())] == 1
    assert samples[("pdserve_kv_swapped_tokens", ())] == 30
    assert samples[("pdserve_prefix_cache_host_hit_tokens_total", ())] == 48
    assert samples[("pdserve_prefix_cache_host_pages", ())] == 3
    assert samples[("pdserve_spec_draft_tokens_total", ())] == 12
    assert samples[("pdserve_spec_accepted_tokens_total", ())] == 3
    assert samples[("pdserve_kv_transfers_written_ahead_total", ())] == 2
    t, b, sec = (
        "pdserve_kv_transfers_total",
        "pdserve_kv_transfer_bytes_total",
        "pdserve_kv_transfer_seconds_total",
    )
    assert samples[(t, (("outcome", "ok"), ("side", "send")))] == 4
    assert samples[(t, (("outcome", "failed"), ("side", "send")))] == 2
    assert samples[(t, (("outcome", "ok"), ("side", "receive")))] == 1
    assert samples[(t, (("outcome", "failed"), ("side", "receive")))] == 1
    assert (
        samples[(b, (("side", "send"),))] == 2048 and samples[(b, (("side", "receive"),))] == 1024
    )
    assert (
        samples[(sec, (("side", "send"),))] == 1.5 and samples[(sec, (("side", "receive"),))] == 2.0
    )


def test_aborted_transfers_are_not_counted_as_failed():
    """The totals behind `pdserve_kv_transfers_total`: an abort — this side's, or the peer's
    that failed the transfer here — is no transfer failure; a timeout is."""
    from workers.transfer.messages import TransferResult

    results = [
        TransferResult("ok", "send", True, None, 5, 4096, 0.01),
        TransferResult("mine", "send", False, "aborted: aborted"),  # aborted on this rank
        TransferResult("theirs", "send", False, "the receiving rank failed: aborted: aborted"),
        TransferResult("late", "send", False, "timed out waiting for the receiving rank's pages"),
    ]

    class Transfer(_Transfer):
        def poll(self) -> list[Any]:
            out, results[:] = list(results), []
            return out

        def abort(self, rid: str, reason: str = "aborted", sender_idle: bool = False) -> None:
            pass

    class Engine(_Engine):
        def release(self, rid: str) -> None:
            pass

    handoff = KVHandoff("prefill", Transfer(), timeout_s=5.0)
    handoff._in_flight.update({"ok", "mine", "theirs", "late"})
    handoff.abort(Engine(), "mine")  # type: ignore[arg-type]
    deltas, _ = handoff.after_step(Engine())  # type: ignore[arg-type]
    totals = handoff.totals
    assert (totals.sent, totals.sent_bytes, totals.send_failed) == (1, 4096, 1)
    assert [d.rid for d in deltas] == ["theirs", "late"]  # failures reach their requests
