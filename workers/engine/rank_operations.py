"""`RankOperations`: what an engine rank does besides serving requests — the expert-rebalance
phases the EPLB service drives (see `workers.engine.rank_eplb`) and, for tests, fault
injection. A part of the `EngineWorker` actor (its base class), kept apart by role."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import ray

from workers.engine.engine import Engine
from workers.engine.handoff import FAULTS, RANK_FAULTS, KVHandoff
from workers.engine.inbox import Message
from workers.engine.rank_eplb import RankEplb
from workers.ep.rebalance import PhaseReport


class RankOperations:
    """Needs the worker's engine, hand-off, EPLB phases, inbox and its lock, and
    `_call_in_loop`."""

    engine: Engine
    handoff: KVHandoff | None
    eplb: RankEplb
    allow_fault_injection: bool
    _lock: threading.Condition
    _inbox: deque[Message]
    _faults: Counter[str]

    def _call_in_loop(self, fn: Any, timeout_s: float = 60.0) -> Any:
        raise NotImplementedError

    def inject_fault(self, kind: str, count: int = 1) -> None:
        if not self.allow_fault_injection:
            raise RuntimeError("fault injection is off on this rank (allow_fault_injection)")
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {sorted(FAULTS)}")
        if kind.startswith("eplb_"):
            self.eplb.arm_fault(kind, count)
            return
        if kind in RANK_FAULTS:
            with self._lock:
                self._faults[kind] += count
            return
        if self.handoff is None:
            raise ValueError(f"fault {kind!r} applies to disaggregated ranks only")
        with self._lock:  # armed by the loop, between steps
            self._inbox.append(("fault", (kind, count)))
            self._lock.notify_all()

    def _take_fault(self, kind: str) -> bool:
        """Consume one armed `kind` fault; the caller holds the lock that guards it."""
        if self._faults[kind] <= 0:
            return False
        self._faults[kind] -= 1
        return True

    @ray.method(enable_task_events=False)  # polled by the EPLB service (see `stats`)
    def expert_load(self) -> Any:
        """Tokens routed per (layer, logical expert) since the last call: `[layers, experts]`
        int64 (CPU), or None for a dense model. Taken by the loop between steps."""
        return self._call_in_loop(self.engine.take_expert_load)

    # ---- expert rebalance (driven by the EPLB service; see workers.engine.rank_eplb) ---------

    @ray.method(enable_task_events=False)  # polled by the EPLB service (see `stats`)
    def expert_placement(self) -> Any:
        """The pool's current `phy2log: [layers, slots]` (None outside an EP pool)."""
        return self.eplb.expert_placement()

    def eplb_slot_bytes(self) -> int:
        """Bytes one moved expert takes in staging here (the EPLB service sizes its rounds
        by it)."""
        return self.eplb.slot_bytes()

    def eplb_load(self, phy2log: Any) -> PhaseReport:
        return self.eplb.load(phy2log)

    def eplb_prepare(self) -> PhaseReport:
        return self.eplb.prepare()

    def eplb_execute(self, timeout_s: float = 60.0) -> PhaseReport:
        """Arm the prepared rebalance; the loop executes it at the first step boundary where
        every rank of the pool has armed it. On timeout it is disarmed (nothing changed)."""
        return self.eplb.execute(timeout_s)

    def eplb_abort(self) -> None:
        """Drop whatever is loaded, staged or armed; the placement stays as it is (unless the
        pool already executed it)."""
        self.eplb.abort()
