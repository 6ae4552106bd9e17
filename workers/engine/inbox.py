"""What a rank's actor threads hand its loop (`workers.engine.worker`): messages queued under the
worker's lock, applied by the loop between engine steps, in the order they came.

    ("add", GenerateRequest)       queue a request (refused: an error delta for it)
    ("abort", (rid, sender_idle))  end a request (its transfer first, when one is in flight)
    ("migrate", [(rid, new_rid)])  hand decoding requests off with their KV (decode, colocated)
    ("fault", (kind, count))       arm a fault on the KV hand-off (fault tests only)
    ("call", (fn, Future))         run `fn` on the loop thread, its result into the future
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from workers.engine.engine import Engine
from workers.engine.handoff import KVHandoff
from workers.engine.messages import TokenDelta

logger = logging.getLogger(__name__)

Message = tuple[str, Any]


def apply_inbox(
    messages: Iterable[Message], engine: Engine, handoff: KVHandoff | None, mode: str
) -> list[TokenDelta]:
    """Apply `messages` to the rank's engine and hand-off; `mode`: how the rank adds a request
    (`Engine.add`) unless the request is to be generated here whole. The deltas to report."""
    deltas: list[TokenDelta] = []
    for kind, payload in messages:
        if kind == "add":
            try:
                # A request moving here with its KV waits for it, whatever the rank's role.
                add_mode = "decode" if payload.migrated else mode
                engine.add(payload, "full" if payload.generate_here else add_mode)
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
        elif kind == "migrate":
            if handoff is None or handoff.role == "prefill":
                logger.error("migrate: this rank hands no request off (no transfer engine)")
                continue
            for rid, new_rid in payload:
                delta = handoff.migrate_out(engine, rid, new_rid)
                if delta is not None:
                    deltas.append(delta)
        elif kind == "abort":
            rid, sender_idle = payload
            delta = handoff.abort(engine, rid, sender_idle) if handoff else engine.abort(rid)
            if delta is not None:
                deltas.append(delta)
        else:
            raise ValueError(f"unknown inbox message {kind!r}")
    return deltas
