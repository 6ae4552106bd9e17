"""Changing how many pool instances serve while the server runs (replacing dead ones:
`orchestrator.replacement`).

`orchestrator.pools.PoolSet` owns the instances; it scales them with these functions
(`POST /admin/scale`, `pdserve scale`, the autoscaler):

- **Up.** A new instance takes the next number of its role (names are not reused while the
  server runs, so a name in metrics and logs means one instance), is placed with its role's
  node selector and started off the event loop, and joins the router once every rank of it is
  ready: only then is it picked for new requests. An expert-parallel one joins the EPLB service.
  An instance that cannot be placed (a local Ray with no room: at once; a cluster: after
  `placement_timeout_s`, time for an autoscaler to add a node) or whose rank fails to start is
  cleaned up and reported; the other changes go on.
- **Down.** The instances named go, then the newest of a role above its count. Instances are
  started before any is drained, so that a replacement (`remove` one, same count) never leaves
  the role without a serving instance. A draining instance is picked for no new request and
  leaves the EPLB service; its requests run to their end for up to the drain timeout (by
  default `--scale-drain-timeout`), and those still running then move to another instance:
  those decoding on a decode instance with their KV (`orchestrator.kv_moves`, unless
  `--disable-kv-migration`), the others resuming there from their output (one with no token
  yet starts again; see `Router.generate`). Front routers' requests move too: the instance is
  marked `moving` in the deployment's record, and each moves its own (`orchestrator.front`).
  Then the router takes its ranks' last stats and forgets them, and its actors, rendezvous
  and placement group go. After a scale-up, requests decoding on the busy instances move to
  the new ones with their KV (`KVMoves.balance`).

One scale runs at a time (`PoolSet.scaling`, a replacement included); every role keeps at least
one instance, an autoscaled one stays within its bounds (`PoolSet.bounds`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from orchestrator.front import REFRESH_S as FRONT_REFRESH_S
from orchestrator.peer_load import ask, others_of
from orchestrator.placement import PoolSpec
from orchestrator.pool_instance import PoolInstance

if TYPE_CHECKING:
    from orchestrator.pools import PoolSet

logger = logging.getLogger(__name__)

MAX_INSTANCES = 256  # per role: a typo's guard (each instance is a placement group and ranks)
# A scaled-down decode instance waits for its requests' KV migrations up to the transfer
# timeout and this much more (a request leaves its rank at that rank's next step).
MIGRATION_SLACK_S = 5.0


class ScaleError(ValueError):
    """A scale request that cannot be done as asked (the message names the field)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ScaleInProgress(RuntimeError):
    """Another scale runs (one at a time)."""


class Moved(NamedTuple):
    """The requests a removed instance's drain timeout moved to other instances."""

    migrated: int  # with their KV (decode instances)
    resumed: int  # from their output, computed again
    retried: int  # no output yet: run again


class ServerStopping(ScaleInProgress):
    """The server drains to stop: it scales no more."""


@dataclass
class ScaleReport:
    """What a scale did: instances started and removed (by name), failures, the requests a
    removal's drain timeout moved to another instance, and how long it took."""

    started: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"pool", "error"}
    # Decoding on a decode instance when it went: moved to another with their KV.
    requests_migrated: int = 0
    requests_resumed: int = 0  # had output when their instance went: go on elsewhere from it
    requests_retried: int = 0  # had none yet: run again on another instance
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _is_dead(instance: PoolInstance, gone: Collection[int]) -> bool:
    """Whether `instance` has a rank that is dead for good (`RankTable.gone`): it serves no
    more (until it is replaced, when replacement is on)."""
    return any(i in gone for i in instance.indices)


