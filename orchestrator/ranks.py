"""`RankTable`: the router's view of the engine ranks — who is up, how loaded each is, which
one (pair) takes the next request — and the commands that go to them: on each rank's stream
once it is connected, by actor call before (a new request's wait for its ranks to take it:
`orchestrator.request_sides`).

The load counters are the router's own bookkeeping of what it sent
(`orchestrator.routed.RoutedRequest`s move through `admit` → `prompt_done` → `release`), plus,
in a deployment with front routers, what the other routers' requests held on each rank when
it was last asked (`peer_load`, kept by `orchestrator.peer_load.PeerLoadWatch`);
`orchestrator.policy.pick_ranks` decides from them. Everything here runs on the router's event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from orchestrator.policy import Affinity, Pick, RankLoad, pick_ranks, pick_receiver
from orchestrator.routed import Limits, RoutedRequest, RouterNotReady
from workers.engine.delta_stream import encode_frame
from workers.engine.messages import AddsTaken, GenerateRequest, short_error
from workers.engine.prefix_cache import page_key
from workers.engine.rank_reports import RankInfo, RankStats, RouterLoad

logger = logging.getLogger(__name__)

AFFINITY_TOKENS = 64  # prompts that begin with the same this many tokens go to the same rank
# An expert-parallel pool that got no request for this long may be asleep (its idle ranks
# join its lockstep agreement only every few hundred ms): its other ranks are woken with the
# first request after it (`EngineWorker.wake`).
POOL_QUIET_S = 1.0


def prefix_key(input_ids: Sequence[int]) -> bytes | None:
    """The affinity key of a prompt: its first `AFFINITY_TOKENS` tokens (None for a prompt no
    longer than that, whose cache hits would be small)."""
    if len(input_ids) <= AFFINITY_TOKENS:
        return None
    return page_key(b"", input_ids[:AFFINITY_TOKENS])


_MASK64 = (1 << 64) - 1


def rank_seed(info: RankInfo) -> int:
    """A 64-bit hash of a rank's name (`role-instance/pool_rank`), the same in every router of
    a deployment (their indices differ)."""
    return _name_seed(info.role, info.instance, info.pool_rank)


@functools.lru_cache(maxsize=65536)
def _name_seed(role: str, instance: int, pool_rank: int) -> int:
    name = f"{role}-{instance}/{pool_rank}".encode()
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little")


def preferred_rank(key: bytes, seeds: Mapping[int, int]) -> int | None:
    """The rank (of `seeds`: index -> `rank_seed`) that prompts with affinity key `key`
    prefer: the highest hash of the key with its seed (rendezvous hashing). Every router
    prefers the same rank for a key, whatever its indices, and a rank that joins or leaves
    changes the preference of only the keys it wins or held. None when `seeds` is empty."""
    k = int.from_bytes(key[:8], "little")
    best, top = None, -1
    for i, seed in seeds.items():  # SplitMix64's finalizer of key ^ seed (inline: every rank)
        x = k ^ seed
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
        if x > top:
            best, top = i, x
    return best


class RankTable:
    def __init__(self, handles: Sequence[Any], tag: str = ""):
        """`handles`: `EngineWorker` actor handles, indexed by rank; `tag`: the router's, sent
        when it connects to a rank's stream (see `workers.engine.delta_stream`)."""
        self.tag = tag
        self.handles = list(handles)
        self.infos: list[RankInfo | None] = [None] * len(handles)  # set once a rank is ready
        self.errors: list[str | None] = [None] * len(handles)  # set while a rank is dead
        # Times each rank was found failing; the ranks whose actors are dead for good (Ray
        # will not restart them: killed for good, or their constructor failed).
        self.num_downs = [0] * len(handles)
        self.gone: set[int] = set()
        # Receives (receiving rank, rid) of requests aborted while their sending rank was down:
        # once that rank is back as a new process (or gone for good), nothing that had their
        # targets can write any more, and their receivers are told (`release_orphans`).
        self.orphans: dict[int, set[tuple[int, str]]] = {}
        self.exited: set[int] = set()  # removed ranks whose processes were ended (scaled down)
        # Requests whose KV moved off each rank to another and arrived there (their first
        # token came from the new rank: `rank_output.dispatch`).
        self.moved_off: Counter[int] = Counter()
        # The load this router put on each rank (see `orchestrator.policy`).
        self.reserved_tokens = [0] * len(handles)
        self.queued_prefill_tokens = [0] * len(handles)
        self.running = [0] * len(handles)
        # What the deployment's other routers' requests held on each rank at the last look.
        self.peer_load = [RouterLoad()] * len(handles)
        self.num_add_calls = 0  # add frames or calls (each carries one or more adds)
        # Each rank's output stream, once connected: commands go on it (`send_command`).
        self.streams: list[asyncio.StreamWriter | None] = [None] * len(handles)
        # Pool instances scaled down (`orchestrator.scaling`): their ranks are not picked while
        # they drain (`closed`), then forgotten (`removed`); indices are never reused.
        self.closed: set[int] = set()
        self.removed: set[int] = set()
        # A removed rank's stats as it went: what it counted stays in the totals of /metrics.
        self.final_stats: dict[int, RankStats] = {}
        self._add_seq = 0
        # Add frames sent on a stream and not answered yet: rank -> seq -> their futures.
        self._unanswered: dict[int, dict[int, list[asyncio.Future[None]]]] = {}
        self.num_pool_wakes = 0  # `wake` calls to the other ranks of a quiet pool
        self._pool_last_add: dict[tuple[str, int], float] = {}  # (role, instance) -> time
        # Adds waiting for this event-loop pass to end, per rank (see `add`).
        self._adds: dict[int, list[tuple[GenerateRequest, asyncio.Future[None]]]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.handles)

    def add_ranks(self, handles: Sequence[Any], infos: Sequence[RankInfo]) -> list[int]:
        """Take on ready ranks (a pool instance scaled up); their indices."""
        start = len(self.handles)
        self.handles += handles
        self.infos += infos
        for column in (
            self.reserved_tokens, self.queued_prefill_tokens, self.running, self.num_downs
        ):  # fmt: skip
            column += [0] * len(handles)
        self.errors += [None] * len(handles)
        self.streams += [None] * len(handles)
        self.peer_load += [RouterLoad()] * len(handles)
        return list(range(start, len(self.handles)))

    def remove(self, ranks: Sequence[int]) -> None:
        """Forget `ranks` (their pool instance was scaled down): never picked, reported or
        waited for again."""
        for rank in ranks:
            self.closed.add(rank)
            self.removed.add(rank)
            self.infos[rank] = None
            self.errors[rank] = None
            self.peer_load[rank] = RouterLoad()

    @property
    def present(self) -> list[int]:
        """The ranks not removed."""
        return [i for i in range(len(self.handles)) if i not in self.removed]

    # ---- state ----------------------------------------------------------------------------

    @property
    def all_loaded(self) -> bool:
        return all(self.infos[i] is not None for i in self.present)

    def is_live(self, rank: int) -> bool:
        return self.infos[rank] is not None and self.errors[rank] is None

    @property
    def limits(self) -> Limits:
        infos = [i for i in self.infos if i is not None]
        if not self.all_loaded:
            raise RouterNotReady("the model is still loading")
        if not infos:  # every rank removed: their instance is being replaced (or gone)
            raise RouterNotReady("no engine rank is up (a pool instance is being replaced, or "
                                 "the deployment was removed)")  # fmt: skip
        return Limits(
            vocab_size=min(i.vocab_size for i in infos),
            max_context_len=min(i.max_context_len for i in infos),
            kv_capacity_tokens=min(i.kv_capacity_tokens for i in infos),
        )

    def may_come_back(self, rank: int) -> bool:
        """Whether `rank`, down now, may serve again: Ray restarts it (it is not dead for
        good, and its pool instance is not scaled down)."""
        return not self.is_live(rank) and rank not in self.gone and rank not in self.closed

    def dead_message(self) -> str:
        errors = [e for e in self.errors if e]
        return "; ".join(errors) if errors else "the model is still loading"

    # ---- picking and load accounting ------------------------------------------------------

    def loads(self) -> list[RankLoad]:
        """Each rank's load as the pair-picking policy sees it. A rank of an expert-parallel
        pool with a rank down counts as down too: it is about to leave the broken pool."""
        broken = {
            (info.role, info.instance)
            for i, (info, error) in enumerate(zip(self.infos, self.errors, strict=True))
            if info is not None and error is not None and info.pool_size > 1
            and i not in self.removed
        }  # fmt: skip
        closed = self.closed
        return [
            RankLoad(
                info.role if info is not None else "",
                info is not None and error is None and i not in closed
                and (info.role, info.instance) not in broken,
                info.kv_capacity_tokens if info is not None else 0,
                queued + peer.unstarted_prompt_tokens,
                reserved + peer.reserved_tokens,
                running + peer.requests,
            )
            for i, (info, error, peer, queued, reserved, running) in enumerate(zip(
                self.infos, self.errors, self.peer_load, self.queued_prefill_tokens,
                self.reserved_tokens, self.running, strict=True,
            ))
        ]  # fmt: skip

    def pick(self, avoid: frozenset[int] = frozenset(), input_ids: Sequence[int] = ()) -> Pick:
        """The ranks for a new request (`orchestrator.policy.pick_ranks`), with prefix
        affinity for `input_ids`; ranks in `avoid` are not picked. RouterNotReady when no live
        rank (pair) can take it."""
        key = prefix_key(input_ids)
        loads = self.loads()
        affinity = None
        if key is not None:
            seeds: dict[str, dict[int, int]] = {}  # by role
            for i, (info, load) in enumerate(zip(self.infos, loads, strict=True)):
                if info is not None and load.alive and i not in avoid:
                    seeds.setdefault(load.role, {})[i] = rank_seed(info)
            if any(load.role == "prefill" for load in loads):
                affinity = Affinity(
                    preferred_rank(key, seeds.get("prefill", {})), len(input_ids),
                    preferred_rank(key, seeds.get("decode", {})),
                )  # fmt: skip
            else:
                affinity = Affinity(preferred_rank(key, seeds.get("colocated", {})), len(input_ids))
        pick = pick_ranks(loads, avoid, affinity)
        if pick is None:
            raise RouterNotReady(self.dead_message())
        return pick

    def pick_receiver(
        self, avoid: frozenset[int] = frozenset(), role: str = "decode"
    ) -> int | None:
        """The rank of `role` a request moving with its KV goes to (one that takes such
        requests: `RankInfo.migrates`); None when none is left."""
        unable = frozenset(i for i, info in enumerate(self.infos) if not (info and info.migrates))
        return pick_receiver(self.loads(), avoid | unable, role)

    def with_pool_peers(self, ranks: frozenset[int]) -> frozenset[int]:
        """`ranks` and the other ranks of their pool instances."""
        pools = {(i.role, i.instance) for r in ranks if (i := self.infos[r]) is not None}
        return ranks | {
            r for r, i in enumerate(self.infos) if i is not None and (i.role, i.instance) in pools
        }

    def can_pick(self, avoid: frozenset[int]) -> bool:
        return pick_ranks(self.loads(), avoid) is not None

    def admit(self, req: RoutedRequest) -> None:
        """Count `req`'s load on its rank(s)."""
        self.reserved_tokens[req.rank] += req.num_tokens
        self.running[req.rank] += 1
        if req.queued_here:
            self.queued_prefill_tokens[req.rank] += req.num_prompt_tokens
        if req.prefill_rank is not None:
            self.queued_prefill_tokens[req.prefill_rank] += req.num_prompt_tokens
            self.running[req.prefill_rank] += 1

    def prompt_done(self, req: RoutedRequest) -> None:
        """`req`'s first token came from its generating rank: its prompt no longer loads its
        prefill rank (or its own queue, when scored in place)."""
        if req.queued_here:
            self.queued_prefill_tokens[req.rank] -= req.num_prompt_tokens
            req.queued_here = False
        elif req.prefill_rank is not None:
            self.queued_prefill_tokens[req.prefill_rank] -= req.num_prompt_tokens
            self.running[req.prefill_rank] -= 1
            req.prefill_rank = None

    def release(self, req: RoutedRequest) -> None:
        """`req` ended: uncount what is still counted of it."""
        self.prompt_done(req)
        self.reserved_tokens[req.rank] -= req.num_tokens
        self.running[req.rank] -= 1

    # ---- calls ----------------------------------------------------------------------------

    def add(self, rank: int, request: GenerateRequest) -> asyncio.Future[None]:
        """`add_request` on `rank`, batched: the adds of one event-loop pass reach a rank in one
        actor call (`add_requests`; a burst of arrivals costs one round trip, not one each).
        The future raises what the single call would: ValueError (refused), or the error the
        call failed with."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(_retrieve)  # nobody may await it (the client left at once)
        pending = self._adds.setdefault(rank, [])
        if not pending:
            loop.call_soon(self._send_adds, rank)
        pending.append((request, future))
        return future

    def _send_adds(self, rank: int) -> None:
        batch = self._adds.pop(rank, [])
        if not batch:
            return
        requests = [request for request, _ in batch]
        self.num_add_calls += 1
        if self.streams[rank] is not None:
            self._add_seq += 1
            self._unanswered.setdefault(rank, {})[self._add_seq] = [f for _, f in batch]
            self.send_command(rank, ("add", self._add_seq, requests))
            self._wake_pool_of(rank)
            return
        ref = self.handles[rank].add_requests.remote(requests)
        self._wake_pool_of(rank)

        async def settle() -> None:
            try:
                refusals: list[str | None] = await ref
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                return
            for (_, future), refusal in zip(batch, refusals, strict=True):
                if future.done():
                    continue
                if refusal is None:
                    future.set_result(None)
                else:
                    future.set_exception(ValueError(refusal))

        self._keep(asyncio.get_running_loop().create_task(settle()))

    # ---- commands on the ranks' streams ------------------------------------------------------

    def attach_stream(self, rank: int, writer: asyncio.StreamWriter) -> None:
        """`rank`'s output stream is connected: commands go on it from now on."""
        self.streams[rank] = writer

    def detach_stream(self, rank: int, error: BaseException) -> None:
        """`rank`'s stream ended: its unanswered adds fail with `error` (the rank went away
        with them, or took them and will fail them itself); commands go by actor call."""
        self.streams[rank] = None
        for futures in self._unanswered.pop(rank, {}).values():
            for future in futures:
                if not future.done():
                    future.set_exception(ConnectionError(short_error(error)))

    def send_command(self, rank: int, command: tuple[Any, ...]) -> None:
        """Write `command` on `rank`'s stream (see `workers.engine.delta_stream`), or make
        the actor call of the same name when it has none. Commands on a stream reach the rank
        in the order they were sent; adds of this event-loop pass not sent yet go first, so an
        abort cannot overtake its add."""
        writer = self.streams[rank]
        if writer is None:
            handle, kind = self.handles[rank], command[0]
            if kind == "abort":
                self.spawn(handle.abort.remote(*command[1:]))
            elif kind == "targets":
                self.spawn(handle.set_transfer_targets.remote(command[1]))
            elif kind == "wake":
                self.spawn(handle.wake.remote())
            elif kind == "migrate":
                self.spawn(handle.migrate.remote(command[1]))
            else:
                raise ValueError(f"no actor call for command {kind!r}")
            return
        if command[0] != "add" and self._adds.get(rank):
            self._send_adds(rank)
        writer.write(encode_frame([command]))

    def ranks_exited(self, ranks: Sequence[int]) -> None:
        """The processes of removed `ranks` were ended (their instance was scaled down):
        nothing of theirs writes KV any more."""
        for rank in ranks:
            self.exited.add(rank)
            self.release_orphans(rank, process_gone=True)

    def release_orphans(self, rank: int, process_gone: bool) -> None:
        """`rank` is back (or gone for good): when its process that had the targets is gone
        (`process_gone`), tell the receiving ranks of its orphaned receives that nothing
        writes their pages any more; either way forget them (a process that lived on tells
        its receivers itself as it applies the aborts)."""
        orphans = self.orphans.pop(rank, set())
        for receiving, rid in sorted(orphans) if process_gone else ():
            with contextlib.suppress(Exception):
                self.send_command(receiving, ("abort", rid, True))

    def adds_taken(self, rank: int, answer: AddsTaken) -> None:
        """A rank's answer to an add frame: settle each request's future."""
        futures = self._unanswered.get(rank, {}).pop(answer.seq, None)
        if futures is None:
            return  # answered to an earlier connection
        for i, future in enumerate(futures):
            if future.done():
                continue
            if answer.error is not None:
                future.set_exception(RuntimeError(answer.error))
            elif answer.refusals[i] is None:
                future.set_result(None)
            else:
                future.set_exception(ValueError(answer.refusals[i]))

    def _wake_pool_of(self, rank: int) -> None:
        """Wake the other ranks of `rank`'s expert-parallel pool when it has been quiet (see
        `POOL_QUIET_S`), so that the work just sent does not wait for them to join a step."""
        info = self.infos[rank]
        if info is None or info.pool_size < 2:
            return
        pool = (info.role, info.instance)
        now = asyncio.get_running_loop().time()
        last = self._pool_last_add.get(pool)
        self._pool_last_add[pool] = now
        if last is not None and now - last < POOL_QUIET_S:
            return
        for peer, peer_info in enumerate(self.infos):
            if (
                peer != rank
                and peer_info is not None
                and (peer_info.role, peer_info.instance) == pool
            ):
                self.num_pool_wakes += 1
                self.send_command(peer, ("wake",))

    def spawn(self, awaitable: Awaitable[Any]) -> None:
        """Fire and forget an actor call; failures surface through the output streams."""

        async def run() -> None:
            with contextlib.suppress(Exception):
                await awaitable

        self._keep(asyncio.get_running_loop().create_task(run()))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)  # a task nobody awaits needs a strong reference
        task.add_done_callback(self._background.discard)

    async def flush_prefix_cache(self) -> int:
        """Forget the prefix cache of every live rank; the cached pages freed in all."""
        live = [h for i, h in enumerate(self.handles) if self.is_live(i)]  # not removed
        return sum(await asyncio.gather(*(h.flush_prefix_cache.remote() for h in live)))

    async def stats(self) -> list[RankStats | None]:
        """Each rank's stats; None for a rank that is not ready or does not answer."""
        return await self.stats_of(range(len(self.handles)))

    async def stats_of(self, ranks: Sequence[int]) -> list[RankStats | None]:
        """The stats of `ranks`; None for one that is not ready or does not answer."""

        async def one(i: int) -> RankStats | None:
            if not self.is_live(i):
                return None
            try:
                stats: RankStats = await asyncio.wait_for(self.handles[i].stats.remote(), 5)
                return stats
            except Exception:
                return None

        return list(await asyncio.gather(*(one(i) for i in ranks)))


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's exception as seen (asyncio logs an unseen one as an error)."""
    if not future.cancelled():
        future.exception()
