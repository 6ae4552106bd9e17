"""A prefill request parked (its pages taken back for one whose decode pages were reserved)
whose target then came is computed again and sent: its old parked deadline must not fail it
while that send is in flight — that freed its pages under a live send. (Found by an audit.)"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from tests.checkpoints import make_checkpoint
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.handoff import KVHandoff
from workers.engine.messages import GenerateRequest, SamplingParams

pytestmark = pytest.mark.timeout(120)


class _SlowTransfer:
    """A transfer engine whose sends never end (a slow link); one without a target can be
    withdrawn, as the real one's."""

    def __init__(self) -> None:
        self.senders: dict[str, Any] = {}

    def send(self, rid: str, pages: list[int], token: int, timeout_s: float,
             target: Any = None, **_: Any) -> None:  # fmt: skip
        self.senders[rid] = SimpleNamespace(target=target, deadline=time.monotonic() + timeout_s)

    def withdraw(self, rid: str) -> Any:
        sender = self.senders.get(rid)
        if sender is None or sender.target is not None:
            return None
        return self.senders.pop(rid)

    def set_target(self, rid: str, target: Any) -> None:
        self.senders[rid].target = target

    def poll(self) -> list[Any]:
        return []

    def poll_released(self) -> list[str]:
        return []

    def keep_alive(self, targets: list[Any]) -> None:
        pass

    def drop_ahead(self, rid: str) -> None:
        pass


def test_a_parked_request_sent_again_is_not_failed_by_its_old_deadline(tmp_path):
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path)
    config = EngineConfig(page_size=4, kv_capacity_tokens=24, device="cpu", kv_swap_space=0)
    engine = Engine(ckpt.path, config, progress=False)
    handoff = KVHandoff("prefill", _SlowTransfer(), timeout_s=0.5, quarantine_s=0.0)
    handoff.bind(engine)
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    engine.add(GenerateRequest("x", list(range(1, 15)), sampling), mode="prefill")
    engine.step()
    handoff.after_step(engine)  # x computed, sent without a target
    handoff.set_target("y", "target-y")  # y's decode pages are reserved: it goes first
    engine.add(GenerateRequest("y", list(range(50, 62)), sampling), mode="prefill")
    engine.step()
    handoff.after_step(engine)
    assert engine.scheduler.num_parked == 1 and "x" in handoff._parked  # x's pages taken
    engine.release("y")
    handoff._in_flight.discard("y")
    time.sleep(0.3)
    handoff.set_target("x", "target-x")  # late in its window: computed again, sent
    engine.step()
    assert handoff.after_step(engine)[0] == []
    assert "x" in handoff.in_flight()
    time.sleep(0.3)  # the parked deadline passes; the new send is still in flight
    deltas, _ = handoff.after_step(engine)
    assert deltas == [] and "x" in engine.requests  # its pages stay its own
    assert engine.kv.allocator.num_free == engine.kv.num_pages - len(engine.requests["x"].pages)