def plan(
    pools: PoolSet,
    counts: Mapping[str, int],
    remove: Sequence[str],
    gone: Collection[int] = frozenset(),
) -> tuple[list[PoolSpec], list[PoolInstance]]:
    """The instances to start and to remove for `counts` (instances per role) after
    removing the instances named in `remove`; of the others, those with a rank dead for good
    (`gone`: the router's indices) go first, then the newest. ScaleError when it cannot be
    done."""
    for role, n in counts.items():
        if role not in pools.shapes:
            roles = ", ".join(sorted(pools.shapes))
            raise ScaleError(f"{role}: this server's pools are {roles}", role)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ScaleError(f"{role}: the number of instances must be an integer >= 1", role)
        if n > MAX_INSTANCES:
            raise ScaleError(f"{role}: at most {MAX_INSTANCES} instances", role)
        low, high = pools.bounds.get(role, (1, MAX_INSTANCES))
        if not low <= n <= high:
            raise ScaleError(
                f"{role}: the autoscaler keeps it between {low} and {high} instances (the "
                "count it started with and --max-*-instances): ask within that", role,
            )  # fmt: skip
    by_name = {i.name: i for i in pools.instances}
    leaving: list[PoolInstance] = []
    for name in remove:
        instance = by_name.get(name)
        if instance is None:
            raise ScaleError(f"remove: no pool instance {name!r}; there are {sorted(by_name)}",
                             "remove")  # fmt: skip
        if instance.state != "serving":
            raise ScaleError(f"remove: {name} is {instance.state}", "remove")
        if instance not in leaving:
            leaving.append(instance)
    start: list[PoolSpec] = []
    for role, (num_ranks, bundle) in sorted(pools.shapes.items()):
        staying = [i for i in pools.instances
                   if i.spec.role == role and i.state == "serving" and i not in leaving]  # fmt: skip
        low = pools.bounds.get(role, (1, MAX_INSTANCES))[0]  # autoscaled: its minimum
        want = counts.get(role, max(len(staying), low))
        dead_then_newest = sorted(staying, key=lambda i: (not _is_dead(i, gone), -i.spec.instance))
        leaving += dead_then_newest[: max(0, len(staying) - want)]
        first = pools.next_number[role]
        start += [PoolSpec(role, first + k, num_ranks, bundle)
                  for k in range(max(0, want - len(staying)))]  # fmt: skip
    return start, leaving


