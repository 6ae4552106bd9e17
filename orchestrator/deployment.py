"""`pdserve serve --deployment NAME`: pool instances that outlive the router process.

Loading a DeepSeek-V3 checkpoint onto a cluster takes minutes; the router — the `pdserve serve`
process — may crash, be killed, or be upgraded far more often. With `--deployment NAME` (on a
cluster: `--address`) the pools are *detached* Ray actors and placement groups named after
NAME in the Ray namespace `pdserve` (`rank_name`, `rendezvous_name`,
`orchestrator.placement.group_name`), and a record of the deployment — its instances and the
settings its ranks were started with — lives in the GCS's key-value store (`save`, `load`). A
router that dies leaves them running; the next `pdserve serve --deployment NAME` with the same
settings takes them over (`orchestrator.pools.PoolSet.take_over`) in seconds: it finds the
actors by name, has every rank abort the requests the old router left (their clients are
gone; their KV pages are freed) and serves. An instance whose actors are gone is started
again.

One router serves a deployment at a time: it holds a lease, a named actor of its own (not
detached: it dies with the router's process), that a second `serve` finds alive and is refused
by (`Lease`). A take-over is refused too when the settings differ from the record's (other
ranks, model, engine flags: the ranks would not be what was asked for) or when the ranks run
other code than this installation (`code_fingerprint`: the router and ranks exchange pickled
messages) — `pdserve down --deployment NAME` removes the old deployment first.

A graceful stop (SIGTERM, Ctrl-C) removes the deployment as a server without one does, unless
`--keep-pools` (then the next `serve` takes it over: a router upgrade without reloading the
model); `pdserve down` removes one that nothing serves.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NAMESPACE = "pdserve"  # the Ray namespace of every deployment's named actors
_KV_NAMESPACE = "pdserve"
_KV_PREFIX = "deployment/"
RECORD_FORMAT = "pdserve-deployment/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class DeploymentError(RuntimeError):
    """A deployment cannot be served or removed as asked (the message says why and what to do)."""


def check_name(name: str, flag: str = "--deployment") -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{flag} {name!r}: 1 to 63 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit"
        )
    return name


def rank_name(deployment: str, pool: str, rank: int) -> str:
    return f"{deployment}/{pool}/rank-{rank}"


def rendezvous_name(deployment: str, pool: str) -> str:
    return f"{deployment}/{pool}/rendezvous"


@functools.cache
def code_fingerprint() -> str:
    """A hash of the rank-side code of this installation (`workers/`): a router takes over only
    ranks that run what it would start."""
    root = Path(__file__).resolve().parent.parent / "workers"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class InstanceRecord:
    role: str
    instance: int
    num_ranks: int
    bundle: dict[str, float]
    selector: dict[str, str] | None = None
    draining: bool = False  # being scaled down: front routers send it nothing new
    # ... and its drain timeout ended: front routers move their requests off it with their KV
    moving: bool = False

    @property
    def name(self) -> str:
        """Its pool instance's name (`orchestrator.placement.PoolSpec.name`)."""
        return f"{self.role}-{self.instance}"


@dataclass
class DeploymentRecord:
    """What the GCS keeps of a deployment."""

    name: str
    code: str  # `code_fingerprint` of the installation that started its ranks
    settings: dict[str, Any]  # `settings_of`: what its ranks were started with
    instances: list[InstanceRecord] = field(default_factory=list)
    next: dict[str, int] = field(default_factory=dict)  # each role's next instance number
    selectors: dict[str, dict[str, str]] = field(default_factory=dict)  # per role
    # Its router replaces an instance whose rank is dead for good (front routers' requests
    # then wait for the new one: `orchestrator.front`).
    replaces: bool = True
    # The instances it is replacing now (dead for good; they leave the record before their
    # replacement joins it): front routers' requests wait for those, not for one scaled down.
    replacing: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        # (Added later, left out when unset: a router of an older version reads on.)
        for instance in raw["instances"]:
            if not instance["moving"]:
                del instance["moving"]
        if not raw["replacing"]:
            del raw["replacing"]
        return json.dumps({"format": RECORD_FORMAT, **raw})

    @classmethod
    def from_json(cls, text: str) -> DeploymentRecord:
        raw = json.loads(text)
        if raw.pop("format", None) != RECORD_FORMAT:
            raise DeploymentError(f"the deployment record is not {RECORD_FORMAT}")
        # Fields a newer router added are left out: a router of this version reads on.
        raw = _known(cls, raw)
        raw["instances"] = [InstanceRecord(**_known(InstanceRecord, i)) for i in raw["instances"]]
        return cls(**raw)


