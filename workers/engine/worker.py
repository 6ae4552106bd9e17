"""`EngineWorker`: one engine rank as a Ray actor.

The engine runs in its own loop thread; actor methods only hand requests to it and collect its
output, so no call ever waits for a model step. Exactly one caller (the router) polls a rank.

Actor contract:
- `ready() -> RankInfo`: once the model is loaded.
- `add_request(req)`: validates and queues; raises ValueError naming the field on bad input.
  `add_requests(reqs)`: the same for a batch, returning each request's refusal (or None).
- `abort(rid)`: idempotent; an unfinished request then ends with a delta of finish_reason ABORT.
- `poll(timeout_s) -> list[TokenDelta | TransferReady]`: new output of every request since the
  last poll (tokens of one request merged in order), waiting up to `timeout_s` when there is none.
  A decode rank also reports `TransferReady` (where a request's KV must be written).
- `set_transfer_targets([(rid, target), ...])`: prefill rank; the decode side's
  `TransferReady.target` of each request.
- `stats() -> RankStats`; `shutdown()`.
- `inject_fault(kind, count)`: for fault tests; refused unless the rank was started with
  `allow_fault_injection` (see `workers.engine.handoff.FAULTS`).

Roles: "colocated" (prefill and decode), "prefill" (prompt and first token, then the KV and token
go to a decode rank; it reports only failures), "decode" (receives KV, generates). See
`workers.engine.handoff`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from concurrent.futures import Future
from typing import Any

import ray
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine, resolve_device
from workers.engine.handoff import FAULTS, RANK_FAULTS, KVHandoff
from workers.engine.messages import (
    GenerateRequest,
    RankInfo,
    RankStats,
    StreamBuffer,
    TokenDelta,
    TransferReady,
)
from workers.ep.group import PoolGroup, PoolMember, free_port, init_pool_group
from workers.ep.placement import ExpertPlacement
from workers.ep.rebalance import PhaseReport, RankRebalancer
from workers.ep.setup import build_ep_context
from workers.model.config import ModelConfig

logger = logging.getLogger(__name__)


_MODES = {"colocated": "full", "prefill": "prefill", "decode": "decode"}
# How often an idle rank of an expert-parallel pool joins the pool's agreement: every 2 ms
# while the pool stepped within the last second, every 20 ms within the last 5 s, then every
# 250 ms (an idle pool then costs its ranks almost nothing). Work that reaches one rank of a
# sleeping pool is not held for that long: the router calls `wake` on the pool's other ranks
# with the first request after a quiet spell.
GROUP_POLL_BUSY_S = 0.002
GROUP_POLL_IDLE_S = 0.02
GROUP_POLL_ASLEEP_S = 0.25
GROUP_IDLE_AFTER_S = 1.0
GROUP_ASLEEP_AFTER_S = 5.0


def _join_pool(pool: PoolMember, device: torch.device) -> PoolGroup:
    host = ray.util.get_node_ip_address()
    address = (host, free_port()) if pool.rank == 0 else None
    master_addr, master_port = ray.get(pool.rendezvous.join.remote(pool.rank, address))
    return init_pool_group(pool.rank, pool.world_size, master_addr, master_port, device)


class EngineWorker:
    def __init__(
        self,
        model_dir: str,
        config: EngineConfig,
        role: str = "colocated",
        transfer_backend: str = "nixl",
        transfer_timeout_s: float = 30.0,
        allow_fault_injection: bool = False,
        instance: int = 0,
        pool: PoolMember | None = None,
        initial_phy2log: list[list[int]] | None = None,
    ):
        if role not in _MODES:
            raise ValueError(f"role must be one of {sorted(_MODES)}, got {role!r}")
        _normal_priority()
        threads = config.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        # A pool of several ranks is one expert-parallel group; its ranks step in lockstep.
        self.group: PoolGroup | None = None
        ep = None
        if pool is not None and pool.world_size > 1:
            self.group = _join_pool(pool, resolve_device(config.device))
            model_config = ModelConfig.from_dir(model_dir)
            placement = None
            if initial_phy2log is not None:
                phy2log = torch.tensor(initial_phy2log, dtype=torch.int64)
                placement = ExpertPlacement.from_phy2log(
                    phy2log, pool.world_size, model_config.n_routed_experts
                )
            ep = build_ep_context(
                model_config, config, role, pool.rank, pool.world_size,
                self.group.data, placement,
            )  # fmt: skip
        if role == "prefill":  # never runs a decode batch: no graphs to capture
            config = dataclasses.replace(config, cuda_graph_max_batch=0)
        self.engine = Engine(model_dir, config, ep=ep)
        self.rebalancer = RankRebalancer(self.engine.model, ep, model_dir) if ep else None
        # Rebalance phases (load / prepare / arm / abort) one at a time; the loop never takes
        # this one, so serving goes on while a rank reads experts from disk.
        self._phase_lock = threading.Lock()
        self._swap_lock = threading.Lock()  # `_swap` / `_offered`, held briefly (and by execute)
        self._swap: Future[Any] | None = None  # an armed execute, done by the loop
        self._offered: Future[Any] | None = None  # the armed execute offered in an agreement
        # Armed faults: eplb_* (under _phase_lock) and RANK_FAULTS (under _lock).
        self._faults: Counter[str] = Counter()
        self.role = role
        self.handoff: KVHandoff | None = None
        if role != "colocated":
            from workers.transfer import create_transfer_engine

            transfer = create_transfer_engine(
                transfer_backend,
                f"pdserve-{role}-{uuid.uuid4().hex[:8]}",
                self.engine.kv.data,
                self.engine.kv.page_size,
            )
            self.handoff = KVHandoff(role, transfer, transfer_timeout_s)
            transfer.on_result = self._wake_for_transfer
        self.allow_fault_injection = allow_fault_injection
        self._info = dataclasses.replace(
            self.engine.info(),
            role=role,
            node=ray.util.get_node_ip_address(),
            node_id=ray.get_runtime_context().get_node_id(),
            instance=instance,
            pool_rank=pool.rank if pool is not None else 0,
            pool_size=pool.world_size if pool is not None else 1,
            pid=os.getpid(),
        )
        self._lock = threading.Condition()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._outbox: dict[str, TokenDelta] = {}
        self._stream = StreamBuffer(config.stream_interval)  # used by the loop thread only
        self._events: list[TransferReady] = []
        self._stats = self.engine.stats()
        self._stopped = False
        self._transfer_results = False  # a transfer reported: the loop must collect it
        self._woken = False  # `wake` came: join the pool's next agreement without waiting
        self._error: str | None = None
        if config.preload_structured_output:
            # Before the rank reports ready: done in the background it overlapped the first
            # requests and took ~2 s of CPU from them.
            self.engine.grammars.preload()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- actor methods ----------------------------------------------------------------------

    def ready(self) -> RankInfo:
        return self._info

    def add_request(self, req: GenerateRequest) -> None:
        refusal = self.add_requests([req])[0]
        if refusal is not None:
            raise ValueError(refusal)

    def add_requests(self, reqs: list[GenerateRequest]) -> list[str | None]:
        """Validate and queue each request; per request, None (queued) or why it is refused
        (a message naming the field). Raises when the rank cannot take any (it failed)."""
        if self._error is not None:
            raise RuntimeError(f"engine rank failed: {self._error}")
        refusals: list[str | None] = []
        with self._lock:
            if self._take_fault("fail_add"):
                raise RuntimeError("injected fault fail_add: the rank could not take the request")
            for req in reqs:
                # Validation reads only immutable engine state; the rid check races harmlessly
                # with the loop (a duplicate rid is refused again when the loop admits it).
                try:
                    self.engine.validate(req)
                except ValueError as e:
                    refusals.append(str(e))
                    continue
                self._inbox.append(("add", req))
                refusals.append(None)
            self._lock.notify_all()
        return refusals

    def abort(self, rid: str) -> None:
        with self._lock:
            self._inbox.append(("abort", rid))
            self._lock.notify_all()

    def wake(self) -> None:
        """Join the pool's next agreement at once (another rank of the pool has work): a rank
        of a pool that has been idle a while otherwise joins only every `GROUP_POLL_ASLEEP_S`."""
        with self._lock:
            self._woken = True  # a flag, not only a notify: the loop may not be waiting yet
            self._lock.notify_all()

    def set_transfer_targets(self, targets: list[tuple[str, Any]]) -> None:
        """Prefill rank: where the KV of each `(rid, target)` goes (from the decode rank's
        `TransferReady`). Takes effect at once: a finished prefill's transfer starts without
        waiting for the step in progress."""
        if self.handoff is None:
            raise RuntimeError("set_transfer_targets: this rank is not disaggregated")
        for rid, target in targets:
            self.handoff.set_target(rid, target)

    def poll(self, timeout_s: float = 1.0) -> list[TokenDelta | TransferReady]:
        with self._lock:
            if not self._outbox and not self._events and not self._stopped:
                self._lock.wait(timeout_s)
            out: list[TokenDelta | TransferReady] = [*self._events, *self._outbox.values()]
            self._outbox.clear()
            self._events = []
        return out

    def stats(self) -> RankStats:
        return self._stats

    def flush_prefix_cache(self) -> int:
        """Forget this rank's prefix cache (between steps); the cached pages freed."""
        return int(self._call_in_loop(self.engine.flush_prefix_cache))

    def inject_fault(self, kind: str, count: int = 1) -> None:
        if not self.allow_fault_injection:
            raise RuntimeError("fault injection is off on this rank (allow_fault_injection)")
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {sorted(FAULTS)}")
        if kind.startswith("eplb_"):
            with self._phase_lock:
                self._faults[kind] += count
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

    def expert_load(self) -> Any:
        """Tokens routed per (layer, logical expert) since the last call: `[layers, experts]`
        int64 (CPU), or None for a dense model. Taken by the loop between steps."""
        return self._call_in_loop(self.engine.take_expert_load)

    # ---- expert rebalance (driven by the EPLB service; see workers.ep.rebalance) ----------------

    def expert_placement(self) -> Any:
        """The pool's current `phy2log: [layers, slots]` (None outside an EP pool)."""
        return None if self.engine.ep is None else self.engine.ep.placement.phy2log.clone()

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

    def eplb_load(self, phy2log: Any) -> PhaseReport:
        with self._phase_lock:
            self._fault("load")
            return self._rebalancer().load(phy2log)

    def eplb_prepare(self) -> PhaseReport:
        with self._phase_lock:
            self._fault("prepare")
            return self._rebalancer().prepare()

    def eplb_execute(self, timeout_s: float = 60.0) -> PhaseReport:
        """Arm the prepared rebalance; the loop executes it at the first step boundary where
        every rank of the pool has armed it. On timeout it is disarmed (nothing changed)."""
        with self._phase_lock:
            self._fault("execute")
            if self._rebalancer().stage != "prepared":
                raise RuntimeError("nothing prepared to execute")
            future: Future[Any] = Future()
            with self._swap_lock:
                self._swap = future
        self.wake()  # offer it at the pool's next agreement, however idle the pool is
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

    def eplb_abort(self) -> None:
        """Drop whatever is loaded, staged or armed; the placement stays as it is (unless the
        pool already executed it)."""
        self._disarm(self._swap)
        with self._phase_lock:
            if self.rebalancer is not None:
                self.rebalancer.abort()

    def _offer_swap(self) -> bool:
        with self._swap_lock:
            swap = self._swap
            self._offered = swap if swap is not None and not swap.done() else None
            return self._offered is not None

    def _execute_swap(self) -> None:
        """In the loop, when every rank offered its armed rebalance: execute it (the pause)."""
        with self._swap_lock:
            future = self._offered
            assert future is not None, "all ranks agreed on a swap this rank did not offer"
            self._swap = None
            try:
                future.set_result(self._rebalancer().execute())
            except Exception as e:
                future.set_exception(e)
                raise

    def _end_offer(self) -> None:
        with self._swap_lock:
            self._offered = None

    def _call_in_loop(self, fn: Any, timeout_s: float = 60.0) -> Any:
        future: Future[Any] = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("the rank is shutting down")
            self._inbox.append(("call", (fn, future)))
            self._lock.notify_all()
        return future.result(timeout_s)

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=10)
        if self.handoff is not None:
            self.handoff.close()

    # ---- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        engine, handoff, mode, group = self.engine, self.handoff, _MODES[self.role], self.group
        last_busy = 0.0
        while True:
            with self._lock:
                while not self._inbox and not self._stopped and not self._transfer_results:
                    if (engine.has_work and not engine.idle) or self._woken:
                        break
                    wait_s = handoff.wait_s(time.monotonic()) if handoff is not None else None
                    if group is not None:
                        # The pool's other ranks may step: join the next agreement soon.
                        idle_s = _group_poll_s(time.monotonic() - last_busy)
                        wait_s = idle_s if wait_s is None else min(wait_s, idle_s)
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._lock.wait(wait_s)
                    if wait_s is not None:
                        break
                stopping = self._stopped
                if stopping and group is None:
                    return
                self._transfer_results = self._woken = False
                inbox, self._inbox = self._inbox, deque()
                fail_step = self._take_fault("fail_step")
            deltas: list[TokenDelta] = []
            events: list[TransferReady] = []
            for kind, payload in inbox:
                if kind == "add":
                    try:
                        engine.add(payload, "full" if payload.generate_here else mode)
                    except ValueError as e:
                        deltas.append(TokenDelta.failure(payload.rid, str(e)))
                elif kind == "fault":
                    assert handoff is not None
                    try:
                        handoff.inject_fault(*payload)
                    except ValueError as e:
                        logger.error("fault injection refused: %s", e)
                elif kind == "call":
                    fn, future = payload
                    try:
                        future.set_result(fn())
                    except Exception as e:
                        future.set_exception(e)
                else:
                    delta = handoff.abort(engine, payload) if handoff else engine.abort(payload)
                    if delta is not None:
                        deltas.append(delta)
            if handoff is not None and handoff.role == "decode":
                # Receives first: their targets go out while this step computes.
                engine.reserve_kv()
                early = handoff.post_receives(engine)
                if early:
                    self._publish([], early, engine.stats())
            try:
                steps_before = engine.num_steps
                if fail_step:
                    raise RuntimeError("injected fault fail_step")
                if group is None:
                    deltas.extend(engine.step())
                else:
                    swap_ready = self._offer_swap()
                    try:
                        # Pending: requests held but not runnable (their KV in transit).
                        runnable = engine.has_work and not engine.idle
                        pending = bool(engine.requests) and not runnable
                        agreed = group.agree(runnable, stopping, swap_ready, pending)
                        if agreed.all_swap_ready:
                            self._execute_swap()
                    finally:
                        self._end_offer()
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
                    return self._leave_broken_pool(e)
                # A failed step must end every request, not hang them; the rank then starts
                # afresh (its state may be broken: a rank that refuses every request forever
                # would still draw the router's traffic).
                logger.error("engine step failed:\n%s", traceback.format_exc())
                message = f"engine step failed: {type(e).__name__}: {e}"
                return self._exit_for_restart(message, deltas, events)
            if handoff is not None:
                more, events = handoff.after_step(engine)
                deltas.extend(more)
            self._publish(deltas, events, engine.stats(), engine.num_steps != steps_before)

    def _leave_broken_pool(self, error: Exception) -> None:
        """A collective failed (a rank of the pool died, or a step failed on some rank): end
        every request here with the error, let the router collect them, then exit so that Ray
        restarts this rank and the pool forms again (see `workers.ep.group.Rendezvous`)."""
        logger.error("expert-parallel pool step failed:\n%s", traceback.format_exc())
        self._exit_for_restart(
            f"the expert-parallel pool lost a rank ({type(error).__name__}: {error})"
        )

    def _exit_for_restart(
        self,
        message: str,
        deltas: list[TokenDelta] | None = None,
        events: list[TransferReady] | None = None,
    ) -> None:
        """End every request here with `message` (after the loop's unpublished `deltas` and
        `events`), let the router collect them, and exit the process; Ray restarts the rank
        (`max_restarts`), which loads the model afresh."""
        self._error = message
        deltas = [*(deltas or []), *self.engine.abort_all(message)]
        self._publish(deltas, events or [], self.engine.stats())
        time.sleep(2.0)  # the router's poll picks the errors up
        logger.error("engine rank exits to be restarted: %s", message)
        os._exit(1)

    def _wake_for_transfer(self) -> None:
        with self._lock:
            self._transfer_results = True
            self._lock.notify_all()

    def _publish(
        self,
        deltas: list[TokenDelta],
        events: list[TransferReady],
        stats: RankStats,
        stepped: bool = False,
    ) -> None:
        """Hand the loop's output to `poll` (loop thread only); `stepped`: a model step ran."""
        deltas = self._stream.take(deltas, stepped)
        with self._lock:
            self._stats = stats
            self._events.extend(events)
            for d in deltas:
                prev = self._outbox.get(d.rid)
                if prev is not None:
                    d.prepend(prev)
                self._outbox[d.rid] = d
            if deltas or events:
                self._lock.notify_all()