async def scale(
    pools: PoolSet,
    router: Any,
    eplb: Any,
    counts: Mapping[str, int],
    remove: Sequence[str],
    drain_timeout_s: float,
) -> ScaleReport:
    """Start and drain instances so that each role of `counts` has that many, after the
    instances named in `remove` go (see the module doc); on the router's loop. ScaleError for
    a request that cannot be done, ScaleInProgress while another runs, ServerStopping once
    the server drains to stop."""
    if pools.stopped or router.draining:
        raise ServerStopping("the server is shutting down")
    if pools.scaling:
        raise ScaleInProgress("a scale is already running")
    pools.scaling = True  # before any await: a second scale is refused from here on
    began = time.monotonic()
    report = ScaleReport()
    try:
        start, leaving = plan(pools, counts, remove, router.ranks.gone)
        problem = await asyncio.to_thread(pools.room_for, start)
        if problem:
            raise ScaleError(f"cannot scale up: {problem}", start[0].role)
        for spec in start:  # taken: not reused, whether it starts or not
            pools.next_number[spec.role] = max(pools.next_number[spec.role], spec.instance + 1)
        if start:
            logger.info("scaling: starting %s", ", ".join(s.name for s in start))
        # A thread each: placements that wait for the cluster wait side by side.
        with ThreadPoolExecutor(max(1, len(start)), "pdserve-scale") as threads:
            results = await asyncio.gather(
                *(bring_up(pools, router, eplb, spec, threads) for spec in start),
                return_exceptions=True,
            )
        for spec, result in zip(start, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("scaling: %s did not start: %s", spec.name, result)
                report.failed.append({"pool": spec.name, "error": str(result)})
            else:
                report.started.append(spec.name)
        leaving = _keep_one_per_role(pools, leaving, report, router.ranks.gone)
        # Every take-down ends before the scale does (one that fails must not let another
        # scale start while the others still drain).
        ended = await asyncio.gather(
            *(take_down(pools, router, eplb, i, drain_timeout_s) for i in leaving),
            return_exceptions=True,
        )
        moved = [m for m in ended if isinstance(m, Moved)]
        for instance, outcome in zip(leaving, ended, strict=True):
            if isinstance(outcome, BaseException):
                logger.error("scaling: %s was not removed cleanly: %s", instance.name, outcome)
                report.failed.append({"pool": instance.name, "error": str(outcome)})
                for i in instance.indices:  # (not known to have ended: receivers wait it out)
                    router.ranks.release_orphans(i, process_gone=False)
        report.removed = [
            i.name for i, m in zip(leaving, ended, strict=True) if isinstance(m, Moved)
        ]
        for role in {spec.role for spec in start} | {i.spec.role for i in leaving}:
            pools.num_scales[role] += 1
        report.requests_migrated = sum(m.migrated for m in moved)
        report.requests_resumed = sum(m.resumed for m in moved)
        if pools.config.kv_migration and any(
            spec.role != "prefill" and spec.name in report.started for spec in start
        ):  # new instances take running requests with their KV, not only new ones
            balanced = await _balance(pools, router)
            report.requests_migrated += balanced.migrated
            report.requests_resumed += balanced.resumed
        report.requests_retried = sum(m.retried for m in moved)
    finally:
        pools.scaling = False
        report.seconds = time.monotonic() - began
    logger.info(
        "scaling done in %.1f s: started %s, removed %s%s", report.seconds,
        report.started or "none", report.removed or "none",
        f", failed {report.failed}" if report.failed else "",
    )  # fmt: skip
    return report


async def _balance(pools: PoolSet, router: Any) -> Moved:
    """Even out the generating ranks' load with KV moves (`KVMoves.balance`) and wait
    for them, up to the transfer timeout and `MIGRATION_SLACK_S`; the requests moved, and
    those whose move failed (they resumed from their output)."""
    everyone = router.ranks.present
    before = router.moves.moved_off(everyone)
    stats, infos = await router.stats(), router.infos
    free = {
        i: st.num_pages_free * info.page_size
        for i, (st, info) in enumerate(zip(stats, infos, strict=True))
        if st is not None and info is not None
    }
    if router.moves.balance(free):
        until = time.monotonic() + pools.config.transfer_timeout_s + MIGRATION_SLACK_S
        while router.moves.under_way() and time.monotonic() < until and not pools.stopped:
            await asyncio.sleep(0.02)
    after = router.moves.moved_off(everyone)
    return Moved(after[0] - before[0], after[1] - before[1], 0)


def _keep_one_per_role(
    pools: PoolSet, leaving: list[PoolInstance], report: ScaleReport, gone: Collection[int]
) -> list[PoolInstance]:
    """`leaving`, less what would leave a role with no serving instance that is alive (its
    replacement did not start; `gone`: ranks dead for good): those stay, reported as
    failed. A dead instance always goes."""
    out = []
    for instance in leaving:
        role = instance.spec.role
        if _is_dead(instance, gone) or any(
            i.spec.role == role and i.state == "serving" and i not in leaving
            and not _is_dead(i, gone)
            for i in pools.instances
        ):  # fmt: skip
            out.append(instance)
        else:
            report.failed.append(
                {"pool": instance.name, "error": "kept: its replacement did not start"}
            )
    return out


async def bring_up(
    pools: PoolSet, router: Any, eplb: Any, spec: PoolSpec, threads: ThreadPoolExecutor
) -> None:
    def cancelled() -> bool:  # the server drains to stop: a new instance would not serve
        return pools.stopped or pools.stopping or router.draining

    loop = asyncio.get_running_loop()
    instance = await loop.run_in_executor(threads, pools.start_instance, spec, cancelled)
    try:
        instance.indices = await router.add_ranks(instance.ranks)
        if eplb is not None and spec.num_ranks > 1:
            await eplb.add_pool.remote(_eplb_handle(pools, instance))
    except BaseException:
        if instance.indices:
            await router.remove_ranks(instance.indices, f"{spec.name} failed to start")
        await asyncio.to_thread(instance.release)
        await asyncio.to_thread(pools.forget, instance)  # (the record: a GCS call)
        raise
    instance.state = "serving"
    pools.num_started[spec.role] += 1
    # A rank that died for good while it started was not replaced then (`replacement.gone`
    # looks at serving instances only): now.
    dead = [i for i in instance.indices if i in router.ranks.gone]
    if dead and getattr(router, "on_rank_gone", None) is not None:
        router.on_rank_gone(dead[0])


async def _drain_fronts(
    pools: PoolSet, router: Any, instance: PoolInstance, deadline: float
) -> bool:
    """Wait until `deadline` for the requests of a deployment's front routers on `instance`
    to end or move: its ranks count them by router (`load_by_router`, their KV transfers in
    flight too; a rank that does not answer counts none); whether none is left. What is
    left when the instance goes resumes elsewhere, as its front router sees the ranks fail."""

    async def left(i: int) -> int:
        by_router = await ask(router.ranks.handles[i])
        theirs = others_of(by_router, router.ranks.tag) if by_router is not None else []
        return sum(load.requests + load.transfers for load in theirs)

    while not (pools.stopping or pools.stopped):
        live = [i for i in instance.indices if router.ranks.is_live(i)]
        if sum(await asyncio.gather(*(left(i) for i in live))) == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.25)
    return False


