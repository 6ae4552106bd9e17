"""The EPLB service through the server: admin auth, rollback on a failure in each phase,
concurrent rebalances, rebalancing under load with unchanged outputs, and balancedness rising
on a skewed workload. Real ranks (Ray actors in expert-parallel pools), real HTTP."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _greedy(n: int) -> dict[str, Any]:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}


def _experts(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/admin/experts", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json()["pools"])


def _rebalance(url: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/admin/rebalance", json=body or {}, headers=AUTH, timeout=120)


def _generate(url: str, prompt: list[int], n: int = 8) -> list[int]:
    body = {"input_ids": prompt, "sampling_params": _greedy(n)}
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return list(r.json()["output_ids"])


async def _stream_all(url: str, prompts: list[list[int]], n: int) -> list[list[int] | str]:
    async def one(client: httpx.AsyncClient, p: list[int]) -> list[int] | str:
        body = {"input_ids": p, "sampling_params": _greedy(n), "stream": True}
        last: dict[str, Any] = {}
        async with client.stream("POST", f"{url}/generate", json=body) as resp:
            if resp.status_code != 200:
                return f"HTTP {resp.status_code}"
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line[6:])
        return str(last["error"]) if "error" in last else list(last["output_ids"])

    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(timeout=240, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, p) for p in prompts)))


@pytest.fixture(scope="module")
def ep_server(launch_tiny):
    """A colocated expert-parallel pool of two ranks with 4 redundant expert slots."""
    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=2048, device="cpu",
                          num_redundant_experts=4)  # fmt: skip
    server = launch_tiny(colocated=True, num_ranks=2, engine=engine, admin_token=TOKEN,
                         allow_fault_injection=True)  # fmt: skip
    yield server
    server.stop()


def test_admin_needs_the_token(ep_server, tiny_server):
    url = ep_server.url
    assert httpx.post(f"{url}/admin/rebalance", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    r = httpx.post(f"{url}/admin/rebalance", headers=wrong, timeout=30)
    assert r.status_code == 403 and "wrong admin token" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/admin/experts", timeout=30).status_code == 401
    # Without --admin-token the admin routes are off.
    r = httpx.post(f"{tiny_server}/admin/rebalance", headers=AUTH, timeout=30)
    assert r.status_code == 404 and "--admin-token" in r.json()["error"]["message"]
    r = _rebalance(url, {"pools": ["no-such-pool"]})
    assert r.status_code == 400 and "unknown pools" in r.json()["error"]["message"]


def test_flushing_the_prefix_cache_keeps_outputs_and_frees_its_pages(ep_server):
    url = ep_server.url
    prompt = list(range(100, 150))  # 3 full pages of 16, then 2 tokens

    def generate() -> dict[str, Any]:
        body = {"input_ids": prompt, "sampling_params": _greedy(6)}
        return dict(httpx.post(f"{url}/generate", json=body, timeout=120).json())

    first, second = generate(), generate()
    assert second["meta_info"]["cached_tokens"] == 48
    assert httpx.post(f"{url}/admin/flush_cache", timeout=30).status_code == 401
    r = httpx.post(f"{url}/admin/flush_cache", headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["num_pages_freed"] >= 3, r.text
    stats = httpx.get(f"{url}/v1/stats", timeout=30).json()["ranks"]
    assert all(rank["stats"]["num_pages_cached"] == 0 for rank in stats)
    third = generate()
    assert third["meta_info"]["cached_tokens"] == 0
    assert first["output_ids"] == second["output_ids"] == third["output_ids"]


@pytest.mark.parametrize("phase", ["load", "prepare", "execute"])
def test_a_failure_in_any_phase_rolls_back(ep_server, phase):
    import ray

    url = ep_server.url
    prompt = list(range(7, 60))
    before_tokens = _generate(url, prompt)
    for p in [list(range(3, 40 + i)) for i in range(4)]:
        _generate(url, p)  # some recorded load
    before = _experts(url)["colocated-0"]["phy2log"]
    ray.get(ep_server.ranks[1].inject_fault.remote(f"eplb_{phase}", 1))
    r = _rebalance(url, {"placements": {"colocated-0": _rotated(before)}})
    assert r.status_code == 200, r.text
    (report,) = r.json()["pools"]
    assert not report["ok"] and f"{phase} phase" in report["error"], report
    assert _experts(url)["colocated-0"]["phy2log"] == before  # the old placement stays
    assert _generate(url, prompt) == before_tokens
    # And the next rebalance goes through.
    r = _rebalance(url, {"placements": {"colocated-0": _rotated(before)}})
    (report,) = r.json()["pools"]
    assert report["ok"] and report["num_experts_moved"] > 0, report
    assert _experts(url)["colocated-0"]["phy2log"] == _rotated(before)
    assert _generate(url, prompt) == before_tokens


def _rotated(phy2log: list[list[int]]) -> list[list[int]]:
    """The same experts, every slot shifted by one: each rank gets other experts."""
    return [row[1:] + row[:1] for row in phy2log]


def test_a_second_rebalance_while_one_runs_gets_409(ep_server):
    import ray

    url = ep_server.url
    for p in [list(range(3, 30 + i)) for i in range(3)]:
        _generate(url, p)
    ray.get(ep_server.ranks[0].inject_fault.remote("eplb_stall_load", 1))

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            first = asyncio.ensure_future(client.post(f"{url}/admin/rebalance", json={}))
            await asyncio.sleep(1.0)
            second = await client.post(f"{url}/admin/rebalance", json={})
            return [await first, second]

    first, second = asyncio.run(both())
    assert first.status_code == 200, first.text
    assert second.status_code == 409 and "already running" in second.text


def test_rebalances_under_load_keep_outputs_and_raise_balancedness(launch_tiny, tiny_server):
    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=4096, device="cpu",
                          num_redundant_experts=4)  # fmt: skip
    server = launch_tiny(prefill_dp=2, decode_dp=2, engine=engine, admin_token=TOKEN)
    try:
        url = server.url
        # A skewed workload: one prompt over and over routes to the same few experts.
        skewed = [[5, 9, 17, 33] * 16 for _ in range(16)]
        asyncio.run(_stream_all(url, skewed, 16))
        first = _experts(url)
        rng = random.Random(8)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(5, 120))] for _ in range(32)]
        reference = asyncio.run(_stream_all(tiny_server, prompts, 24))

        async def load_and_rebalance() -> tuple[list[Any], list[Any]]:
            loop = asyncio.get_running_loop()
            streams = asyncio.ensure_future(_stream_all(url, prompts, 24))
            reports = []
            for _ in range(5):
                r = await loop.run_in_executor(None, _rebalance, url, None)
                assert r.status_code == 200, r.text
                reports.extend(r.json()["pools"])
            return await streams, reports

        outputs, reports = asyncio.run(load_and_rebalance())
        assert outputs == reference  # zero failed requests, the same greedy tokens
        assert all(r["ok"] for r in reports), reports
        # The skewed window's balancedness went up with the first rebalance of each pool.
        for name, pool in first.items():
            first_report = next(r for r in reports if r["pool"] == name and not r["skipped"])
            assert first_report["balancedness_before"] == pytest.approx(
                pool["balancedness"], rel=0.5
            )
        # The same skewed load on a placement computed from it (the last rebalance under the
        # mixed load above saw the random prompts' tail too) is better balanced than on the
        # default placement.
        asyncio.run(_stream_all(url, skewed, 16))
        r = _rebalance(url)
        assert r.status_code == 200 and all(p["ok"] for p in r.json()["pools"]), r.text
        asyncio.run(_stream_all(url, skewed, 16))
        after = _experts(url)
        for name in first:
            assert after[name]["balancedness"] > first[name]["balancedness"], (name, after)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'pdserve_eplb_rebalances_total{pool="decode-0"}' in metrics
    finally:
        server.stop()


def test_cli_dump_and_init_placement(ep_server, tmp_path, launch_tiny):
    path = tmp_path / "placement.json"
    cmd = [sys.executable, "-m", "orchestrator.cli", "rebalance", "--url", ep_server.url]
    p = subprocess.run([*cmd, "--token", "wrong-token"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 1 and "403" in p.stderr
    p = subprocess.run([*cmd, "--token", TOKEN], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "colocated-0" in p.stdout, p.stderr
    p = subprocess.run([*cmd, "--token", TOKEN, "--dump", str(path)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    saved = json.loads(path.read_text())["pools"]["colocated-0"]
    assert saved == _experts(ep_server.url)["colocated-0"]["phy2log"]
    # A new server starts from the saved placement.
    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=2048, device="cpu",
                          num_redundant_experts=4)  # fmt: skip
    server = launch_tiny(colocated=True, num_ranks=2, engine=engine, admin_token=TOKEN,
                         init_expert_placement=str(path))  # fmt: skip
    try:
        assert _experts(server.url)["colocated-0"]["phy2log"] == saved
    finally:
        server.stop()


def test_periodic_rebalance_runs_and_skips_when_balanced(launch_tiny):
    import time

    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=2048, device="cpu",
                          num_redundant_experts=4)  # fmt: skip
    for min_balancedness, expect_rebalances in ((1.0, True), (0.01, False)):
        server = launch_tiny(colocated=True, num_ranks=2, engine=engine, admin_token=TOKEN,
                             eplb_interval_s=0.5, eplb_min_balancedness=min_balancedness)  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            done = 0
            while time.monotonic() < deadline:
                _generate(server.url, [5, 9, 17, 33] * 8, 4)
                done = _experts(server.url)["colocated-0"]["num_rebalances"]
                if done and expect_rebalances:
                    break
                if not expect_rebalances and time.monotonic() > deadline - 16:
                    break  # several periods have passed
            assert (done > 0) == expect_rebalances, (min_balancedness, done)
        finally:
            server.stop()


def test_a_bad_saved_placement_is_refused_before_any_pool_moves(ep_server):
    """`placements` is checked whole before anything moves: a wrong shape, a value that is not
    an expert id, an expert left without a slot, or a pool name the server does not have is a
    400 naming `placements`, and the placement stays as it was."""
    url = ep_server.url
    before = _experts(url)["colocated-0"]
    phy2log = before["phy2log"]
    num_logical = max(max(row) for row in phy2log) + 1
    first = phy2log[0]
    bad_rows = {
        "a string": "abc",
        "an object": {},
        "null": None,
        "a short row": [first[:-1], *phy2log[1:]],
        "a missing layer": phy2log[:-1],
        "a fraction": [[1.5, *first[1:]], *phy2log[1:]],
        "a boolean": [[True, *first[1:]], *phy2log[1:]],
        "an expert out of range": [[num_logical, *first[1:]], *phy2log[1:]],
        "an expert without a slot": [[first[1]] * len(first), *phy2log[1:]],
    }
    bodies: dict[str, Any] = {
        what: {"placements": {"colocated-0": rows}} for what, rows in bad_rows.items()
    }
    bodies["an unknown pool"] = {
        "placements": {"colocated-0": _rotated(phy2log), "decode-7": _rotated(phy2log)}
    }
    bodies["no pool"] = {"placements": {}}
    for what, body in bodies.items():
        r = _rebalance(url, body)
        assert r.status_code == 400, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"] == "placements" and "placements" in error["message"], (what, error)
    huge = b'{"placements": {"colocated-0": [[1e400]]}}'  # JSON allows it; Python reads inf
    r = httpx.post(f"{url}/admin/rebalance", content=huge, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "placements", r.text
    after = _experts(url)["colocated-0"]
    assert after["phy2log"] == phy2log
    assert after["num_rebalances"] == before["num_rebalances"]


def test_a_pool_that_is_down_does_not_hold_up_the_others(launch_tiny):
    """One pool's rank is dead (for good, here): a rebalance reports that pool down and
    rebalances the other; `/admin/experts` says which pool is down and why."""
    import ray

    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=2048, device="cpu",
                          num_redundant_experts=4)  # fmt: skip
    server = launch_tiny(prefill_dp=2, decode_dp=2, engine=engine, admin_token=TOKEN,
                         replace_dead_instances=False)  # fmt: skip
    try:
        prompt = list(range(5, 69))
        _generate(server.url, prompt)  # some expert load in both pools
        roles = [r["info"]["role"] for r in httpx.get(f"{server.url}/v1/stats").json()["ranks"]]
        ray.kill(server.ranks[roles.index("prefill")], no_restart=True)
        reports = {}
        deadline = time.monotonic() + 60
        while "prefill-0" not in reports or reports["prefill-0"]["ok"]:
            assert time.monotonic() < deadline, reports
            r = _rebalance(server.url)
            assert r.status_code == 200, r.text
            reports = {p["pool"]: p for p in r.json()["pools"]}
        assert "the pool is down" in reports["prefill-0"]["error"], reports
        assert reports["decode-0"]["ok"], reports
        experts = httpx.get(f"{server.url}/admin/experts", headers=AUTH, timeout=60).json()
        assert experts["pools"]["prefill-0"]["down"] and not experts["pools"]["decode-0"]["down"]
    finally:
        server.stop()


def test_a_restarted_eplb_service_serves_the_pools_again(ep_server):
    """The service's process dies: Ray starts it again, the server's watch hands it the
    pools and rebalancing works as before (a log line says so)."""
    import ray

    url = ep_server.url
    watch = ep_server.http.app.state.eplb_watch
    watch.interval_s = 0.2
    before = _experts(url)
    old = ray.get(ep_server.eplb.incarnation.remote())
    ray.kill(ep_server.eplb, no_restart=False)
    # Meanwhile the admin routes answer 503 (restarting) or already work, never a 500.
    during = httpx.get(f"{url}/admin/experts", headers=AUTH, timeout=60)
    assert during.status_code in (200, 503), during.text
    deadline = time.monotonic() + 60
    while watch.num_restarts == 0:
        assert time.monotonic() < deadline, "the watch did not see the restart"
        time.sleep(0.1)
    assert ray.get(ep_server.eplb.incarnation.remote()) != old
    assert sorted(_experts(url)) == sorted(before)
    for p in [list(range(3, 30 + i)) for i in range(3)]:
        _generate(url, p)
    r = _rebalance(url)
    assert r.status_code == 200, r.text
    assert [p["pool"] for p in r.json()["pools"]] == sorted(before)


def test_the_watch_resyncs_a_new_incarnation_with_the_pools_of_now():
    """Unit: a new incarnation gets the router's current expert-parallel pools (not the
    draining ones, not one-rank pools) and its periodic trigger started again; the same
    incarnation is left alone; a service that does not answer is looked at again."""
    from orchestrator.eplb_watch import EplbWatch
    from workers.engine.rank_reports import RankInfo

    def info(role: str, instance: int, pool_rank: int, size: int) -> RankInfo:
        return RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role=role,
                        instance=instance, pool_rank=pool_rank, pool_size=size)  # fmt: skip

    class Ranks:
        handles = ["p0", "d0b", "d0a", "d1a", "d1b", "x"]
        infos = [info("prefill", 0, 0, 1), info("decode", 0, 1, 2), info("decode", 0, 0, 2),
                 info("decode", 1, 0, 2), info("decode", 1, 1, 2), None]  # fmt: skip
        closed = {3, 4}  # decode-1 drains

    class Router:
        ranks = Ranks()

    calls: list[Any] = []
    answers = iter(["a", "a", RuntimeError("restarting"), "b", "b"])

    def remote(name: str) -> Any:
        class Call:
            def remote(self, *args: Any) -> Any:
                async def done() -> Any:
                    if name == "incarnation":
                        answer = next(answers)
                        if isinstance(answer, Exception):
                            raise answer
                        return answer
                    calls.append((name, args))
                    return None

                return done()

        return Call()

    class Service:
        incarnation, sync_pools, start = (
            remote("incarnation"),
            remote("sync_pools"),
            remote("start"),
        )

    async def run() -> None:
        watch = EplbWatch(Service(), Router(), num_groups=4, interval_s=0.01)
        watch.start()
        for _ in range(200):
            if watch.num_restarts:
                break
            await asyncio.sleep(0.01)
        await watch.stop()
        assert watch.num_restarts == 1
        (sync, args), (start, _) = calls
        assert (sync, start) == ("sync_pools", "start")
        (pool,) = args[0]
        assert pool.name == "decode-0" and pool.ranks == ["d0a", "d0b"] and pool.num_groups == 4

    asyncio.run(run())


def test_a_balanced_window_fades_and_no_load_is_taken_from_a_pool_that_does_not_answer():
    """Unit (found by an audit): a periodic look that finds the pool balanced enough halves
    the window, so that a later shift in the load is not diluted by a long balanced past; a
    pool whose placement cannot be read keeps the loads its ranks recorded for next time."""
    import torch

    from eplb.service import EPLBService, PoolHandle

    class Call:
        def __init__(self, fn: Any):
            self.fn = fn

        def remote(self, *args: Any) -> Any:
            async def done() -> Any:
                return self.fn(*args)

            return done()

    taken: list[int] = []

    class Rank:
        def __init__(self, i: int):
            self.expert_load = Call(lambda: taken.append(i) or torch.ones(2, 4, dtype=torch.int64))
            self.expert_placement = Call(lambda: torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))

    ranks = [Rank(0), Rank(1)]
    service = EPLBService([PoolHandle("decode-0", ranks)], interval_s=1.0, min_balancedness=0.9)
    state = service.pools["decode-0"]

    async def run() -> None:
        await service.collect()
        assert state.window is not None and state.window.tolist() == [[2] * 4] * 2
        service.pools["decode-0"].window = torch.full((2, 4), 10, dtype=torch.int64)
        report = await service._rebalance_pool(state, True, None)
        assert report.skipped.startswith("balancedness 1.000")
        assert state.window.tolist() == [[5] * 4] * 2

        # The placement does not come: the ranks' loads stay with them.
        def down() -> Any:
            raise RuntimeError("restarting")

        ranks[0].expert_placement = Call(down)
        taken.clear()
        await service.collect()
        assert state.down and taken == []

    asyncio.run(run())
