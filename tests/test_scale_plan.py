"""`orchestrator.scaling.plan` and the check before instances leave, on pool sets built by hand:
an instance with a rank dead for good serves nothing, so it neither counts for its role nor
keeps a live one from being the last of it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator import scaling
from orchestrator.placement import PoolSpec
from orchestrator.pool_instance import PoolInstance

pytestmark = pytest.mark.timeout(30)

BUNDLE = {"CPU": 1.0}


def _instance(number: int, index: int) -> PoolInstance:
    return PoolInstance(PoolSpec("decode", number, 1, BUNDLE), None, indices=[index],
                        state="serving")  # fmt: skip


def _pools(*instances: PoolInstance) -> Any:
    return SimpleNamespace(shapes={"decode": (1, BUNDLE)}, bounds={}, instances=list(instances),
                           next_number={"decode": len(instances)})  # fmt: skip


def test_a_scale_down_takes_the_dead_instance_before_the_newest():
    d0, d1 = _instance(0, 0), _instance(1, 1)
    pools = _pools(d0, d1)
    assert scaling.plan(pools, {"decode": 1}, []) == ([], [d1])  # all alive: the newest
    # decode-0's rank is dead for good (no replacement, or one waiting behind this scale).
    assert scaling.plan(pools, {"decode": 1}, [], gone={0}) == ([], [d0])


def test_no_role_is_left_without_a_live_instance():
    d0, d1 = _instance(0, 0), _instance(1, 1)
    pools = _pools(d0, d1)
    # decode-1 named to go, its replacement (decode-2) did not start, decode-0 is dead: it
    # stays; the dead one may always go.
    report = scaling.ScaleReport()
    assert scaling._keep_one_per_role(pools, [d1], report, gone={0}) == []
    assert report.failed == [{"pool": "decode-1", "error": "kept: its replacement did not start"}]
    assert scaling._keep_one_per_role(pools, [d0, d1], scaling.ScaleReport(), gone={0}) == [d0]
    assert scaling._keep_one_per_role(pools, [d1], scaling.ScaleReport(), gone=set()) == [d1]


def test_a_take_over_ends_the_scale_down_the_router_before_stopped_in(monkeypatch):
    """The deployment's record names an instance being scaled down (its router stopped in the
    middle): the router that takes over removes it rather than serve it again. (Found by an
    audit: it was kept as serving and the record's mark dropped.)"""
    import sys

    import ray
    import ray.util.placement_group  # noqa: F401  (the module: its function has its name)

    from orchestrator import deployment as dep
    from orchestrator.config import ServeConfig
    from orchestrator.pools import PoolSet

    saved: dict[str, Any] = {}
    removed: list[str] = []
    monkeypatch.setattr(dep, "save", lambda record: saved.__setitem__("record", record))
    monkeypatch.setattr(dep, "load", lambda name: saved.get("record"))
    monkeypatch.setattr(dep, "code_fingerprint", lambda: "code")
    monkeypatch.setattr(dep, "settings_of", lambda config, model_dir: {})
    monkeypatch.setattr(dep, "remove_instance",
                        lambda name, spec: removed.append(spec.name) or [])  # fmt: skip
    placement_groups = sys.modules["ray.util.placement_group"]
    monkeypatch.setattr(placement_groups, "get_placement_group", lambda name: f"group {name}")
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None: f"actor {name}")

    def instance(role: str, number: int, draining: bool = False) -> Any:
        return dep.InstanceRecord(role, number, 1, BUNDLE, draining=draining, moving=draining)

    record = dep.DeploymentRecord("d", "code", {}, [
        instance("decode", 0), instance("decode", 1, draining=True), instance("prefill", 0),
        instance("prefill", 1, draining=True),
    ], {"decode": 2, "prefill": 2}, {})  # fmt: skip
    # A role whose every instance drains keeps one (a scale-down never leaves a role empty).
    record.instances[2].draining = True
    pools = PoolSet.take_over(
        Path("/no-model"), ServeConfig(deployment="d", ray_address="127.0.0.1:1"), record
    )
    assert removed == ["decode-1", "prefill-1"]
    assert [(i.name, i.state) for i in pools.instances] == [
        ("decode-0", "serving"),
        ("prefill-0", "serving"),
    ]
    assert [(i.name, i.draining) for i in saved["record"].instances] == [
        ("decode-0", False),
        ("prefill-0", False),
    ]


