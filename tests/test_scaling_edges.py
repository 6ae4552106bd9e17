"""Scaling edges an audit found: a take-down that fails must not end the scale while the
others still drain (a second scale could then overlap them), and the autoscaler's minimum is
the deployment's, not what a take-over happened to find."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator import scaling
from orchestrator.autoscale import AutoscaleConfig, Autoscaler

pytestmark = pytest.mark.timeout(60)


def test_a_failed_take_down_is_reported_and_the_scale_waits_for_the_others(monkeypatch):
    a = SimpleNamespace(name="decode-1", spec=SimpleNamespace(role="decode"), indices=[3])
    b = SimpleNamespace(name="decode-2", spec=SimpleNamespace(role="decode"), indices=[4])
    monkeypatch.setattr(scaling, "plan", lambda pools, counts, remove, gone: ([], [a, b]))
    monkeypatch.setattr(scaling, "_keep_one_per_role", lambda pools, leaving, report, gone: leaving)
    pools = SimpleNamespace(
        stopped=False, scaling=False, next_number={}, num_scales={"decode": 0},
        room_for=lambda start: None, config=SimpleNamespace(kv_migration=False),
    )  # fmt: skip
    forgotten: list[tuple[int, bool]] = []
    ranks = SimpleNamespace(
        gone=set(), release_orphans=lambda i, process_gone: forgotten.append((i, process_gone))
    )
    router = SimpleNamespace(draining=False, ranks=ranks)
    ended: list[str] = []

    async def take_down(pools: Any, router: Any, eplb: Any, inst: Any, drain_s: float) -> Any:
        if inst is a:
            await asyncio.sleep(0.01)
            raise RuntimeError("its actor did not answer")
        await asyncio.sleep(0.2)
        ended.append(inst.name)
        return scaling.Moved(2, 1, 0)

    monkeypatch.setattr(scaling, "take_down", take_down)

    async def run() -> Any:
        report = await scaling.scale(pools, router, None, {"decode": 1}, [], 0.0)  # type: ignore[arg-type]
        assert ended == ["decode-2"] and not pools.scaling  # (it waited for the other)
        return report

    report = asyncio.run(run())
    assert report.removed == ["decode-2"] and report.requests_migrated == 2
    assert report.failed == [{"pool": "decode-1", "error": "its actor did not answer"}]
    assert forgotten == [(3, False)]  # its orphaned receives forgotten (they wait it out)


def test_the_autoscaler_minimum_is_the_deployment_s_not_what_a_take_over_found():
    pools = SimpleNamespace(counts=lambda: {"prefill": 1, "decode": 1}, bounds={})
    cfg = AutoscaleConfig(max_instances={"prefill": 4, "decode": 4},
                          min_instances={"prefill": 1, "decode": 2})  # fmt: skip
    scaler = Autoscaler(pools, None, None, cfg, 2048, 0.0)  # type: ignore[arg-type]
    assert scaler.minimum == {"prefill": 1, "decode": 2}
    assert pools.bounds["decode"] == (2, 4)  # a manual scale keeps to it too


def test_a_rank_that_died_while_its_instance_started_is_replaced_once_it_serves():
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.placement import PoolSpec
    from orchestrator.pool_instance import PoolInstance

    spec = PoolSpec("decode", 3, 1, {"CPU": 1.0})
    instance = PoolInstance(spec, None)
    pools = SimpleNamespace(
        stopped=False, stopping=False, num_started={"decode": 0},
        start_instance=lambda spec, cancelled: instance,
    )  # fmt: skip
    told: list[int] = []

    async def add_ranks(ranks: Any) -> list[int]:
        return [5]

    router = SimpleNamespace(
        draining=False, add_ranks=add_ranks, ranks=SimpleNamespace(gone={5}),
        on_rank_gone=told.append,
    )  # fmt: skip

    async def run() -> None:
        with ThreadPoolExecutor(1) as threads:
            await scaling.bring_up(pools, router, None, spec, threads)  # type: ignore[arg-type]

    asyncio.run(run())
    assert instance.state == "serving" and told == [5]


def test_an_instance_is_not_placed_when_the_record_naming_it_cannot_be_saved(monkeypatch):
    """Its placement group and actors are detached: only the record lets a later router or
    `pdserve down` find them (an audit found a failed save ignored and the group made)."""
    from pathlib import Path

    from orchestrator import deployment as dep
    from orchestrator import pools as pools_module
    from orchestrator.config import ServeConfig
    from orchestrator.placement import PoolSpec
    from orchestrator.pools import PoolSet

    def unreachable(record: Any) -> None:
        raise ConnectionError("the GCS is unreachable")

    placed: list[Any] = []
    monkeypatch.setattr(dep, "save", unreachable)
    monkeypatch.setattr(dep, "load", lambda name: None)
    monkeypatch.setattr(dep, "code_fingerprint", lambda: "code")
    monkeypatch.setattr(dep, "settings_of", lambda config, model_dir: {})
    monkeypatch.setattr(pools_module, "reserve_groups", lambda *a, **k: placed.append(a) or [])
    config = ServeConfig(deployment="d", ray_address="127.0.0.1:1")
    pools = PoolSet(Path("/no-model"), config, [], {})
    with pytest.raises(RuntimeError, match="could not be saved"):
        pools.start_instance(PoolSpec("decode", 1, 1, {"CPU": 1.0}), lambda: False)
    assert not placed and not pools.instances


def test_the_eplb_watch_syncs_again_when_a_scale_changed_the_pools_during_its_sync():
    from orchestrator.eplb_watch import EplbWatch

    pools_seen: list[list[str]] = []
    now = [["decode-0"]]

    class Watch(EplbWatch):
        def pools_now(self) -> list[Any]:
            return [SimpleNamespace(name=n) for n in now[0]]

    def call(fn: Any) -> Any:
        async def run(*args: Any) -> Any:
            return fn(*args)

        return SimpleNamespace(remote=run)

    def sync(pools: list[Any]) -> None:
        pools_seen.append([p.name for p in pools])
        now[0] = ["decode-0", "decode-1"]  # a scale-up lands while the sync is on its way

    answers = iter(["a", "b"])
    service = SimpleNamespace(
        incarnation=call(lambda: next(answers)), sync_pools=call(sync), start=call(lambda: None)
    )
    watch = Watch(service, None, num_groups=1)

    async def run() -> None:
        await watch.look()
        await watch.look()  # a new incarnation: resynced

    asyncio.run(run())
    assert pools_seen == [["decode-0"], ["decode-0", "decode-1"]]
