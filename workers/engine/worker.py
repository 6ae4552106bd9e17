"""`EngineWorker`: one engine rank as a Ray actor.

The engine runs in its own loop thread; actor methods only hand requests to it and collect its
output, so no call ever waits for a model step. Exactly one caller (the router) polls a rank.

Actor contract:
- `ready() -> RankInfo`: once the model is loaded.
- `add_request(req)`: validates and queues; raises ValueError naming the field on bad input.
- `abort(rid)`: idempotent; an unfinished request then ends with a delta of finish_reason ABORT.
- `poll(timeout_s) -> list[TokenDelta]`: new output of every request since the last poll (tokens
  of one request merged in order), waiting up to `timeout_s` when there is none.
- `stats() -> RankStats`; `shutdown()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import traceback
from collections import deque
from typing import Any

import ray
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import (
    FinishReason,
    GenerateRequest,
    RankInfo,
    RankStats,
    TokenDelta,
)

logger = logging.getLogger(__name__)


class EngineWorker:
    def __init__(self, model_dir: str, config: EngineConfig):
        threads = config.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.engine = Engine(model_dir, config)
        self._info = self.engine.info()
        self._lock = threading.Condition()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._outbox: dict[str, TokenDelta] = {}
        self._stats = self.engine.stats()
        self._stopped = False
        self._error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- actor methods ----------------------------------------------------------------------

    def ready(self) -> RankInfo:
        return self._info

    def add_request(self, req: GenerateRequest) -> None:
        if self._error is not None:
            raise RuntimeError(f"engine rank failed: {self._error}")
        with self._lock:
            # Validation reads only immutable engine state; the rid check races harmlessly with
            # the loop (a duplicate rid is refused again when the loop admits it).
            self.engine.validate(req)
            self._inbox.append(("add", req))
            self._lock.notify_all()

    def abort(self, rid: str) -> None:
        with self._lock:
            self._inbox.append(("abort", rid))
            self._lock.notify_all()

    def poll(self, timeout_s: float = 1.0) -> list[TokenDelta]:
        with self._lock:
            if not self._outbox and not self._stopped:
                self._lock.wait(timeout_s)
            out = list(self._outbox.values())
            self._outbox.clear()
        return out

    def stats(self) -> RankStats:
        return self._stats

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    # ---- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        # Ray starts workers at niceness 15; the loop thread is the rank's critical path, so it
        # takes normal priority back where the process may (root or CAP_SYS_NICE).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
        engine = self.engine
        while True:
            with self._lock:
                while not self._inbox and not engine.has_work and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
                inbox, self._inbox = self._inbox, deque()
            deltas: list[TokenDelta] = []
            for kind, payload in inbox:
                if kind == "add":
                    try:
                        engine.add(payload)
                    except ValueError as e:
                        deltas.append(_error_delta(payload.rid, str(e)))
                else:
                    delta = engine.abort(payload)
                    if delta is not None:
                        deltas.append(delta)
            try:
                deltas.extend(engine.step())
            except Exception as e:  # a failed step must end every request, not hang them
                logger.error("engine step failed:\n%s", traceback.format_exc())
                self._error = f"{type(e).__name__}: {e}"
                deltas.extend(engine.abort_all(f"engine step failed: {self._error}"))
            self._publish(deltas, engine.stats())

    def _publish(self, deltas: list[TokenDelta], stats: RankStats) -> None:
        with self._lock:
            self._stats = stats
            for d in deltas:
                prev = self._outbox.get(d.rid)
                if prev is not None:
                    d.token_ids = prev.token_ids + d.token_ids
                self._outbox[d.rid] = d
            if deltas:
                self._lock.notify_all()


def _error_delta(rid: str, message: str) -> TokenDelta:
    return TokenDelta(rid=rid, token_ids=[], finish_reason=FinishReason.ERROR, error=message)


def start_engine_rank(
    model_dir: str,
    config: EngineConfig,
    name: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> Any:
    """Start an `EngineWorker` actor; `ray.init` must have run. Returns its handle."""
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_concurrency": 16,  # poll blocks one thread; requests and aborts use the others
    }
    if name:
        options["name"] = name
    actor_cls = ray.remote(EngineWorker)
    return actor_cls.options(**options).remote(model_dir, config)
