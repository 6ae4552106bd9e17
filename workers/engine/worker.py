"""`EngineWorker`: one engine rank as a Ray actor.

The engine runs in its own loop thread (`workers.engine.rank_loop`); actor methods only hand
requests to it, so no call ever waits for a model step. Its output goes to the router over a
connection of their own (`workers.engine.delta_stream`), not through actor calls.

Actor contract:
- `ready() -> RankInfo`: once the model is loaded.
- `add_request(req)`: validates and queues; raises ValueError naming the field on bad input.
  `add_requests(reqs)`: the same for a batch, returning each request's refusal (or None).
- `abort(rid)`: idempotent; an unfinished request then ends with a delta of finish_reason ABORT.
- `stream_address() -> StreamAddress`: where the router connects to receive the rank's output:
  frames of `TokenDelta | TransferReady | AddsTaken`, each the new output of every request
  since the last frame (tokens of one request merged in order). A decode rank also reports
  `TransferReady` (where a request's KV must be written). One router at a time. The router
  sends its `add`, `abort`, `targets`, `migrate` and `wake` commands on the same connection
  (the calls below, without an actor call's cost); the actor calls remain for when it has
  none.
- `set_transfer_targets([(rid, target), ...])`: prefill rank (or a rank migrating a
  request); the receiving side's `TransferReady.target` of each request.
- `migrate([(rid, new_rid), ...])`: decode rank (or colocated, started with `migration`);
  hand these requests off to other ranks of its role with their KV (see
  `KVHandoff.migrate_out`).
- `stats() -> RankStats`; `load_by_router() -> {tag: RouterLoad}` (a deployment's routers
  count each other's requests); `shutdown()`.
- `inject_fault(kind, count)`: for fault tests; refused unless the rank was started with
  `allow_fault_injection` (see `workers.engine.handoff.FAULTS`).
- `expert_load()`, `expert_placement()`, `eplb_load/prepare/execute/abort`: expert rebalance,
  driven by the EPLB service (see `workers.engine.rank_eplb`).

Roles: "colocated" (prefill and decode), "prefill" (prompt and first token, then the KV and token
go to a decode rank; it reports only failures), "decode" (receives KV, generates). See
`workers.engine.handoff`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import Counter, deque
from concurrent.futures import Future
from typing import Any

import ray

from workers import gc_pauses
from workers.engine.config import EngineConfig
from workers.engine.delta_stream import DeltaStream, StreamAddress
from workers.engine.engine import Engine, resolve_device
from workers.engine.handoff import KVHandoff
from workers.engine.inbox import Message
from workers.engine.messages import (
    AddsTaken,
    GenerateRequest,
    StreamBuffer,
    TokenDelta,
    TransferReady,
    router_of,
)
from workers.engine.rank_eplb import RankEplb
from workers.engine.rank_loop import run_loop
from workers.engine.rank_operations import RankOperations
from workers.engine.rank_reports import (
    RankInfo,
    RankStats,
    RouterLoad,
    TransferTotals,
    loads_by_router,
)
from workers.engine.rank_setup import (
    PoolFormationError,
    join_pool,
    open_handoff,
    rank_info,
    setup_process,
)
from workers.ep.group import PoolGroup, PoolMember
from workers.model.hub import CheckpointSource, checkpoint_dir

logger = logging.getLogger(__name__)


_MODES = {"colocated": "full", "prefill": "prefill", "decode": "decode"}


class EngineWorker(RankOperations):
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
        checkpoint: CheckpointSource | None = None,
        migration: bool = False,
    ):
        """`migration`: a colocated rank opens a transfer engine, to hand requests off to
        another instance with their KV and to take them (see `KVHandoff.migrate_out`)."""
        if role not in _MODES:
            raise ValueError(f"role must be one of {sorted(_MODES)}, got {role!r}")
        setup_process(config)
        if checkpoint is not None:  # `model_dir` is where the router found it
            model_dir = str(checkpoint_dir(checkpoint, model_dir))
        # A pool of several ranks is one expert-parallel group; its ranks step in lockstep.
        self.group: PoolGroup | None = None
        ep = None
        if pool is not None and pool.world_size > 1:
            device = resolve_device(config.device)
            try:
                self.group, ep = join_pool(model_dir, config, role, pool, device, initial_phy2log)
            except PoolFormationError as e:
                # An actor whose constructor raises is not restarted: exit instead, and Ray
                # starts this rank again to meet its pool in the next round.
                logger.error("engine rank exits to be restarted: %s", e)
                os._exit(1)
        if role == "prefill":  # never runs a decode batch: no graphs to capture
            config = dataclasses.replace(config, cuda_graph_max_batch=0)
        self.engine = Engine(model_dir, config, ep=ep)
        # Expert rebalance phases, driven by the EPLB service (the loop executes the swap).
        self.eplb = RankEplb(self.engine, model_dir, self.wake)
        self._faults: Counter[str] = Counter()  # armed RANK_FAULTS (under _lock)
        self.role = role
        self.handoff: KVHandoff | None = None
        if role != "colocated" or migration:
            self.handoff = open_handoff(role, self.engine, transfer_backend, transfer_timeout_s)
            self.handoff.transfer.on_result = self._wake_for_transfer
        self.allow_fault_injection = allow_fault_injection
        migrates = role != "prefill" and self.handoff is not None
        self._info = rank_info(self.engine, role, instance, pool, migrates)
        self._lock = threading.Condition()
        self._inbox: deque[Message] = deque()  # see `workers.engine.inbox`
        # Output not sent yet, per router (its tag, "" for the primary): deltas merged per
        # request, and events; front routers whose connection broke get none.
        self._outbox: dict[str, dict[str, TokenDelta]] = {}
        self._stream = StreamBuffer(config.stream_interval)  # used by the loop thread only
        self._events: dict[str, list[TransferReady | AddsTaken]] = {}
        self._gone_routers: set[str] = set()
        self._stats = self.engine.stats()
        self._stopped = False
        self._delta_stream: DeltaStream | None = None  # started by the first `stream_address`
        self._transfer_results = False  # a transfer reported: the loop must collect it
        self._woken = False  # `wake` came: join the pool's next agreement without waiting
        # Targets that came for requests still to compute; the loop steps again when one came
        # since its last step began (that step's schedule may not have seen it).
        self._num_early_targets = 0
        self._error: str | None = None
        if config.preload_structured_output:
            # Before the rank reports ready: done in the background it overlapped the first
            # requests and took ~2 s of CPU from them.
            self.engine.grammars.preload()
        gc_pauses.freeze_startup_objects(f"{role} rank")
        gc_pauses.PROCESS.install()
        self._thread = threading.Thread(
            target=run_loop, args=(self, _MODES[role]), name="engine-loop", daemon=True
        )
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
        # Outside the lock: a constraint's grammar may take seconds to compile, and a long
        # prompt's ids are each checked; the loop (and the output, and the commands) must not
        # wait for that (found by an audit). Validation reads only immutable engine state; the
        # rid check races harmlessly with the loop (a duplicate is refused again at admission).
        taken = []
        for req in reqs:
            try:
                self.engine.validate(req)
            except ValueError as e:
                refusals.append(str(e))
                continue
            taken.append(("add", req))
            refusals.append(None)
        if taken:
            with self._lock:
                self._inbox.extend(taken)
                # A front router sending requests is back, if its stream is not yet: their
                # output waits for it rather than being dropped (found by an audit).
                for _, req in taken:
                    self._gone_routers.discard(router_of(req.rid))
                self._lock.notify_all()
        return refusals

    def abort(self, rid: str, sender_idle: bool = False) -> None:
        """`sender_idle` (a receiving rank): the router never gave the request's target to
        its sender, so its receive's pages are free without waiting for the sender."""
        with self._lock:
            self._inbox.append(("abort", (rid, sender_idle)))
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
        waiting = [self.handoff.set_target(rid, target) for rid, target in targets]
        if any(waiting):  # a request still to compute has a target: it may now take pages
            with self._lock:
                self._num_early_targets += 1
                self._lock.notify_all()

    def migrate(self, moves: list[tuple[str, str]]) -> None:
        """Hand each `(rid, new_rid)` decoding here off to another rank of this role with its
        KV, at the next step boundary (`KVHandoff.migrate_out`): its last delta says where
        the KV waits; one not decoding here then goes once it decodes again."""
        with self._lock:
            self._inbox.append(("migrate", list(moves)))
            self._lock.notify_all()

    def stream_address(self) -> StreamAddress:
        """Where the router connects for this rank's output (see `workers.engine.delta_stream`);
        the stream starts with the first call, later calls return the same address."""
        with self._lock:
            if self._delta_stream is None:
                host = self._info.node or "127.0.0.1"
                self._delta_stream = DeltaStream(
                    self._take_output, host, self._on_commands, self._on_router
                )
            return self._delta_stream.address

    def _on_commands(self, commands: list[Any], router: str = "") -> None:
        """A router's commands from the output stream (its reading thread), in order: each
        the actor call of the same name; an `add`'s answer goes out on the stream, to
        `router` (its tag)."""
        for command in commands:
            kind = command[0]
            if kind == "add":
                _, seq, reqs = command
                try:
                    answer = AddsTaken(seq, self.add_requests(reqs), router=router)
                except Exception as e:
                    answer = AddsTaken(seq, [], error=f"{type(e).__name__}: {e}", router=router)
                with self._lock:
                    self._events.setdefault(router, []).append(answer)
                    self._lock.notify_all()
                continue
            try:  # a command that fails is logged; the stream (and the rank) go on
                if kind == "abort":
                    self.abort(command[1], *command[2:3])
                elif kind == "targets":
                    self.set_transfer_targets(command[1])
                elif kind == "migrate":
                    self.migrate(command[1])
                elif kind == "wake":
                    self.wake()
            except Exception:
                logger.exception("the router's %s command failed", kind)

    def _on_router(self, router: str, connected: bool) -> None:
        """A router's output stream began or ended. A front router whose stream ended gave its
        requests here up (it treats a broken stream as a failed rank): they are aborted, and
        their output dropped, until it connects again."""
        if not router:
            return  # the primary: what it does not read waits for its next connection
        with self._lock:
            if connected:
                self._gone_routers.discard(router)
                return
            self._gone_routers.add(router)
            self._outbox.pop(router, None)
            self._events.pop(router, None)
        threading.Thread(
            target=self._abort_router, args=(router,), name="abort-router", daemon=True
        ).start()

    def _abort_router(self, router: str) -> None:
        try:
            num = self.abort_all(router)
        except Exception as e:  # the rank is stopping, or its loop failed: nothing to abort
            logger.debug("aborting the requests of router %s: %s", router, e)
            return
        if num:
            logger.warning("router %s went away: aborted its %d request(s) here", router, num)

    def _take_output(
        self, timeout_s: float, router: str = ""
    ) -> list[TokenDelta | TransferReady | AddsTaken]:
        """The output for `router` (its tag) since the last call, waiting up to `timeout_s`
        for some (that router's stream is its only caller)."""
        with self._lock:
            idle = not self._outbox.get(router) and not self._events.get(router)
            if idle and not self._stopped:
                self._lock.wait(timeout_s)
            out: list[TokenDelta | TransferReady | AddsTaken] = [
                *self._events.pop(router, ()),
                *self._outbox.pop(router, {}).values(),
            ]
        return out

    # Polled by every /metrics and /v1/stats call: without task events, Ray's GCS keeps no
    # record of each call (~10 KB a call, growing with the scrape rate).
    @ray.method(enable_task_events=False)
    def stats(self) -> RankStats:
        gc = gc_pauses.PROCESS
        transfers = self.handoff.totals if self.handoff is not None else TransferTotals()
        # Every router's requests (a deployment's autoscaler counts its front routers' too);
        # a copy of the table, taken at once under the GIL while the loop may change it.
        loads = loads_by_router(list(self.engine.requests.values())).values()
        return dataclasses.replace(
            self._stats,
            gc_seconds=gc.seconds,
            gc_longest_pause_s=gc.longest_s,
            transfers=transfers,
            num_pages_held=self.handoff.num_held_pages if self.handoff is not None else 0,
            num_reserved_tokens=sum(load.reserved_tokens for load in loads),
            num_unstarted_prompt_tokens=sum(load.unstarted_prompt_tokens for load in loads),
        )

    # Polled by a deployment's routers every `orchestrator.peer_load.PEER_LOAD_S`.
    @ray.method(enable_task_events=False)
    def load_by_router(self) -> dict[str, RouterLoad]:
        """What each router's requests hold here, by its tag ("" for the primary): a router
        adds the others' to its own accounting when it picks ranks."""
        transfers = self.handoff.in_flight() if self.handoff is not None else []
        return loads_by_router(list(self.engine.requests.values()), transfers)

    def abort_all(self, router: str = "") -> int:
        """Abort every request this rank holds for `router` (its tag; "": the primary — a new
        router took the deployment over, the old one's clients are gone); how many."""
        rids = self._call_in_loop(
            lambda: [rid for rid in self.engine.requests if router_of(rid) == router]
        )
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def flush_prefix_cache(self) -> int:
        """Forget this rank's prefix cache (between steps); the cached pages freed."""
        return int(self._call_in_loop(self.engine.flush_prefix_cache))

    def _call_in_loop(self, fn: Any, timeout_s: float = 60.0) -> Any:
        future: Future[Any] = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("the rank is shutting down")
            self._inbox.append(("call", (fn, future)))
            self._lock.notify_all()
        return future.result(timeout_s)

    def shutdown(self) -> None:
        if self._delta_stream is not None:
            self._delta_stream.close()
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=10)
        if self.handoff is not None:
            self.handoff.close()

    def _wake_for_transfer(self) -> None:
        with self._lock:
            self._transfer_results = True
            self._lock.notify_all()