def _group_poll_s(idle_s: float) -> float:
    """How long an idle pool rank waits before joining the next agreement, after `idle_s`
    seconds since the pool last stepped."""
    if idle_s < GROUP_IDLE_AFTER_S:
        return GROUP_POLL_BUSY_S
    return GROUP_POLL_IDLE_S if idle_s < GROUP_ASLEEP_AFTER_S else GROUP_POLL_ASLEEP_S


def _normal_priority() -> None:
    """Ray starts workers at niceness 15, below the router and the rest of the machine; a rank
    is on every request's critical path — its loop, the threads that take the router's calls
    and the KV transfer thread alike (a starved transfer thread alone added ~100 ms to time to
    first token under load) — so all its threads take normal priority back, where the process
    may (root or CAP_SYS_NICE). Niceness is per thread on Linux; threads started later inherit
    it from their creator."""
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(task), 0)


def start_engine_rank(
    model_dir: str,
    config: EngineConfig,
    name: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    role: str = "colocated",
    transfer_backend: str = "nixl",
    transfer_timeout_s: float = 30.0,
    allow_fault_injection: bool = False,
    instance: int = 0,
    scheduling_strategy: Any = None,
    pool: PoolMember | None = None,
    initial_phy2log: list[list[int]] | None = None,
) -> Any:
    """Start an `EngineWorker` actor of `role`; `ray.init` must have run. Returns its handle.
    `scheduling_strategy`: e.g. its pool's placement group bundle."""
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_concurrency": 16,  # poll blocks one thread; requests and aborts use the others
        # A rank that dies is started again by Ray (same handle); the router fails its
        # in-flight requests at once and sends new ones once the new rank is ready.
        "max_restarts": -1,
    }
    if name:
        options["name"] = name
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    actor_cls = ray.remote(EngineWorker)
    return actor_cls.options(**options).remote(
        model_dir,
        config,
        role,
        transfer_backend,
        transfer_timeout_s,
        allow_fault_injection,
        instance,
        pool,
        initial_phy2log,
    )
