"""The pool instances of a server: starting them, and changing how many serve while it runs.

A pool instance is `--prefill-dp` / `--decode-dp` / `--dp` engine ranks in a placement group of
their own (`orchestrator.placement`), with a `Rendezvous` actor when they are several (expert
parallel). `PoolSet` owns every instance a server started, and scales them (`POST /admin/scale`,
`pdserve scale`):

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
  yet starts again; see `Router.generate`). Then the router takes its ranks' last stats and forgets them, and its
  actors, rendezvous and placement group go.

One scale runs at a time; every role keeps at least one instance, an autoscaled one stays
within its bounds (`bounds`).

- **Replacing a dead instance.** A rank that dies is restarted by Ray; one whose actor is dead
  for good (its constructor failed — the model did not load, a GPU fault — or it was killed
  for good) would leave its instance down for good. With `watch_dead_ranks` (the default;
  `--disable-instance-replacement` turns it off) the router reports such a rank and the
  instance is replaced: taken down at once (nothing runs on it; its placement group goes
  first, so that a full cluster has room for the new one), then a new instance of its role
  is started, retried with a growing delay (`REPLACE_RETRY_S`, up to `REPLACE_RETRY_MAX_S`)
  while it fails to start, until the role is back to its count. Requests that waited for
  a rank of it (`--rank-restart-wait`) resume on the new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import ray

from orchestrator import deployment as dep
from orchestrator.config import ServeConfig
from orchestrator.placement import (
    PoolPlacement,
    PoolSpec,
    group_name,
    place_pools,
    remove_placements,
    reserve_groups,
)

logger = logging.getLogger(__name__)

MAX_INSTANCES = 256  # per role: a typo's guard (each instance is a placement group and ranks)
# On a local Ray, how long a scale-up waits for what an instance just removed held to show as
# free before it is refused for want of room.
ROOM_SETTLE_S = 5.0

PLACEMENT_FORMAT = "pdserve-expert-placement/1"

# A replacement of a dead instance that fails to start is tried again after this long, doubled
# each time up to the maximum.
REPLACE_RETRY_S = 10.0
REPLACE_RETRY_MAX_S = 300.0
# A scaled-down decode instance waits for its requests' KV migrations up to the transfer
# timeout and this much more (a request leaves its rank at that rank's next step).
MIGRATION_SLACK_S = 5.0


def read_expert_placements(path: str | None) -> dict[str, list[list[int]]]:
    """Saved placements per pool name (`pdserve rebalance --dump`); {} without a file."""
    if path is None:
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PLACEMENT_FORMAT:
        raise ValueError(f"{path} is not a saved expert placement ({PLACEMENT_FORMAT})")
    pools = data.get("pools")
    if not isinstance(pools, dict):
        raise ValueError(f"{path}: 'pools' must map pool names to phy2log lists")
    return {str(k): v for k, v in pools.items()}


def pool_specs(config: ServeConfig, num_gpus: float) -> list[PoolSpec]:
    """The topology's pool instances and what each rank needs (CPUs; a GPU, or an equal share
    of the cluster's GPUs when there are fewer GPUs than ranks, e.g. a prefill and a decode rank
    on one GPU)."""
    engine = config.engine
    use_gpu = engine.device == "cuda" or (engine.device == "auto" and num_gpus > 0)
    if config.colocated:
        layout = [("colocated", 0, config.num_ranks)]
    else:
        layout = [("prefill", i, config.prefill_dp) for i in range(config.prefill_instances)]
        layout += [("decode", i, config.decode_dp) for i in range(config.decode_instances)]
    total_ranks = sum(n for _, _, n in layout)
    bundle: dict[str, float] = {"CPU": float(engine.num_threads or 1)}
    if use_gpu and num_gpus:
        bundle["GPU"] = min(1.0, num_gpus / total_ranks)
    return [PoolSpec(role, i, n, bundle) for role, i, n in layout]


def starts_local_ray(config: ServeConfig) -> bool:
    """`ray.init` will start a Ray of its own (`ServeConfig.starts_local_ray`)."""
    return config.starts_local_ray


# ---- ranks -----------------------------------------------------------------------------------


class RankStartError(RuntimeError):
    """A rank raised while it started (loading the model, joining its pool)."""


def start_error(e: BaseException) -> str:
    """What went wrong in a rank that failed to start, without the Ray traceback around it:
    the last `SomeError: message` line of the remote traceback, else the first line."""
    text = str(e).strip()
    for line in reversed(text.splitlines()):
        name, sep, message = line.partition(": ")
        name = name.rpartition(".")[2]  # safetensors_rust.SafetensorError: ...
        if sep and name.isidentifier() and name[:1].isupper() and name.endswith(_ERROR_ENDINGS):
            return f"{name}: {message}"
    return text.splitlines()[0] if text else type(e).__name__


_ERROR_ENDINGS = ("Error", "Exception", "Exit", "Interrupt")


def wait_ranks_ready(
    ranks: list[Any],
    timeout_s: float,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Block until every rank's model is loaded; `progress(elapsed_s)` is called every ~5 s.
    Raises TimeoutError, or the rank's own error if it failed to start; RuntimeError once
    `cancelled()` turns true."""
    refs = [r.ready.remote() for r in ranks]
    start = time.monotonic()
    while True:
        wait_s = 5.0 if cancelled is None else 1.0
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        if pending and cancelled is not None and cancelled():
            raise RuntimeError("cancelled: the server is shutting down")
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                raise RankStartError(
                    f"engine rank {refs.index(ref)} failed to start: {start_error(e)}"
                ) from e
        if not pending:
            return
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            raise TimeoutError(f"{len(pending)} rank(s) not ready after {timeout_s:.0f} s")
        if progress is not None:
            progress(elapsed)


