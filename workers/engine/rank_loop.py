"""The loop thread of an engine rank (`run_loop`, started by `EngineWorker`): it waits for work
— what the actor threads queued (`workers.engine.inbox`), a transfer's result, the pool's next
agreement — then applies the inbox, posts a decode rank's receives, steps the engine (on an
expert-parallel pool in lockstep with the pool's other ranks: `workers.ep.group.PoolGroup.agree`)
and hands the output to the rank's output stream. A failed step ends every request with an
error and exits the process, for Ray to start the rank afresh.

Free functions over the `EngineWorker`, whose lock, inbox and outbox they share with its actor
methods (`workers.engine.worker`); only the loop thread calls them.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING

from workers.engine.handoff import RANK_FAULTS, SLOW_STEP_S
from workers.engine.inbox import apply_inbox
from workers.engine.messages import TokenDelta, TransferReady, router_of
from workers.engine.rank_reports import RankStats
from workers.engine.rank_setup import group_poll_s

if TYPE_CHECKING:
    from workers.engine.worker import EngineWorker

logger = logging.getLogger("workers.engine.worker")

_LOOP_FAULTS = tuple(RANK_FAULTS - {"fail_add"})  # (the rank's faults the loop takes)


def run_loop(worker: EngineWorker, mode: str) -> None:
    """Serve until the rank stops (or exits the process); `mode`: how the rank adds a request
    (`Engine.add`). Whatever fails in the loop, not only a step (the inbox, posting receives,
    a hand-off), ends its requests and the process as a failed step does: a loop thread that
    died quietly would leave a rank that the router still sees alive (its stream's heartbeat
    goes on) and whose requests hang."""
    try:
        _serve(worker, mode)
    except Exception as e:
        if worker._stopped:  # the rank is stopping anyway (a peer of its pool left first)
            logger.warning("engine loop failed while stopping: %s", e)
            return
        if worker.group is not None:
            _leave_broken_pool(worker, e)
        else:
            logger.error("engine loop failed:\n%s", traceback.format_exc())
            _exit_for_restart(worker, f"engine loop failed: {type(e).__name__}: {e}")


def _serve(worker: EngineWorker, mode: str) -> None:
    engine, handoff, group = worker.engine, worker.handoff, worker.group
    last_busy = 0.0
    early_targets = 0
    while True:
        with worker._lock:
            while not worker._inbox and not worker._stopped and not worker._transfer_results:
                if (engine.has_work and not engine.idle) or worker._woken:
                    break
                if worker._num_early_targets != early_targets:
                    break
                wait_s = handoff.wait_s(time.monotonic()) if handoff is not None else None
                if group is not None:
                    # The pool's other ranks may step: join the next agreement soon.
                    idle_s = group_poll_s(time.monotonic() - last_busy)
                    wait_s = idle_s if wait_s is None else min(wait_s, idle_s)
                if wait_s is not None and wait_s <= 0:
                    break
                worker._lock.wait(wait_s)
                if wait_s is not None:
                    break
            stopping = worker._stopped
            if stopping and group is None:
                return
            worker._transfer_results = worker._woken = False
            early_targets = worker._num_early_targets
            inbox, worker._inbox = worker._inbox, deque()
            # The next step with requests fails, or is slow, or the loop fails before it (not
            # a wake-up with nothing to do).
            faulty = (
                any(worker._faults[kind] > 0 for kind in _LOOP_FAULTS)
                # (armed only by tests: no scan otherwise)
                and (engine.has_work or any(kind == "add" for kind, _ in inbox))
            )
            fail_step = faulty and worker._take_fault("fail_step")
            slow_step = faulty and worker._take_fault("slow_step")
            fail_loop = faulty and worker._take_fault("fail_loop")
        if slow_step:
            time.sleep(SLOW_STEP_S)
        deltas = apply_inbox(inbox, engine, handoff, mode)
        if fail_loop:
            raise RuntimeError("injected fault fail_loop")
        events: list[TransferReady] = []
        if handoff is not None and handoff.role != "prefill":
            # Receives first: their targets go out while this step computes.
            engine.reserve_kv()
            early = handoff.post_receives(engine)
            unplaced = engine.take_unplaced()
            if early or unplaced:
                _publish(worker, unplaced, early, engine.stats())
        try:
            steps_before = engine.num_steps
            if fail_step:
                raise RuntimeError("injected fault fail_step")
            if group is None:
                deltas.extend(engine.step())
            else:
                swap_ready = worker.eplb.offer_swap()
                try:
                    # Pending: requests held but not runnable (their KV in transit).
                    runnable = engine.has_work and not engine.idle
                    pending = bool(engine.requests) and not runnable
                    agreed = group.agree(runnable, stopping, swap_ready, pending)
                    if agreed.all_swap_ready:
                        worker.eplb.execute_swap()
                finally:
                    worker.eplb.end_offer()
                if agreed.any_stopping:
                    return
                if agreed.any_has_work or agreed.any_pending:
                    last_busy = time.monotonic()  # work now or soon: keep polling fast
                if agreed.any_has_work:
                    deltas.extend(engine.step(run_empty=True))
        except Exception as e:
            if group is not None:
                if stopping:
                    return  # the pool is shutting down: a peer left first
                return _leave_broken_pool(worker, e)
            # A failed step must end every request, not hang them; the rank then starts
            # afresh (its state may be broken: a rank that refuses every request forever
            # would still draw the router's traffic).
            logger.error("engine step failed:\n%s", traceback.format_exc())
            message = f"engine step failed: {type(e).__name__}: {e}"
            return _exit_for_restart(worker, message, deltas, events)
        if handoff is not None:
            more, events = handoff.after_step(engine)
            deltas.extend(more)
        _publish(worker, deltas, events, engine.stats(), engine.num_steps != steps_before)


def _leave_broken_pool(worker: EngineWorker, error: Exception) -> None:
    """A collective failed (a rank of the pool died, or a step failed on some rank): end
    every request here with the error, let the router collect them, then exit so that Ray
    restarts this rank and the pool forms again (see `workers.ep.group.Rendezvous`)."""
    logger.error("expert-parallel pool step failed:\n%s", traceback.format_exc())
    _exit_for_restart(
        worker,
        f"the expert-parallel pool lost a rank ({type(error).__name__}: {error})",
        resumable=True,
    )


def _exit_for_restart(
    worker: EngineWorker,
    message: str,
    deltas: list[TokenDelta] | None = None,
    events: list[TransferReady] | None = None,
    resumable: bool = False,
) -> None:
    """End every request here with `message` (after the loop's unpublished `deltas` and
    `events`), let the router collect them, and exit the process; Ray restarts the rank
    (`max_restarts`), which loads the model afresh. `resumable`: the requests did not
    cause the failure (a peer's), so the router may resume them elsewhere."""
    worker._error = message
    try:
        ended = worker.engine.abort_all(message)
        for delta in ended:
            delta.resumable = resumable
        deltas = [*(deltas or []), *ended]
        _publish(worker, deltas, events or [], worker.engine.stats())
        time.sleep(2.0)  # the router's stream reader picks the errors up
    except Exception:  # its state too broken to say so: the router sees the process go
        logger.error("ending the requests failed:\n%s", traceback.format_exc())
    logger.error("engine rank exits to be restarted: %s", message)
    os._exit(1)


def _publish(
    worker: EngineWorker,
    deltas: list[TokenDelta],
    events: list[TransferReady],
    stats: RankStats,
    stepped: bool = False,
) -> None:
    """Hand the loop's output to the output stream (loop thread only); `stepped`: a model
    step ran."""
    deltas = worker._stream.take(deltas, stepped)
    with worker._lock:
        worker._stats = stats
        gone = worker._gone_routers  # front routers whose connection broke: nobody reads it
        for e in events:
            if (router := router_of(e.rid)) not in gone:
                worker._events.setdefault(router, []).append(e)
        for d in deltas:
            if (router := router_of(d.rid)) in gone:
                continue
            outbox = worker._outbox.setdefault(router, {})
            prev = outbox.get(d.rid)
            if prev is not None:
                d.prepend(prev)
            outbox[d.rid] = d
        if deltas or events:
            worker._lock.notify_all()