def _known(cls: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """The entries of `raw` that are fields of dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def settings_of(config: Any, model_dir: Path) -> dict[str, Any]:
    """What a deployment's ranks are started with: a take-over needs the same."""
    engine = dataclasses.asdict(config.engine)
    return json.loads(json.dumps({
        "model": str(model_dir),
        "engine": engine,
        "transfer_backend": config.transfer_backend,
        "transfer_timeout_s": config.transfer_timeout_s,
        "allow_fault_injection": config.allow_fault_injection,
        # The shape of an instance, not how many: a router that takes over after a scale
        # need not repeat the instance counts the first one started with.
        "topology": {"colocated": config.colocated, "num_ranks": config.num_ranks,
                     "prefill_dp": config.prefill_dp, "decode_dp": config.decode_dp},
    }, default=str))  # fmt: skip


def differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The settings that differ, as `key: recorded -> wanted`."""
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differences(a, b)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _kv() -> tuple[Any, Any, Any]:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get, internal_kv._internal_kv_put, internal_kv._internal_kv_del


def load(name: str) -> DeploymentRecord | None:
    get, _, _ = _kv()
    raw = get(_KV_PREFIX + name, namespace=_KV_NAMESPACE)
    return None if raw is None else DeploymentRecord.from_json(raw.decode())


def save(record: DeploymentRecord) -> None:
    _, put, _ = _kv()
    put(_KV_PREFIX + record.name, record.to_json(), overwrite=True, namespace=_KV_NAMESPACE)


def list_names() -> list[str]:
    """The deployments recorded in this Ray cluster."""
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list(_KV_PREFIX, namespace=_KV_NAMESPACE)
    return sorted(k.decode()[len(_KV_PREFIX) :] for k in keys)


def delete(name: str) -> None:
    _, _, delete_key = _kv()
    delete_key(_KV_PREFIX + name, namespace=_KV_NAMESPACE)


class _RouterLease:
    """The named actor a router of a deployment holds (see the module doc)."""

    def __init__(self, holder: str):
        self.holder = holder

    def who(self) -> str:
        return self.holder


class Lease:
    """The one router of a deployment: `acquire` raises DeploymentError while another lives."""

    def __init__(self, name: str):
        self.name = name
        self.handle: Any = None

    def acquire(self, timeout_s: float = 10.0) -> None:
        import ray

        holder = f"pdserve serve pid {os.getpid()} on {socket.gethostname()}"
        actor = ray.remote(_RouterLease).options(
            name=f"{self.name}/router", namespace=NAMESPACE, num_cpus=0
        )
        try:
            self.handle = actor.remote(holder)
            return
        except ValueError:  # the name is taken: is its holder alive?
            pass
        who: str | None
        try:
            other = ray.get_actor(f"{self.name}/router", namespace=NAMESPACE)
            who = str(ray.get(other.who.remote(), timeout=timeout_s))
        except Exception:  # it died meanwhile (its process is gone): the name frees shortly
            who = None
        if who is not None:
            raise DeploymentError(
                f"deployment {self.name!r} is served by {who}: stop that one first (SIGTERM), "
                "or serve another --deployment"
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.handle = actor.remote(holder)
                return
            except ValueError:
                if time.monotonic() > deadline:
                    raise DeploymentError(
                        f"deployment {self.name!r}: its last router's lease is still held"
                    ) from None
                time.sleep(0.2)

    def release(self) -> None:
        import ray

        if self.handle is not None:
            try:
                ray.kill(self.handle)
            except Exception as e:
                logger.debug("releasing the lease of %s: %s", self.name, e)
            self.handle = None


def front_lease(name: str, tag: str) -> Any:
    """The named actor a front router of deployment `name` holds while it serves (not
    detached: it dies with the router's process), by which `pdserve down` sees it
    (`live_fronts`). The caller keeps the handle: Ray ends the actor with its last one."""
    import ray

    holder = f"front router {tag} (pdserve serve pid {os.getpid()} on {socket.gethostname()})"
    return (
        ray.remote(_RouterLease)
        .options(name=f"{name}/front-{tag}", namespace=NAMESPACE, num_cpus=0)
        .remote(holder)
    )


def live_fronts(name: str) -> list[str]:
    """The front routers serving deployment `name` now (their leases' holders)."""
    import ray
    from ray.util import list_named_actors

    prefix = f"{name}/front-"
    holders = []
    for actor in list_named_actors(all_namespaces=True):
        if actor.get("namespace") != NAMESPACE or not actor["name"].startswith(prefix):
            continue
        try:
            lease = ray.get_actor(actor["name"], namespace=NAMESPACE)
            holders.append(str(ray.get(lease.who.remote(), timeout=5)))
        except Exception:  # it died meanwhile
            continue
    return holders


def tear_down(name: str) -> list[str]:
    """Remove deployment `name` (its ranks, rendezvous, placement groups and record), whether
    or not a router serves it; what was removed, by name."""
    from orchestrator.placement import PoolSpec

    record = load(name)
    if record is None:
        raise DeploymentError(f"no deployment {name!r} in this Ray cluster")
    removed = []
    for inst in record.instances:
        removed += remove_instance(name, PoolSpec(inst.role, inst.instance, inst.num_ranks,
                                                  inst.bundle))  # fmt: skip
    delete(name)
    return removed


def remove_instance(name: str, spec: Any) -> list[str]:
    """Kill what of deployment `name`'s instance `spec` is there (ranks, rendezvous) and
    remove its placement group, by name; what was removed."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    from orchestrator.placement import group_name

    removed = []
    names = [rank_name(name, spec.name, i) for i in range(spec.num_ranks)]
    names += [rendezvous_name(name, spec.name)] if spec.num_ranks > 1 else []
    for actor_name in names:
        try:
            ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
            removed.append(actor_name)
        except ValueError:
            pass  # gone already
    try:
        remove_placement_group(get_placement_group(group_name(name, spec)))
        removed.append(group_name(name, spec))
    except ValueError:
        pass
    return removed