def shutdown_ranks(ranks: list[Any], timeout_s: float = 15.0) -> None:
    """Stop each rank's loop, then kill its actor (freeing its resources in the cluster)."""
    refs = [r.shutdown.remote() for r in ranks]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    kill_actors(ranks)


def kill_actors(actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception as e:  # already gone
            logger.debug("ray.kill of an actor failed: %s", e)


# ---- instances -------------------------------------------------------------------------------


@dataclass
class PoolInstance:
    """One pool instance and what it holds in the cluster."""

    spec: PoolSpec
    placement: PoolPlacement | None  # None while a scale-up waits for the cluster to place it
    ranks: list[Any] = field(default_factory=list)  # actor handles in pool rank order
    rendezvous: Any = None  # its pool group's meeting point, when it has several ranks
    indices: list[int] = field(default_factory=list)  # the router's indices of its ranks
    state: str = "starting"  # starting | serving | draining

    @property
    def name(self) -> str:
        return self.spec.name

    def release(self) -> None:
        """Shut its ranks down and give back what it holds in the cluster (blocking)."""
        shutdown_ranks(self.ranks)
        kill_actors([self.rendezvous] if self.rendezvous is not None else [])
        remove_placements([self.placement] if self.placement is not None else [])


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


class PoolSet:
    """The pool instances a server started (see the module doc). `start` places and starts
    the topology's instances; `scale` changes them while the server serves."""

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
        self._shape = {i.spec.role: (i.spec.num_ranks, i.spec.bundle) for i in instances}
        self._next = {role: 1 + max(i.spec.instance for i in instances if i.spec.role == role)
                      for role in self._shape}  # fmt: skip
        self._saved = read_expert_placements(config.init_expert_placement)
        self._lock = threading.Lock()  # `instances`, changed on the loop and in start threads
        self._released_at = -math.inf  # when an instance was last scaled down
        self.num_replaced = dict.fromkeys((i.spec.role for i in instances), 0)  # dead ones
        self._replacing: dict[str, asyncio.Task[None]] = {}  # by the dead instance's name
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

    def _record(self) -> None:
        """Write the deployment's record (with `--deployment`) after its instances changed:
        a router that dies now leaves nothing the next one does not know of."""
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
                    )
                    for i in self.instances  # those still waiting for a place too: their
                ]  # placement group exists, named, from the moment it is asked for  # fmt: skip
            record = dep.DeploymentRecord(
                self.deployment, dep.code_fingerprint(), self._settings, instances,
                dict(self._next), dict(self.selectors),
            )  # fmt: skip
            try:
                dep.save(record)
                self._recorded = True
            except Exception as e:  # the GCS is unreachable: serving goes on
                logger.error("deployment %s: its record was not saved: %s", self.deployment, e)

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
        pools._record()
        try:
            placements, pools.selectors = place_pools(
                specs, config.placement_timeout_s, fixed_cluster=starts_local_ray(config),
                deployment=config.deployment,
            )  # fmt: skip
        except BaseException:
            pools.shutdown()
            raise
        for instance, placement in zip(pools.instances, placements, strict=True):
            instance.placement = placement
        pools._record()
        try:
            offset = 0
            for instance in pools.instances:
                pools._start_ranks(instance)
                instance.indices = list(range(offset, offset + len(instance.ranks)))
                instance.state = "serving"
                offset += len(instance.ranks)
        except BaseException:
            pools.shutdown()
            raise
        return pools

    @classmethod
    def take_over(cls, model_dir: Path, config: ServeConfig, record: Any) -> PoolSet:
        """The instances of the deployment in `record` (`orchestrator.deployment`), found by
        name; one whose actors or placement group are gone is released and a new instance of
        its role started in its place (not waiting for its model)."""
        from ray.util.placement_group import get_placement_group

        found: list[PoolInstance] = []
        broken: list[PoolInstance] = []
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
                logger.warning("deployment %s: %s is incomplete (%s); starting another in its "
                               "place", record.name, spec.name, e)  # fmt: skip
                broken.append(instance)
                continue
            found.append(instance)
        if not found and not broken:
            raise dep.DeploymentError(
                f"deployment {record.name!r} holds no pool instance: remove it with `pdserve "
                f"down --deployment {record.name}` and serve again"
            )
        pools = cls(model_dir, config, found + broken, dict(record.selectors))
        for role, n in record.next.items():
            pools._next[role] = max(pools._next.get(role, 0), n)
        for instance in broken:
            dep.remove_instance(record.name, instance.spec)
            pools._forget(instance)  # after: the record names what may still hold resources
            spec = PoolSpec(instance.spec.role, pools._next[instance.spec.role],
                            instance.spec.num_ranks, dict(instance.spec.bundle))  # fmt: skip
            pools._next[spec.role] += 1
            (placement,) = reserve_groups([spec], pools.selectors, config.placement_timeout_s,
                                          deployment=record.name)  # fmt: skip
            fresh = PoolInstance(spec, placement, state="serving")
            with pools._lock:
                pools.instances.append(fresh)
            pools._record()
            pools._start_ranks(fresh)
        offset = 0
        for instance in pools.instances:
            instance.indices = list(range(offset, offset + len(instance.ranks)))
            offset += len(instance.ranks)
        pools._record()
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
        out = dict.fromkeys(self._shape, 0)
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
            self._record()
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
        """Start the rank actors (and rendezvous) of a placed instance, not waiting for them."""
        from workers.engine.launch import start_engine_rank
        from workers.ep.group import PoolMember, Rendezvous

        spec, config, placement = instance.spec, self.config, instance.placement
        assert placement is not None
        named: dict[str, Any] = {}
        if self.deployment is not None:
            named = {"namespace": dep.NAMESPACE, "lifetime": "detached"}
        if spec.num_ranks > 1:
            options = dict(named)
            if self.deployment is not None:
                options["name"] = dep.rendezvous_name(self.deployment, spec.name)
            instance.rendezvous = (
                ray.remote(Rendezvous)
                .options(num_cpus=0, max_restarts=-1, **options)
                .remote(spec.num_ranks)
            )
        share = spec.bundle.get("GPU", 0.0)
        engine = dataclasses.replace(config.engine, gpu_memory_share=share or 1.0)
        for i in range(spec.num_ranks):
            if self.stopped:  # the server stopped while this instance started: it went too
                raise RuntimeError("the server is shutting down")
            member = (
                PoolMember(i, spec.num_ranks, instance.rendezvous) if spec.num_ranks > 1 else None
            )
            instance.ranks.append(
                start_engine_rank(
                    str(self.model_dir),
                    engine,
                    num_cpus=spec.bundle["CPU"],
                    num_gpus=spec.bundle.get("GPU", 0.0),
                    role=spec.role,
                    instance=spec.instance,
                    transfer_backend=config.transfer_backend,
                    transfer_timeout_s=config.transfer_timeout_s,
                    allow_fault_injection=config.allow_fault_injection,
                    scheduling_strategy=placement.strategy(i),
                    pool=member,
                    initial_phy2log=self._saved.get(spec.name) if member else None,
                    checkpoint=config.checkpoint,
                    name=dep.rank_name(self.deployment, spec.name, i)
                    if self.deployment is not None
                    else None,
                    namespace=named.get("namespace"),
                    detached=bool(named),
                    migration=config.colocated_migration,
                )
            )

    def _room(self, specs: Sequence[PoolSpec]) -> str | None:
        """On a local Ray (no node will join): why `specs` do not fit in what is free — asked
        again for a few seconds after an instance was released (what it held shows as free
        only a moment later)."""
        if not self.fixed_cluster or not specs:
            return None
        deadline = self._released_at + ROOM_SETTLE_S
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
            PoolSpec(role, -1, *self._shape[role])
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

    def _start_instance(self, spec: PoolSpec, cancelled: Callable[[], bool]) -> PoolInstance:
        """Place and start a new instance and wait for its ranks (blocking; in a thread);
        `cancelled()` turning true (the server stops) ends the wait."""
        instance = PoolInstance(spec, None)  # listed as starting while it waits for a place
        with self._lock:
            if self.stopped:
                raise RuntimeError("the server is shutting down")
            self.instances.append(instance)
        self._record()  # before its placement group exists (named, detached: it must be found)
        try:
            (instance.placement,) = reserve_groups(
                [spec], self.selectors, self.config.placement_timeout_s, cancelled,
                deployment=self.deployment,
            )  # fmt: skip
            self._record()
            if self.stopped:  # the server's shutdown did not see the placement
                raise RuntimeError("the server is shutting down")
            self._start_ranks(instance)
            wait_ranks_ready(instance.ranks, self.config.ready_timeout_s, cancelled=cancelled)
        except BaseException:
            instance.release()
            self._forget(instance)  # after: the record names what may still hold resources
            raise
        return instance

    def _forget(self, instance: PoolInstance) -> None:
        with self._lock:
            if instance in self.instances:
                self.instances.remove(instance)
        self._record()

    # ---- scaling ---------------------------------------------------------------------------

    def plan(
        self, counts: Mapping[str, int], remove: Sequence[str]
    ) -> tuple[list[PoolSpec], list[PoolInstance]]:
        """The instances to start and to remove for `counts` (instances per role) after
        removing the instances named in `remove`. ScaleError when it cannot be done."""
        for role, n in counts.items():
            if role not in self._shape:
                roles = ", ".join(sorted(self._shape))
                raise ScaleError(f"{role}: this server's pools are {roles}", role)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ScaleError(f"{role}: the number of instances must be an integer >= 1", role)
            if n > MAX_INSTANCES:
                raise ScaleError(f"{role}: at most {MAX_INSTANCES} instances", role)
            low, high = self.bounds.get(role, (1, MAX_INSTANCES))
            if not low <= n <= high:
                raise ScaleError(
                    f"{role}: the autoscaler keeps it between {low} and {high} instances (the "
                    "count it started with and --max-*-instances): ask within that", role,
                )  # fmt: skip
        by_name = {i.name: i for i in self.instances}
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
        for role, (num_ranks, bundle) in sorted(self._shape.items()):
            staying = [i for i in self.instances
                       if i.spec.role == role and i.state == "serving" and i not in leaving]  # fmt: skip
            low = self.bounds.get(role, (1, MAX_INSTANCES))[0]  # autoscaled: its minimum
            want = counts.get(role, max(len(staying), low))
            newest_first = sorted(staying, key=lambda i: -i.spec.instance)
            leaving += newest_first[: max(0, len(staying) - want)]
            first = self._next[role]
            start += [PoolSpec(role, first + k, num_ranks, bundle)
                      for k in range(max(0, want - len(staying)))]  # fmt: skip
        return start, leaving

    async def scale(
        self,
        router: Any,
        eplb: Any,
        counts: Mapping[str, int],
        remove: Sequence[str],
        drain_timeout_s: float,
    ) -> ScaleReport:
        """Start and drain instances so that each role of `counts` has that many, after the
        instances named in `remove` go (see the module doc); runs on the router's loop, as a
        task of its own that its caller's cancellation (a client that hangs up) does not stop
        halfway. ScaleError for a request that cannot be done, ScaleInProgress while another
        runs, ServerStopping once the server drains to stop."""
        task = asyncio.ensure_future(self._scale(router, eplb, counts, remove, drain_timeout_s))
        return await asyncio.shield(task)

    async def _scale(
        self,
        router: Any,
        eplb: Any,
        counts: Mapping[str, int],
        remove: Sequence[str],
        drain_timeout_s: float,
    ) -> ScaleReport:
        if self.stopped or router.draining:
            raise ServerStopping("the server is shutting down")
        if self.scaling:
            raise ScaleInProgress("a scale is already running")
        self.scaling = True  # before any await: a second scale is refused from here on
        began = time.monotonic()
        report = ScaleReport()
        try:
            start, leaving = self.plan(counts, remove)
            problem = await asyncio.to_thread(self._room, start)
            if problem:
                raise ScaleError(f"cannot scale up: {problem}", start[0].role)
            for spec in start:  # taken: not reused, whether it starts or not
                self._next[spec.role] = max(self._next[spec.role], spec.instance + 1)
            if start:
                logger.info("scaling: starting %s", ", ".join(s.name for s in start))
            # A thread each: placements that wait for the cluster wait side by side.
            with ThreadPoolExecutor(max(1, len(start)), "pdserve-scale") as threads:
                results = await asyncio.gather(
                    *(self._bring_up(router, eplb, spec, threads) for spec in start),
                    return_exceptions=True,
                )
            for spec, result in zip(start, results, strict=True):
                if isinstance(result, BaseException):
                    logger.error("scaling: %s did not start: %s", spec.name, result)
                    report.failed.append({"pool": spec.name, "error": str(result)})
                else:
                    report.started.append(spec.name)
            leaving = self._keep_one_per_role(leaving, report)
            moved = await asyncio.gather(
                *(self._take_down(router, eplb, i, drain_timeout_s) for i in leaving)
            )
            report.removed = [i.name for i in leaving]
            report.requests_migrated = sum(m.migrated for m in moved)
            report.requests_resumed = sum(m.resumed for m in moved)
            if self.config.kv_migration and any(
                spec.role != "prefill" and spec.name in report.started for spec in start
            ):  # new instances take running requests with their KV, not only new ones
                balanced = await self._balance(router)
                report.requests_migrated += balanced.migrated
                report.requests_resumed += balanced.resumed
            report.requests_retried = sum(m.retried for m in moved)
        finally:
            self.scaling = False
            report.seconds = time.monotonic() - began
        logger.info(
            "scaling done in %.1f s: started %s, removed %s%s", report.seconds,
            report.started or "none", report.removed or "none",
            f", failed {report.failed}" if report.failed else "",
        )  # fmt: skip
        return report

    async def _balance(self, router: Any) -> Moved:
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
            until = time.monotonic() + self.config.transfer_timeout_s + MIGRATION_SLACK_S
            while router.moves.under_way() and time.monotonic() < until and not self.stopped:
                await asyncio.sleep(0.02)
        after = router.moves.moved_off(everyone)
        return Moved(after[0] - before[0], after[1] - before[1], 0)

    def _keep_one_per_role(
        self, leaving: list[PoolInstance], report: ScaleReport
    ) -> list[PoolInstance]:
        """`leaving`, less what would leave a role with no serving instance (its replacement
        did not start): those stay, reported as failed."""
        out = []
        for instance in leaving:
            role = instance.spec.role
            if any(i.spec.role == role and i.state == "serving" and i not in leaving
                   for i in self.instances):  # fmt: skip
                out.append(instance)
            else:
                report.failed.append(
                    {"pool": instance.name, "error": "kept: its replacement did not start"}
                )
        return out

    async def _bring_up(
        self, router: Any, eplb: Any, spec: PoolSpec, threads: ThreadPoolExecutor
    ) -> None:
        def cancelled() -> bool:  # the server drains to stop: a new instance would not serve
            return self.stopped or self.stopping or router.draining

        loop = asyncio.get_running_loop()
        instance = await loop.run_in_executor(threads, self._start_instance, spec, cancelled)
        try:
            instance.indices = await router.add_ranks(instance.ranks)
            if eplb is not None and spec.num_ranks > 1:
                await eplb.add_pool.remote(self._eplb_handle(instance))
        except BaseException:
            if instance.indices:
                await router.remove_ranks(instance.indices, f"{spec.name} failed to start")
            await asyncio.to_thread(instance.release)
            self._forget(instance)
            raise
        instance.state = "serving"
        self.num_started[spec.role] += 1

    # ---- replacing dead instances ------------------------------------------------------------

    def watch_dead_ranks(self, router: Any, eplb: Any) -> None:
        """Replace the instance of any rank the router finds dead for good (see the module
        doc); call on the router's loop."""

        def gone(index: int) -> None:
            instance = next((i for i in self.instances
                             if index in i.indices and i.state == "serving"), None)  # fmt: skip
            if instance is None or instance.name in self._replacing or self.stopped:
                return
            if self.deployment_removed():
                return
            router.num_replacing += 1  # now: requests waiting for a rank wait for this one
            task = asyncio.ensure_future(self._replace(router, eplb, instance))
            self._replacing[instance.name] = task

        router.on_rank_gone = gone

    async def _replace(self, router: Any, eplb: Any, dead: PoolInstance) -> None:
        """Take `dead` down and start instances of its role until it has its count again."""
        role = dead.spec.role
        try:
            while self.scaling:  # one change at a time (a scale, the autoscaler, another)
                if self.stopped or self.stopping or router.draining:
                    return
                await asyncio.sleep(0.2)
            want = self.counts()[role]
            logger.error("pool instance %s has a rank that is dead for good; replacing it",
                         dead.name)  # fmt: skip
            self.scaling = True
            try:
                await self._take_down(router, eplb, dead, 0.0, migrate=False)
            finally:
                self.scaling = False
            delay = REPLACE_RETRY_S
            while self.counts()[role] < want:
                if self.stopped or self.stopping or router.draining:
                    return
                if self.scaling:
                    await asyncio.sleep(0.2)
                    continue
                spec = PoolSpec(role, self._next[role], *self._shape[role])
                self._next[role] += 1
                self.scaling = True
                try:
                    with ThreadPoolExecutor(1, "pdserve-replace") as threads:
                        await self._bring_up(router, eplb, spec, threads)
                except Exception as e:
                    logger.error("replacing %s: %s did not start (%s); trying again in %.0f s",
                                 dead.name, spec.name, e, delay)  # fmt: skip
                else:
                    self.num_replaced[role] += 1
                    logger.warning("replaced pool instance %s by %s", dead.name, spec.name)
                    continue
                finally:
                    self.scaling = False
                await asyncio.sleep(delay)
                delay = min(2 * delay, REPLACE_RETRY_MAX_S)
        finally:
            self._replacing.pop(dead.name, None)
            router.num_replacing -= 1
            router.wake_waiting()

    def _eplb_handle(self, instance: PoolInstance) -> Any:
        from eplb.service import PoolHandle
        from workers.model.config import ModelConfig

        num_groups = ModelConfig.from_dir(self.model_dir).n_group
        return PoolHandle(instance.name, list(instance.ranks), num_groups)

    async def _take_down(
        self,
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
        if eplb is not None and instance.spec.num_ranks > 1:
            try:  # first: no rebalance starts on it while it drains
                await eplb.remove_pool.remote(instance.name)
            except Exception as e:
                logger.warning("scaling: the EPLB service kept %s: %s", instance.name, e)
        began = time.monotonic()
        # Its requests run on while the server drains to stop too (that drain bounds them);
        # only the stop itself (`stopping`) ends the wait early.
        while router.requests_on(instance.indices) and not (self.stopping or self.stopped):
            if time.monotonic() - began >= drain_timeout_s:
                break
            await asyncio.sleep(0.05)
        moved_before = router.moves.moved_off(instance.indices)
        if (
            migrate and self.config.kv_migration and router.moves.can_move_from(instance.indices)
        ):  # fmt: skip
            # Each request leaves at its rank's next step and its KV moves as from a prefill
            # rank; one whose prompt a prefill rank computes for this instance is asked once
            # its first token came from here. Bounded by the transfer timeout: what is left
            # then resumes from its output (a failed move too), or starts again elsewhere (one
            # queued here).
            until = time.monotonic() + self.config.transfer_timeout_s + MIGRATION_SLACK_S
            candidates = router.moves.candidates(instance.indices)
            while not (self.stopping or self.stopped):
                router.moves.move_from(instance.indices, candidates)
                if not router.moves.pending(instance.indices) or time.monotonic() >= until:
                    break
                await asyncio.sleep(0.02)
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
        self._forget(instance)  # after: a router that dies meanwhile leaves it recorded
        self._released_at = time.monotonic()
        self.num_removed[instance.spec.role] += 1
        return Moved(migrated, resumed, retried)


def drain_seconds(value: Any, default: float) -> float:
    """A scale request's `drain_timeout_s`: finite, >= 0."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < math.inf):
        raise ScaleError("drain_timeout_s: seconds, a finite number >= 0", "drain_timeout_s")
    return float(value)