def test_a_front_router_waits_for_a_replaced_instance_not_for_one_scaled_down(monkeypatch):
    """A front router sees a rank die for good before the record says why: requests that lost
    it wait (`num_replacing`) while the primary replaces its instance (the record's
    `replacing`), and stop waiting once the record shows it was scaled down instead. (Found by
    an audit: the count stayed up after a scale-down, and requests waited 120 s for nothing.)"""
    import asyncio

    from orchestrator import deployment as dep
    from orchestrator.front import FrontWatch

    class Router:
        num_replacing = 0

        def __init__(self) -> None:
            self.ranks = SimpleNamespace(closed=set())
            self.removed: list[list[int]] = []

        def wake_waiting(self) -> None:
            pass

        async def remove_ranks(self, indices: list[int], why: str) -> None:
            self.removed.append(indices)

    def record(names: list[str], replacing: list[str]) -> dep.DeploymentRecord:
        instances = [dep.InstanceRecord("decode", int(n[-1]), 1, BUNDLE) for n in names]
        return dep.DeploymentRecord("d", "code", {}, instances, replacing=replacing)

    async def run() -> None:
        router = Router()
        watch = FrontWatch(router, "d", {"decode-0": [0], "decode-1": [1]})  # type: ignore[arg-type]
        now = {"record": record(["decode-0", "decode-1"], [])}
        monkeypatch.setattr(dep, "load", lambda name: now["record"])
        monkeypatch.setattr("orchestrator.front.instance_ranks", lambda rec, inst: None)
        # Replaced: the dead instance leaves the record, named as being replaced.
        watch._rank_gone(1)
        assert router.num_replacing == 1
        now["record"] = record(["decode-0"], ["decode-1"])
        await watch.sync()
        assert router.num_replacing == 1 and router.removed == [[1]]
        # Scaled down: its actors killed, then the record without it and not replacing it.
        watch._rank_gone(0)
        assert router.num_replacing == 2
        now["record"] = record([], ["decode-1"])
        await watch.sync()
        assert router.num_replacing == 1 and watch.replacing == {"decode": {"decode-1"}}
        now["record"] = record([], [])
        await watch.sync()
        assert router.num_replacing == 0 and watch.replacing == {}
        # Replaced, done: the record shows the new instance and no longer the replacement;
        # requests wait on until the new instance's ranks are taken on.
        watch.known["decode-0"] = [0]  # (known again for this case)
        watch._rank_gone(0)
        assert router.num_replacing == 1
        loading = asyncio.get_running_loop().create_future()
        handle = SimpleNamespace(ready=SimpleNamespace(remote=lambda: loading))
        monkeypatch.setattr("orchestrator.front.instance_ranks", lambda rec, inst: [handle])
        now["record"] = record(["decode-2"], [])
        await watch.sync()
        assert router.num_replacing == 1 and "decode-2" in watch.pending
        watch.pending.pop("decode-2").cancel()

    asyncio.run(run())


def test_records_without_replacing_read_both_ways():
    from orchestrator import deployment as dep

    plain = dep.DeploymentRecord("d", "code", {}, [])
    assert "replacing" not in plain.to_json()  # a router of an older version reads on
    assert dep.DeploymentRecord.from_json(plain.to_json()).replacing == []
    named = dep.DeploymentRecord("d", "code", {}, [], replacing=["decode-1"])
    assert dep.DeploymentRecord.from_json(named.to_json()).replacing == ["decode-1"]


class _ReplacingPools:
    """A `PoolSet` as a replacement uses it."""

    def __init__(self, *instances: PoolInstance):
        self.instances = list(instances)
        self.shapes = {"decode": (1, BUNDLE)}
        self.next_number = {"decode": len(instances)}
        self.num_scales = {"decode": 0}
        self.num_replaced = {"decode": 0}
        self.replacing: dict[str, Any] = {}
        self.scaling = self.stopped = self.stopping = False
        self.records = 0

    def counts(self) -> dict[str, int]:
        return {"decode": sum(i.state == "serving" for i in self.instances)}

    def deployment_removed(self) -> bool:
        return False

    def record(self) -> None:
        self.records += 1


def _replacing_router() -> Any:
    return SimpleNamespace(draining=False, num_replacing=1, wake_waiting=lambda: None)


def test_a_replacement_leaves_alone_what_a_scale_changed_meanwhile(monkeypatch):
    """A dead instance that a scale removed while the replacement waited for it is not taken
    down again; a replacement that keeps failing to start stops once a scale set the role's
    count meanwhile, rather than start instances back up to the count it began with. (Found
    by an audit.)"""
    import asyncio

    from orchestrator import replacement

    taken_down: list[str] = []
    started: list[str] = []

    async def take_down(pools: Any, router: Any, eplb: Any, instance: Any, *args: Any,
                        **kw: Any) -> None:  # fmt: skip
        taken_down.append(instance.name)
        pools.instances.remove(instance)

    async def bring_up(pools: Any, router: Any, eplb: Any, spec: Any, threads: Any) -> None:
        started.append(spec.name)
        pools.num_scales["decode"] += 1  # meanwhile, an admin scaled decode down to 1
        raise RuntimeError("no room")

    monkeypatch.setattr(replacement, "take_down", take_down)
    monkeypatch.setattr(replacement, "bring_up", bring_up)
    monkeypatch.setattr(replacement, "REPLACE_RETRY_S", 0.01)

    async def run() -> None:
        # Scaled down while the replacement waited for that scale.
        d0, d1 = _instance(0, 0), _instance(1, 1)
        pools = _ReplacingPools(d0, d1)
        pools.scaling = True
        task = asyncio.ensure_future(replacement._replace(pools, _replacing_router(), None, d0))
        await asyncio.sleep(0.05)
        pools.instances.remove(d0)
        pools.scaling = False
        await asyncio.wait_for(task, 5)
        assert taken_down == [] and started == []
        # A failed start, then a scale: no second start.
        pools = _ReplacingPools(_instance(0, 0), _instance(1, 1))
        dead = pools.instances[0]
        await asyncio.wait_for(replacement._replace(pools, _replacing_router(), None, dead), 5)
        assert taken_down == ["decode-0"] and started == ["decode-2"]

    asyncio.run(run())
