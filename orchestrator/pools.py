"""The pool instances of a server: starting them, and changing how many serve while it runs.

A pool instance is `--prefill-dp` / `--decode-dp` / `--dp` engine ranks in a placement group of
their own (`orchestrator.placement`), with a `Rendezvous` actor when they are several (expert
parallel). `PoolSet` owns every instance a server started, and scales them (`POST /admin/scale`,
`pdserve scale`):

- **Instances.** `start` places the topology's instances and starts their ranks; `take_over`
  finds a deployment's instances by name (`--deployment`, `orchestrator.deployment`);
  `start_instance` places and starts one more (a scale-up, a replacement), off the event loop;
  `shutdown` releases them all (or, `--keep-pools`, leaves them to the next router).
- **Scaling** (`orchestrator.scaling`): instances started and drained while the server serves,
  requests moved off those that go, dead instances replaced; one change at a time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from orchestrator import deployment as dep
from orchestrator import replacement, scaling
from orchestrator.config import ServeConfig
from orchestrator.placement import (
    PoolPlacement,
    PoolSpec,
    group_name,
    place_pools,
    reserve_groups,
)
from orchestrator.pool_instance import (
    PoolInstance,
    pool_specs,
    read_expert_placements,
    start_ranks,
    starts_local_ray,
    wait_ranks_ready,
)
from orchestrator.scaling import ScaleReport

logger = logging.getLogger(__name__)

# On a local Ray, how long a scale-up waits for what an instance just removed held to show as
# free before it is refused for want of room.
ROOM_SETTLE_S = 5.0


class PoolSet:
    """The pool instances a server started (see the module doc). `start` places and starts
    the topology's instances; `scale` changes them while the server serves
    (`orchestrator.scaling`)."""

    def __init__(
        self,
        model_dir: Path,
        config: ServeConfig,
        instances: list[PoolInstance],
        selectors: dict[str, dict[str, str]],
    ):
        self.model_dir = model_dir
        self.config = config
        self.instances = instances
        self.selectors = selectors  # each role's node selector, for instances placed later
        self.fixed_cluster = starts_local_ray(config)
        self.scaling = False  # a scale is running (one at a time)
        self.stopping = False  # the server is about to stop: a running scale ends now
        self.stopped = False
        # Autoscaled roles' bounds (`orchestrator.autoscale`): manual scales keep within them.
        self.bounds: dict[str, tuple[int, int]] = {}
        self.num_started = dict.fromkeys((i.spec.role for i in instances), 0)  # by scaling
        self.num_removed = dict.fromkeys((i.spec.role for i in instances), 0)
        # Each role's rank shape (ranks and bundle), the next instance number.
        self.shapes = {i.spec.role: (i.spec.num_ranks, i.spec.bundle) for i in instances}
        self.next_number = {role: 1 + max(i.spec.instance for i in instances if i.spec.role == role)
                      for role in self.shapes}  # fmt: skip
        self._saved = read_expert_placements(config.init_expert_placement)
        self._lock = threading.Lock()  # `instances`, changed on the loop and in start threads
        self.released_at = -math.inf  # when an instance was last scaled down
        self.num_replaced = dict.fromkeys((i.spec.role for i in instances), 0)  # dead ones
        # Scales that changed each role's instances (a replacement under way stops then: the
        # scale set the role's count).
        self.num_scales = dict.fromkeys((i.spec.role for i in instances), 0)
        self.replacing: dict[str, asyncio.Task[None]] = {}  # by the dead instance's name
        # `--deployment`: its name (the instances are detached and recorded in the GCS, see
        # `orchestrator.deployment`), whether a stop leaves them running, and the lease of
        # this router.
        self.deployment = config.deployment
        self.keep_on_exit = config.keep_pools
        self.lease: Any = None
        self._record_lock = threading.Lock()
        self._settings = dep.settings_of(config, model_dir) if self.deployment else {}
        self._recorded = False  # written once: a record gone since was removed on purpose
        self._removed_logged = False

    def record(self, strict: bool = False) -> None:
        """Write the deployment's record (with `--deployment`) after its instances changed:
        a router that dies now leaves nothing the next one does not know of. `strict`: a save
        that fails raises (before something detached is made that only the record names)."""
        if self.deployment is None:
            return
        with self._record_lock:  # one writer at a time: the last write has the last state
            if self._recorded and self.deployment_removed():
                return
            with self._lock:
                instances = [
                    dep.InstanceRecord(
                        i.spec.role, i.spec.instance, i.spec.num_ranks, dict(i.spec.bundle),
                        i.placement.selector if i.placement is not None
                        else self.selectors.get(i.spec.role),
                        i.state == "draining", i.moving,
                    )
                    for i in self.instances  # those still waiting for a place too: their
                ]  # placement group exists, named, from the moment it is asked for  # fmt: skip
            record = dep.DeploymentRecord(
                self.deployment, dep.code_fingerprint(), self._settings, instances,
                dict(self.next_number), dict(self.selectors), self.config.replace_dead_instances,
                sorted(self.replacing),
            )  # fmt: skip
            try:
                dep.save(record)
                self._recorded = True
            except Exception as e:  # the GCS is unreachable: serving goes on
                logger.error("deployment %s: its record was not saved: %s", self.deployment, e)
                if strict:
                    raise RuntimeError(f"the deployment's record could not be saved: {e}") from e

    def deployment_removed(self) -> bool:
        """Whether the deployment's record is gone (`pdserve down --force` while this router
        serves): it then neither rewrites it nor replaces instances."""
        if self.deployment is None:
            return False
        try:
            gone = dep.load(self.deployment) is None
        except Exception:
            return False
        if gone and not self._removed_logged:
            self._removed_logged = True
            logger.error("deployment %s was removed (pdserve down) while this router serves it: "
                         "it no longer records or replaces instances", self.deployment)  # fmt: skip
        return gone

    @classmethod
    def start(cls, model_dir: Path, config: ServeConfig) -> PoolSet:
        """Place the topology's pool instances and start their rank actors, not waiting for
        the models to load; `ray.init` first."""
        specs = pool_specs(config, ray.cluster_resources().get("GPU", 0))
        pools = cls(model_dir, config, [PoolInstance(spec, None) for spec in specs], {})
        # Recorded before anything is placed: a router that dies while the placement groups
        # wait or the ranks start leaves nothing the next one (or `pdserve down`) misses.
        pools.record()
        try:
            placements, pools.selectors = place_pools(
                specs, config.placement_timeout_s, fixed_cluster=starts_local_ray(config),
                deployment=config.deployment,
            )  # fmt: skip
        except BaseException:
            pools.keep_on_exit = False  # (a start that failed leaves nothing for the next)
            pools.shutdown()
            raise
        for instance, placement in zip(pools.instances, placements, strict=True):
            instance.placement = placement
        pools.record()
        try:
            offset = 0
            for instance in pools.instances:
                pools._start_ranks(instance)
                instance.indices = list(range(offset, offset + len(instance.ranks)))
                instance.state = "serving"
                offset += len(instance.ranks)
        except BaseException:
            pools.keep_on_exit = False
            pools.shutdown()
            raise
        return pools

    @classmethod
    def take_over(cls, model_dir: Path, config: ServeConfig, record: Any) -> PoolSet:
        """The instances of the deployment in `record` (`orchestrator.deployment`), found by
        name; one whose actors or placement group are gone is released and a new instance of
        its role started in its place (not waiting for its model). One that was being scaled
        down (the router before stopped in the middle) is removed: its scale-down ends here,
        unless it is all its role has left."""
        from ray.util.placement_group import get_placement_group

        found: list[PoolInstance] = []
        broken: list[PoolInstance] = []
        draining: list[PoolInstance] = []  # found, being scaled down when the router stopped
        for inst in record.instances:
            spec = PoolSpec(inst.role, inst.instance, inst.num_ranks, dict(inst.bundle))
            instance = PoolInstance(spec, None, state="serving")
            try:
                group = get_placement_group(group_name(record.name, spec))
                instance.placement = PoolPlacement(spec, group, inst.selector)
                for i in range(spec.num_ranks):
                    name = dep.rank_name(record.name, spec.name, i)
                    instance.ranks.append(ray.get_actor(name, namespace=dep.NAMESPACE))
                if spec.num_ranks > 1:
                    name = dep.rendezvous_name(record.name, spec.name)
                    instance.rendezvous = ray.get_actor(name, namespace=dep.NAMESPACE)
            except ValueError as e:
                if inst.draining:  # (it was going anyway)
                    logger.warning("deployment %s: %s, being scaled down, is incomplete (%s); "
                                   "removing it", record.name, spec.name, e)  # fmt: skip
                    dep.remove_instance(record.name, spec)
                    continue
                logger.warning("deployment %s: %s is incomplete (%s); starting another in its "
                               "place", record.name, spec.name, e)  # fmt: skip
                broken.append(instance)
                continue
            (draining if inst.draining else found).append(instance)
        # A scale-down ends here, but not by removing the last working instance of a role:
        # one whose role's other instances turned out broken serves on (it is warm).
        working = {i.spec.role for i in found}
        for instance in draining:
            if instance.spec.role in working:
                logger.warning("deployment %s: %s was being scaled down when its router "
                               "stopped; removing it", record.name, instance.spec.name)  # fmt: skip
                dep.remove_instance(record.name, instance.spec)
                continue
            logger.warning("deployment %s: %s was being scaled down, but its role has no other "
                           "working instance; it serves on", record.name, instance.spec.name)  # fmt: skip
            found.append(instance)
            working.add(instance.spec.role)
            # It stands for one of the role's broken instances, which is then not replaced.
            stood_for = next((b for b in broken if b.spec.role == instance.spec.role), None)
            if stood_for is not None:
                broken.remove(stood_for)
                dep.remove_instance(record.name, stood_for.spec)
        # Every role of the topology needs an instance: one with none left (its last died and
        # its replacement had not started when the router stopped) gets a new one.
        have = {i.spec.role for i in found + broken}
        roles = {"colocated"} if config.colocated else {"prefill", "decode"}
        missing = []
        if roles - have:
            specs = pool_specs(config, ray.cluster_resources().get("GPU", 0))
            missing = [spec for spec in specs if spec.role not in have]
        for spec in {s.role: s for s in missing}.values():
            logger.warning("deployment %s: no %s instance is left; starting one", record.name,
                           spec.role)  # fmt: skip
            broken.append(PoolInstance(spec, None, state="serving"))
        if not found and not broken:
            raise dep.DeploymentError(
                f"deployment {record.name!r} holds no pool instance: remove it with `pdserve "
                f"down --deployment {record.name}` and serve again"
            )
        pools = cls(model_dir, config, found + broken, dict(record.selectors))
        for role, n in record.next.items():
            pools.next_number[role] = max(pools.next_number.get(role, 0), n)
        for instance in broken:
            dep.remove_instance(record.name, instance.spec)
            pools.forget(instance)  # after: the record names what may still hold resources
            spec = PoolSpec(instance.spec.role, pools.next_number[instance.spec.role],
                            instance.spec.num_ranks, dict(instance.spec.bundle))  # fmt: skip
            pools.next_number[spec.role] += 1
            (placement,) = reserve_groups([spec], pools.selectors, config.placement_timeout_s,
                                          deployment=record.name)  # fmt: skip
            fresh = PoolInstance(spec, placement, state="serving")
            with pools._lock:
                pools.instances.append(fresh)
            pools.record()
            pools._start_ranks(fresh)
        offset = 0
        for instance in pools.instances:
            instance.indices = list(range(offset, offset + len(instance.ranks)))
            offset += len(instance.ranks)
        pools.record()
        return pools

    @property
    def ranks(self) -> list[Any]:
        """Every rank's actor handle, instance by instance (at start: the router's order)."""
        return [r for i in self.instances for r in i.ranks]

    @property
    def placements(self) -> list[PoolPlacement]:
        return [i.placement for i in self.instances if i.placement is not None]

    @property
    def helpers(self) -> list[Any]:
        """The other actors the instances hold (rendezvous)."""
        return [i.rendezvous for i in self.instances if i.rendezvous is not None]

    def counts(self) -> dict[str, int]:
        """Instances per role, not counting those draining."""
        out = dict.fromkeys(self.shapes, 0)
        for i in self.instances:
            if i.state != "draining":
                out[i.spec.role] += 1
        return out

    def describe(self, requests_on: Callable[[Sequence[int]], int] | None = None) -> list[dict]:
        """Each instance: name, role, state, ranks (the router's indices), and with
        `requests_on` (`Router.requests_on`) the requests in flight on it."""
        with self._lock:
            instances = list(self.instances)
        out = []
        for i in sorted(instances, key=lambda i: (i.spec.role, i.spec.instance)):
            entry: dict[str, Any] = {
                "name": i.name, "role": i.spec.role, "state": i.state,
                "num_ranks": i.spec.num_ranks, "ranks": list(i.indices),
            }  # fmt: skip
            if requests_on is not None:
                entry["num_requests"] = requests_on(i.indices) if i.indices else 0
            out.append(entry)
        return out

    def shutdown(self) -> None:
        """Release every instance (blocking); instances started later are released by their
        start. A deployment kept on exit (`--keep-pools`) is left running for the next router,
        its record up to date."""
        with self._lock:
            self.stopped = True
            keep = self.deployment is not None and self.keep_on_exit
            instances = [] if keep else self.instances
            if not keep:
                self.instances = []
        if keep:
            self.record()
            logger.warning("deployment %s: its pools keep running for the next `pdserve serve "
                           "--deployment %s` (`pdserve down` removes them)", self.deployment,
                           self.deployment)  # fmt: skip
        for instance in instances:
            instance.release()
        if self.deployment is not None and not keep:
            try:
                dep.delete(self.deployment)
            except Exception as e:
                logger.warning("deployment %s: its record stays: %s", self.deployment, e)
        if self.lease is not None:
            self.lease.release()

    # ---- starting --------------------------------------------------------------------------

    def _start_ranks(self, instance: PoolInstance) -> None:
        start_ranks(instance, self.model_dir, self.config, self._saved, lambda: self.stopped)

    def room_for(self, specs: Sequence[PoolSpec]) -> str | None:
        """On a local Ray (no node will join): why `specs` do not fit in what is free — asked
        again for a few seconds after an instance was released (what it held shows as free
        only a moment later)."""
        if not self.fixed_cluster or not specs:
            return None
        deadline = self.released_at + ROOM_SETTLE_S
        while True:
            problem = self._room_now(specs)
            if problem is None or time.monotonic() > deadline:
                return problem
            time.sleep(0.25)

    def _room_now(self, specs: Sequence[PoolSpec]) -> str | None:
        free, total = ray.available_resources(), ray.cluster_resources()
        # What the autoscaler may still add to the other roles stays theirs.
        counts, roles = self.counts(), {s.role for s in specs}
        headroom = [
            PoolSpec(role, -1, *self.shapes[role])
            for role, (_, high) in self.bounds.items()
            if role not in roles
            for _ in range(max(0, high - counts.get(role, 0)))
        ]
        for resource in sorted({r for s in specs for r in s.bundle}):
            want = sum(s.need(resource) for s in specs)
            kept = sum(s.need(resource) for s in headroom)
            if want > free.get(resource, 0.0) - kept + 1e-9:
                held = f", {kept:g} kept for autoscaling" if kept else ""
                return (
                    f"the new instances need {want:g} {resource}, {free.get(resource, 0.0):g} "
                    f"of {total.get(resource, 0.0):g} are free{held} (a local Ray gets no new "
                    "nodes: serve with --address on a cluster to grow it)"
                )
        return None

    def start_instance(self, spec: PoolSpec, cancelled: Callable[[], bool]) -> PoolInstance:
        """Place and start a new instance and wait for its ranks (blocking; in a thread);
        `cancelled()` turning true (the server stops) ends the wait."""
        instance = PoolInstance(spec, None)  # listed as starting while it waits for a place
        with self._lock:
            if self.stopped:
                raise RuntimeError("the server is shutting down")
            self.instances.append(instance)
        try:  # before its placement group exists (named, detached: it must be found)
            self.record(strict=True)
        except RuntimeError:
            self.forget(instance)
            raise
        try:
            (instance.placement,) = reserve_groups(
                [spec], self.selectors, self.config.placement_timeout_s, cancelled,
                deployment=self.deployment,
            )  # fmt: skip
            self.record()
            if self.stopped:  # the server's shutdown did not see the placement
                raise RuntimeError("the server is shutting down")
            self._start_ranks(instance)
            wait_ranks_ready(instance.ranks, self.config.ready_timeout_s, cancelled=cancelled)
        except BaseException:
            instance.release()
            self.forget(instance)  # after: the record names what may still hold resources
            raise
        return instance

    def forget(self, instance: PoolInstance) -> None:
        with self._lock:
            if instance in self.instances:
                self.instances.remove(instance)
        self.record()

    # ---- scaling (`orchestrator.scaling`) -------------------------------------------------

    def plan(
        self, counts: Mapping[str, int], remove: Sequence[str], gone: Collection[int] = ()
    ) -> tuple[list[PoolSpec], list[PoolInstance]]:
        """The instances to start and to remove (`orchestrator.scaling.plan`)."""
        return scaling.plan(self, counts, remove, gone)

    async def scale(
        self,
        router: Any,
        eplb: Any,
        counts: Mapping[str, int],
        remove: Sequence[str],
        drain_timeout_s: float,
    ) -> ScaleReport:
        """Start and drain instances so that each role of `counts` has that many, after the
        instances named in `remove` go (`orchestrator.scaling.scale`), as a task of its own
        that its caller's cancellation (a client that hangs up) does not stop halfway."""
        task = asyncio.ensure_future(
            scaling.scale(self, router, eplb, counts, remove, drain_timeout_s)
        )
        return await asyncio.shield(task)

    def watch_dead_ranks(self, router: Any, eplb: Any) -> None:
        """Replace the instance of any rank the router finds dead for good
        (`orchestrator.replacement.watch_dead_ranks`); call on the router's loop."""
        replacement.watch_dead_ranks(self, router, eplb)
