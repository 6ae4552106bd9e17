"""`KVHandoff`: a disaggregated rank's side of moving KV between the prefill and decode pools.

Runs inside the rank's loop thread, between engine steps (`set_target` also from the threads
that take the router's calls); the transfers themselves run on the transfer engine's own thread,
so nothing here blocks.

Prefill rank: a request whose prefill is done (`Engine.take_handoffs`) is sent — its pages, all
layers, plus the first sampled token — to the decode rank's pages named by its `TransferTarget`,
which the router forwards (`set_target`; it may arrive before or after the prefill finishes, and
takes effect at once, not after the step in progress). When the target is here before the step
that finishes the prompt, that step writes each layer's KV of the request's pages as soon as
the layer is done (`layer_writer`, `KVTransferEngine.write_ahead`): the send after the step
then has only the notification (and any layer computed after the step) left to write. Its
pages are freed when the transfer reports, success or not. A request still without a target
may have its transfer withdrawn and its pages taken back for a request whose target came
(`withdraw`, called by the scheduler; see `workers.engine.scheduler`): it is parked until its
own target comes, and fails as its transfer would have if that is not within the transfer
timeout of its hand-off.

Decode rank: a request that got pages (`Engine.take_reserved`) posts a receive
(`post_receives`, before each step as well as after it, so that the target reaches the prefill
side without waiting for a decode step); its target goes to the router as a `TransferReady`
event. When the KV and first token arrive the request joins the batch; when the transfer fails
it ends with an error.

Decode (or colocated) rank, migration (`migrate_out`: its instance scaled down, or another
joined): a request decoding here is sent to another rank of its role as a prefill rank sends
one — its pages (the KV of its tokens but the last) under the id of its next attempt, to the
target the router forwards — and the receiving rank admits it without a new token
(`GenerateRequest.migrated`); one with no free pages for it refuses it at once.

Pages written by a peer are never reused while that peer may still write them: an aborted or
failed receive ends its request at once but keeps its pages (`Engine.detach`) until the
transfer engine releases them — the sender said it stopped, or the router said the sender
never had the target (`abort(..., sender_idle=True)`), or the sender has been silent too
long to be still writing — and then for `quarantine_s` more (bytes still on the wire) before
they are freed. A prefill rank therefore tells the receiver (`give_up`) whenever it drops a
request that holds a target without sending it: aborted, its target stale, the rank closing.

`faults` lets fault tests make a decode rank misbehave on purpose (see `FAULTS`); serving never
arms it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from workers.engine.engine import Engine
from workers.engine.kv_cache import pages_needed
from workers.engine.messages import FinishReason, TokenDelta, TokenLogprob, TransferReady
from workers.engine.rank_reports import TransferTotals
from workers.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

FAULTS = {
    # Decode rank: reserve the request's pages but never post its receive, so that the prefill
    # side's transfer times out. The request waits until it is aborted.
    "withhold_receive",
    # Expert rebalance: the rank fails that phase (`workers.engine.rank_eplb`).
    "eplb_load",
    "eplb_prepare",
    "eplb_execute",
    "eplb_stall_load",  # the load phase takes 3 s longer (to test a concurrent rebalance)
}
# Faults armed on the rank itself (`workers.engine.worker`), any role: its next `add_request`
# fails (an internal error, not a refusal of the request); its next engine step fails (the rank
# ends its requests with the error and exits, and Ray restarts it); each of its next `count`
# steps with requests takes `SLOW_STEP_S` longer (a model slower than the tiny one, for tests
# that race a watch against the decode).
RANK_FAULTS = {"fail_add", "fail_step", "fail_loop", "slow_step"}
SLOW_STEP_S = 0.01
FAULTS |= RANK_FAULTS


class KVHandoff:
    def __init__(self, role: str, transfer: Any, timeout_s: float, quarantine_s: float = 2.0):
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill, decode or colocated, got {role!r}")
        self.role = role
        self.transfer = transfer  # a workers.transfer KVTransferEngine
        self.timeout_s = timeout_s
        self.quarantine_s = quarantine_s
        # Prefill: targets that came before the hand-off, with when they came; `_lock` orders
        # `set_target` (any thread) against the loop's sends.
        # Each with the time this rank last told its receiver the KV is still to come (the
        # target's arrival, then each keep-alive).
        self._targets: dict[str, tuple[Any, float, float]] = {}
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # transfers started and not yet reported
        self._aborted: set[str] = set()  # in flight, aborted: report ABORT, not an error
        # Decode: failed receives' pages until the transfer engine releases them (rid ->
        # pages), then until the quarantine ends: (free after, rid, pages).
        self._held: dict[str, list[int]] = {}
        self._quarantine: list[tuple[float, str, list[int]]] = []
        self._num_held_pages = 0
        self._withheld: set[str] = set()  # decode: receives withheld by an injected fault
        self._failed: list[TokenDelta] = []  # decode: receives that could not be posted
        # Requests asked to migrate while not decoding (rid -> new rid): they go once they
        # decode again.
        self._to_migrate: dict[str, str] = {}
        # Prefill: requests parked (withdrawn), each with when it fails unless a target came.
        self._parked: dict[str, float] = {}
        # Prefill: when the receivers of requests still to compute are next told to wait on.
        self._next_keep_alive = 0.0
        self._ahead: set[str] = set()  # prefill: written ahead by the last step (`layer_writer`)
        self.faults: Counter[str] = Counter()  # armed fault -> how many requests it hits
        self.totals = TransferTotals()  # replaced (not changed) by the loop: any thread reads it

    def bind(self, engine: Engine) -> None:
        """Let `engine`'s scheduler see which requests have targets and take back the pages
        of those that do not (prefill rank)."""
        if self.role == "prefill":
            engine.scheduler.targeted = self._targets
            engine.scheduler.withdraw = self.withdraw
            if engine.config.kv_write_ahead and hasattr(self.transfer, "write_ahead"):
                engine.layer_writes = self.layer_writer

    def layer_writer(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """Prefill rank, loop thread, before a step: what the model calls after each layer
        (`Engine.layer_writes`) to write that layer's KV of the prompts the step finishes and
        whose targets are here; None when there are none. On CUDA each layer's writes wait
        for an event recorded after the layer."""
        now = time.monotonic()
        with self._lock:
            writes = [
                (seq.rid, list(seq.pages), self._targets[seq.rid][0])
                for seq, num in batch.prefills
                if seq.prefill_only and num == seq.num_pending and seq.rid in self._targets
                # (one whose receiver may be about to give up: its send decides)
                and now - self._targets[seq.rid][2] < self.timeout_s / 2
            ]  # fmt: skip
        if not writes:
            return None
        self._ahead.update(rid for rid, _, _ in writes)
        on_cuda = self.transfer.kv.is_cuda

        def after_layer(layer: int) -> None:
            ready = None
            if on_cuda:
                ready = torch.cuda.Event()
                ready.record()
            for rid, pages, target in writes:
                try:
                    self.transfer.write_ahead(rid, pages, layer, target, ready)
                except (ValueError, RuntimeError) as e:  # best effort: the send writes all
                    logger.debug("request %s: layer %d not written ahead: %s", rid, layer, e)

        return after_layer

    def withdraw(self, rid: str) -> bool:
        """Prefill rank, loop thread: take back the transfer of handed-off `rid` if it has no
        target yet (then the caller parks it and may reuse its pages at once)."""
        with self._lock:
            if rid not in self._in_flight:
                return False
            sender = self.transfer.withdraw(rid)
            if sender is None:
                return False
            self._in_flight.discard(rid)
            self._parked[rid] = sender.deadline
            return True

    def inject_fault(self, kind: str, count: int = 1) -> None:
        """Make the next `count` requests hit fault `kind` (one of `FAULTS`); for tests."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {sorted(FAULTS)}")
        if kind.startswith("eplb_") or kind in RANK_FAULTS:
            raise ValueError(f"fault {kind!r} is armed on the rank, not its KV hand-off")
        if kind == "withhold_receive" and self.role == "prefill":
            raise ValueError(f"fault {kind!r} applies to a receiving rank, not a prefill rank")
        self.faults[kind] += count

    def _take_fault(self, kind: str) -> bool:
        if self.faults[kind] <= 0:
            return False
        self.faults[kind] -= 1
        return True

    def in_flight(self) -> list[str]:
        """The ids of the transfers in flight (sending or receiving)."""
        with self._lock:
            return list(self._in_flight)

    @property
    def busy(self) -> bool:
        """Whether transfers are in flight or pages held or in quarantine."""
        return bool(self._in_flight or self._held or self._quarantine)

    @property
    def num_held_pages(self) -> int:
        """Pages of failed receives not free yet (their senders may still write them); kept
        by the loop, read from any thread."""
        return self._num_held_pages

    def _count_held(self) -> None:
        held = sum(len(pages) for pages in self._held.values())
        self._num_held_pages = held + sum(len(pages) for _, _, pages in self._quarantine)

    def wait_s(self, now: float) -> float | None:
        """How long the loop may sleep before `after_step` has work without being woken: until
        the first quarantine ends, the next keep-alive is due or a parked request's transfer
        deadline passes (None: until woken). Transfer results wake the loop through the
        transfer engine's `on_result`."""
        due = [self._quarantine[0][0]] if self._quarantine else []
        if self._targets:
            due.append(self._next_keep_alive)
        if self._parked:  # (it fails then, even on a rank with nothing else to do)
            due.append(min(self._parked.values()))
        return max(0.0, min(due) - now) if due else None

    def set_target(self, rid: str, target: Any) -> bool:
        """Prefill rank, any thread: where the KV of `rid` goes. Whether `rid` is still to
        be computed (or parked): then the target waits for its hand-off."""
        with self._lock:
            if rid in self._in_flight:
                self.transfer.set_target(rid, target)
                return False
            now = time.monotonic()
            self._targets[rid] = (target, now, now)
            return True

    def abort(self, engine: Engine, rid: str, sender_idle: bool = False) -> TokenDelta | None:
        """Abort `rid`; a request with a transfer in flight ends when the transfer reports.
        `sender_idle` (a receiving rank): the router never gave this request's target to its
        sender, so the pages of its receive may be freed without waiting for the sender."""
        with self._lock:
            early = self._targets.pop(rid, None)
        if early is not None:  # its receiver waits for KV that will not come: tell it
            self.transfer.give_up(rid, early[0], "aborted on the sending rank")
        self._withheld.discard(rid)
        self._parked.pop(rid, None)
        self._to_migrate.pop(rid, None)
        if rid in self._held:  # ended; its pages wait for the transfer engine's release
            if sender_idle:
                self.transfer.abort(rid, "aborted", sender_idle=True)
            return None
        if rid in self._in_flight:
            self._aborted.add(rid)
            self.transfer.abort(rid, "aborted", sender_idle=sender_idle)
            return None
        return engine.abort(rid)

    def migrate_out(self, engine: Engine, rid: str, new_rid: str) -> TokenDelta | None:
        """Decode (or colocated) rank: send request `rid`, decoding here, to another rank with
        its KV
        (`Engine.migrate_out`): its transfer, under `new_rid`, waits for the target the router
        forwards from that rank, as a prefill rank's does. The last delta of `rid` (it tells
        the router where its KV waits); None when it is not decoding here now: one held here
        (queued, preempted, its KV still arriving) goes once it decodes (`after_step`)."""
        if self.role == "prefill":
            raise ValueError("a prefill rank hands requests off after their prefill only")
        moved = engine.migrate_out(rid, new_rid)
        if moved is None:
            if rid in engine.requests:
                self._to_migrate[rid] = new_rid
            return None
        self._to_migrate.pop(rid, None)
        seq, delta = moved
        pages = seq.pages[: pages_needed(seq.num_computed, engine.kv.page_size)]
        with self._lock:
            self._in_flight.add(new_rid)
            early = self._targets.pop(new_rid, None)
            self.transfer.send(
                new_rid, pages, seq.token_ids[-1], self.timeout_s,
                target=early[0] if early is not None else None,
                num_cached_tokens=seq.num_cached_tokens, guesses=tuple(seq.mtp_draft),
            )  # fmt: skip
        return delta

    def after_step(self, engine: Engine) -> tuple[list[TokenDelta], list[TransferReady]]:
        deltas: list[TokenDelta] = []
        events: list[TransferReady] = []
        for seq in engine.take_handoffs():
            self._ahead.discard(seq.rid)
            self._parked.pop(seq.rid, None)  # (computed again: its new send has its deadline)
            with self._lock:
                early = self._targets.pop(seq.rid, None)
                if early is not None and time.monotonic() - early[2] > self.timeout_s:
                    # Not told to wait on for longer than its timeout (this rank's loop
                    # stalled): its receiver may have given its pages up; write nothing.
                    deltas.append(self._expired(engine, seq.rid, early[0]))
                    continue
                self._in_flight.add(seq.rid)
                self.transfer.send(
                    seq.rid, seq.pages, seq.token_ids[-1], self.timeout_s,
                    target=early[0] if early is not None else None,
                    first_logprob=seq.first_logprob, num_cached_tokens=seq.num_cached_tokens,
                    guesses=tuple(seq.mtp_draft),
                )  # fmt: skip
        for rid in self._ahead:  # written ahead, yet not handed off: ended otherwise
            self.transfer.drop_ahead(rid)
        self._ahead.clear()
        events.extend(self.post_receives(engine))
        deltas.extend(engine.take_unplaced())
        deltas.extend(self._failed)
        self._failed.clear()
        for rid, new_rid in list(self._to_migrate.items()):
            if rid not in engine.requests:  # ended meanwhile
                del self._to_migrate[rid]
            elif (delta := self.migrate_out(engine, rid, new_rid)) is not None:
                deltas.append(delta)
        released = self.transfer.poll_released()  # (first: each after its result)
        for result in self.transfer.poll():
            rid = result.transfer_id
            with self._lock:
                self._in_flight.discard(rid)
            aborted = rid in self._aborted
            self._aborted.discard(rid)
            # An abort (this side's, or the peer's that failed it) is no transfer failure.
            if not (aborted or "aborted:" in (result.error or "")):
                self.totals = self.totals.add(
                    result.role, result.ok, result.num_bytes, result.elapsed_s,
                    ahead=result.layers_ahead > 0,
                )  # fmt: skip
            if result.role == "send":  # a prefill rank's, or a decode rank's migration
                engine.release(rid)
                if not result.ok and not aborted:
                    deltas.append(
                        TokenDelta.failure(
                            rid, f"KV transfer to the decode rank failed: {result.error}"
                        )
                    )
            elif result.ok and aborted:  # its KV came: nothing writes its pages any more
                delta = engine.abort(rid)
                if delta is not None:
                    deltas.append(delta)
            elif result.ok:
                first_logprob = result.first_logprob
                delta = engine.admit_received(
                    rid, result.first_token,
                    None if first_logprob is None else TokenLogprob(*first_logprob),
                    result.num_cached_tokens, list(result.guesses),
                )  # fmt: skip
                if delta is not None:
                    deltas.append(delta)
            else:
                moving = engine.requests.get(rid)
                if moving is None:
                    continue  # (ended otherwise: its pages were freed then)
                # It ends now; the pages the sender writes wait until it cannot any more (those
                # its prefix cache had, and those for its output, are free at once).
                reused = moving.num_reused_pages
                sent = pages_needed(moving.num_sent_tokens, engine.kv.page_size)
                pages = engine.detach(rid)
                engine.free_pages(pages[:reused] + pages[sent:])
                self._held[rid] = pages[reused:sent]
                if aborted:
                    deltas.append(TokenDelta(rid, [], FinishReason.ABORT))
                else:
                    sender = "rank it moved from" if moving.migrated else "prefill rank"
                    error = f"KV transfer from the {sender} failed: {result.error}"
                    deltas.append(TokenDelta.failure(rid, error))
        now = time.monotonic()
        for rid in released:
            held = self._held.pop(rid, None)
            if held is not None:
                self._quarantine.append((now + self.quarantine_s, rid, held))
        if self._parked:
            deltas.extend(self._expire_parked(engine, now))
        if self._targets and now >= self._next_keep_alive:
            self._keep_receivers_waiting(engine, now)
        while self._quarantine and self._quarantine[0][0] <= now:
            engine.free_pages(self._quarantine.pop(0)[2])
        self._count_held()
        with self._lock:  # a target for a request that ended (or never came) here
            stale = [
                (rid, target) for rid, (target, t, _) in self._targets.items()
                if now - t > 2 * self.timeout_s and rid not in engine.requests
            ]  # fmt: skip
            for rid, _ in stale:
                del self._targets[rid]
        for rid, target in stale:
            self.transfer.give_up(rid, target, "no such request on the sending rank")
        return deltas, events

    def _keep_receivers_waiting(self, engine: Engine, now: float) -> None:
        """Prefill rank: tell the decode ranks waiting for requests still queued or computing
        here (for a third of the timeout or longer) that their KV is still to come, so that
        a receive times out only when this rank is gone or cut off, not while its prompt
        waits its turn behind others."""
        self._next_keep_alive = now + self.timeout_s / 6
        with self._lock:
            waiting = [
                (rid, target, since) for rid, (target, since, _) in self._targets.items()
                if now - since >= self.timeout_s / 3 and rid in engine.requests
            ]  # fmt: skip
            for rid, target, since in waiting:
                self._targets[rid] = (target, since, now)
        if waiting:
            self.transfer.keep_alive([target for _, target, _ in waiting])

    def _expired(self, engine: Engine, rid: str, target: Any) -> TokenDelta:
        """Prefill rank: handed-off `rid`'s receiver was not told to wait on for longer than
        the transfer timeout: fail it without writing (its receiver is told, in case it
        still waits)."""
        engine.release(rid)
        self.transfer.give_up(rid, target, "its prompt took too long on the sending rank")
        logger.warning("request %s: no word to its decode rank for over %g s (this rank's loop "
                       "stalled?); not sending its KV", rid, self.timeout_s)  # fmt: skip
        return TokenDelta.failure(
            rid,
            "KV transfer to the decode rank failed: the prefill rank did not tell it to wait "
            f"for over {self.timeout_s:g} s (--transfer-timeout)",
        )

    def _expire_parked(self, engine: Engine, now: float) -> list[TokenDelta]:
        """Parked requests: those whose target came compute again (the scheduler admits
        them); those past their transfer's deadline without one fail as that transfer would."""
        deltas = []
        for rid, deadline in list(self._parked.items()):
            if rid in self._targets or rid in self._in_flight or rid not in engine.requests:
                del self._parked[rid]
            elif now > deadline:
                del self._parked[rid]
                delta = engine.fail(
                    rid,
                    "KV transfer to the decode rank failed: "
                    "timed out waiting for the receiving rank's pages",
                )
                if delta is not None:
                    deltas.append(delta)
        return deltas

    def post_receives(self, engine: Engine) -> list[TransferReady]:
        """Decode rank: post a receive for every request that got pages; their targets, for
        the router to forward to the prefill side."""
        events = []
        for seq in engine.take_reserved():
            if self._take_fault("withhold_receive"):
                self._withheld.add(seq.rid)
                continue
            self._in_flight.add(seq.rid)
            reused = seq.num_reused_pages  # held here already: not sent again
            sent = pages_needed(seq.num_sent_tokens, engine.kv.page_size)
            try:
                receiver = self.transfer.expect(
                    seq.rid, seq.pages[reused:sent], self.timeout_s, skip_pages=reused
                )
            except ValueError as e:  # (an id still held from an earlier receive: that one)
                self._in_flight.discard(seq.rid)
                delta = engine.fail(seq.rid, f"KV transfer: {e}")
                if delta is not None:
                    self._failed.append(delta)
                continue
            events.append(TransferReady(seq.rid, receiver.target))
        return events

    def close(self) -> None:
        with self._lock:
            targets, self._targets = self._targets, {}
        for rid, (target, _, _) in targets.items():
            self.transfer.give_up(rid, target, "the sending rank stopped")
        self.transfer.close()