def _eplb_handle(pools: PoolSet, instance: PoolInstance) -> Any:
    from eplb.service import PoolHandle
    from workers.model.config import ModelConfig

    num_groups = ModelConfig.from_dir(pools.model_dir).n_group
    return PoolHandle(instance.name, list(instance.ranks), num_groups)


async def take_down(
    pools: PoolSet,
    router: Any,
    eplb: Any,
    instance: PoolInstance,
    drain_timeout_s: float,
    migrate: bool = True,
) -> Moved:
    """Drain `instance` and release it; the requests its drain timeout moved to another
    instance: with their KV (`KVMoves.move_from`), resuming from their output, or
    starting again (no output yet)."""
    instance.state = "draining"
    logger.info("scaling: draining %s", instance.name)
    router.close_ranks(instance.indices)
    if pools.deployment is not None:  # front routers (`orchestrator.front`) see it too
        await asyncio.to_thread(pools.record)
    if eplb is not None and instance.spec.num_ranks > 1:
        try:  # first: no rebalance starts on it while it drains
            await eplb.remove_pool.remote(instance.name)
        except Exception as e:
            logger.warning("scaling: the EPLB service kept %s: %s", instance.name, e)
    began = time.monotonic()
    # Its requests run on while the server drains to stop too (that drain bounds them);
    # only the stop itself (`stopping`) ends the wait early.
    while router.requests_on(instance.indices) and not (pools.stopping or pools.stopped):
        if time.monotonic() - began >= drain_timeout_s:
            break
        await asyncio.sleep(0.05)
    fronts_left = False  # front routers' requests still run there
    if pools.deployment is not None:
        fronts_left = not await _drain_fronts(pools, router, instance, began + drain_timeout_s)
    moved_before = router.moves.moved_off(instance.indices)
    if (
        migrate and pools.config.kv_migration and router.moves.can_move_from(instance.indices)
    ):  # fmt: skip
        if fronts_left:  # they move theirs too, once they read the mark
            instance.moving = True
            await asyncio.to_thread(pools.record)
        # Each request leaves at its rank's next step and its KV moves as from a prefill
        # rank; one whose prompt a prefill rank computes for this instance is asked once
        # its first token came from here. Bounded by the transfer timeout: what is left
        # then resumes from its output (a failed move too), or starts again elsewhere (one
        # queued here).
        timeout_s = pools.config.transfer_timeout_s + MIGRATION_SLACK_S
        until = time.monotonic() + timeout_s
        await router.moves.move_off(
            instance.indices, timeout_s, lambda: pools.stopping or pools.stopped
        )
        if fronts_left:  # a front router reads the record every `front.REFRESH_S`
            await _drain_fronts(pools, router, instance, until + 2 * FRONT_REFRESH_S)
    moved_after = router.moves.moved_off(instance.indices)
    # Moved with their KV (it arrived); those whose move failed resumed from their output.
    migrated = moved_after[0] - moved_before[0]
    failed = moved_after[1] - moved_before[1]
    if migrated:
        logger.info("scaling: %d request(s) of %s moved to other instances with their KV",
                    migrated, instance.name)  # fmt: skip
    resumed = router.requests_on(instance.indices, with_output=True) + failed
    retried = router.requests_on(instance.indices, with_output=False)
    if resumed or retried:
        logger.warning(
            "scaling: after %.1f s of draining %s, %d request(s) resume elsewhere from "
            "the output they had, %d without output yet start again elsewhere",
            time.monotonic() - began, instance.name, resumed, retried,
        )  # fmt: skip
    await router.remove_ranks(
        instance.indices, f"pool instance {instance.name} was removed (scaled down)"
    )
    await asyncio.to_thread(instance.release)
    router.ranks.ranks_exited(instance.indices)  # their receivers' pages are free now
    # After: a router that dies meanwhile leaves it recorded. (The record: a GCS call.)
    await asyncio.to_thread(pools.forget, instance)
    pools.released_at = time.monotonic()
    pools.num_removed[instance.spec.role] += 1
    return Moved(migrated, resumed, retried)


def drain_seconds(value: Any, default: float) -> float:
    """A scale request's `drain_timeout_s`: finite, >= 0."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < math.inf):
        raise ScaleError("drain_timeout_s: seconds, a finite number >= 0", "drain_timeout_s")
    return float(value)
