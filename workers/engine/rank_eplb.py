"""`RankEplb`: an engine rank's side of an expert rebalance, between the EPLB service and the
rank's loop (the phases themselves are `workers.ep.rebalance.RankRebalancer`'s).

Owned by the `EngineWorker` of a rank, whose `expert_placement` and `eplb_*` actor methods call
the methods of the same name here, on the actor's threads:

- `load` / `prepare` / `execute` / `abort`: one phase at a time (under a lock the loop never
  takes, so serving goes on while a rank reads experts from disk).
- `execute` arms the prepared rebalance and waits for the loop, which at each agreement of the
  pool offers it (`offer_swap`), executes it when every rank of the pool offered it
  (`execute_swap`: the pause), and ends the offer whatever the agreement decided (`end_offer`).
  Those three run on the loop thread only.

Armed `eplb_*` faults (`workers.engine.handoff.FAULTS`) are counted here (`arm_fault`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from workers.engine.engine import Engine
from workers.ep.rebalance import PhaseReport, RankRebalancer


class RankEplb:
    def __init__(self, engine: Engine, model_dir: str, wake: Callable[[], None]):
        """`wake`: makes the rank's loop join the pool's next agreement at once."""
        self.engine = engine
        ep = engine.ep
        self.rebalancer = RankRebalancer(engine.model, ep, model_dir) if ep else None
        self._wake = wake
        # Rebalance phases (load / prepare / arm / abort) one at a time; the loop never takes
        # this one, so serving goes on while a rank reads experts from disk.
        self._phase_lock = threading.Lock()
        self._swap_lock = threading.Lock()  # `_swap` / `_offered`, held briefly (and by execute)
        self._swap: Future[Any] | None = None  # an armed execute, done by the loop
        self._offered: Future[Any] | None = None  # the armed execute offered in an agreement
        self._faults: Counter[str] = Counter()  # armed eplb_* faults (under _phase_lock)

    def expert_placement(self) -> Any:
        """The pool's current `phy2log: [layers, slots]` (None outside an EP pool)."""
        return None if self.engine.ep is None else self.engine.ep.placement.phy2log.clone()

    def slot_bytes(self) -> int:
        """Bytes one moved expert takes in staging on this rank (0 outside an EP pool)."""
        return 0 if self.rebalancer is None else self.rebalancer.slot_bytes

    def arm_fault(self, kind: str, count: int) -> None:
        """Arm `count` of the `eplb_*` fault `kind` (already checked against `FAULTS`)."""
        with self._phase_lock:
            self._faults[kind] += count

    def _rebalancer(self) -> RankRebalancer:
        if self.rebalancer is None:
            raise ValueError("this rank is not in an expert-parallel pool")
        return self.rebalancer

    def _fault(self, phase: str) -> None:
        if self._faults[f"eplb_stall_{phase}"] > 0:
            self._faults[f"eplb_stall_{phase}"] -= 1
            time.sleep(3.0)
        if self._faults[f"eplb_{phase}"] > 0:
            self._faults[f"eplb_{phase}"] -= 1
            raise RuntimeError(f"injected failure in the {phase} phase")

    def load(self, phy2log: Any) -> PhaseReport:
        with self._phase_lock:
            self._fault("load")
            return self._rebalancer().load(phy2log)

    def prepare(self) -> PhaseReport:
        with self._phase_lock:
            self._fault("prepare")
            return self._rebalancer().prepare()

    def execute(self, timeout_s: float = 60.0) -> PhaseReport:
        """Arm the prepared rebalance; the loop executes it at the first step boundary where
        every rank of the pool has armed it. On timeout it is disarmed (nothing changed)."""
        with self._phase_lock:
            self._fault("execute")
            if self._rebalancer().stage != "prepared":
                raise RuntimeError("nothing prepared to execute")
            future: Future[Any] = Future()
            with self._swap_lock:
                self._swap = future
        self._wake()  # offer it at the pool's next agreement, however idle the pool is
        try:
            return future.result(timeout_s)  # type: ignore[no-any-return]
        except TimeoutError:
            self._disarm(future)
            if future.done() and not future.cancelled():
                return future.result()  # type: ignore[no-any-return]
            raise TimeoutError("the pool's other ranks did not arm the rebalance in time") from None

    def _disarm(self, future: Future[Any] | None) -> None:
        """Withdraw an armed execute — unless an agreement in progress has offered it: then
        wait for that agreement (all ranks execute it or none)."""
        while True:
            with self._swap_lock:
                if self._offered is None or self._offered is not future:
                    if future is not None and not future.done():
                        future.cancel()
                    if self._swap is future:
                        self._swap = None
                    return
            time.sleep(0.001)

    def abort(self) -> None:
        """Drop whatever is loaded, staged or armed; the placement stays as it is (unless the
        pool already executed it). Under the phase lock throughout: an execute arming
        meanwhile would otherwise stay armed with nothing prepared, and fire with the next
        rebalance's (found by an audit)."""
        with self._phase_lock:
            self._disarm(self._swap)
            if self.rebalancer is not None:
                self.rebalancer.abort()

    # ---- the loop thread's side ---------------------------------------------------------------

    def offer_swap(self) -> bool:
        """Before an agreement: whether this rank offers an armed rebalance in it."""
        with self._swap_lock:
            swap = self._swap
            self._offered = swap if swap is not None and not swap.done() else None
            return self._offered is not None

    def execute_swap(self) -> None:
        """When every rank offered its armed rebalance: execute it (the pause)."""
        with self._swap_lock:
            future = self._offered
            assert future is not None, "all ranks agreed on a swap this rank did not offer"
            self._swap = None
            try:
                future.set_result(self._rebalancer().execute())
            except Exception as e:
                future.set_exception(e)
                raise

    def end_offer(self) -> None:
        """After the agreement, whatever it decided (even when it failed)."""
        with self._swap_lock:
            self._offered = None
