"""KV migration between decode instances, on real servers: a decode instance scaled down
hands the requests decoding on it to the decode instance that stays, with their KV (NIXL,
as from a prefill rank), and they decode on there — streamed and whole calls alike, the same
tokens as without the move, nothing computed again, no page left behind. A migration whose
transfer fails resumes the request from its output instead."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
import ray

from tests.disagg_calls import _greedy, _metric, _wait_all_pages_free
from tests.test_scaling import AUTH, TOKEN, _by_instance, _pools, _scale

pytestmark = pytest.mark.timeout(300)

PROMPTS = [[(11 * i + 5 * k) % 900 + 3 for k in range(20 + 7 * i)] for i in range(10)]
NEW_TOKENS = 300


async def _run_all(url: str, started: threading.Event) -> list[dict[str, Any]]:
    """Every prompt at once, even ones streamed and odd ones whole; each one's last event
    (or whole answer). `started` is set once every stream has its first token."""
    firsts = 0

    async def one(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        nonlocal firsts
        body = {"input_ids": PROMPTS[i], "sampling_params": _greedy(NEW_TOKENS)}
        if i % 2:
            resp = await client.post(f"{url}/generate", json=body)
            assert resp.status_code == 200, resp.text
            return dict(resp.json())
        last: dict[str, Any] = {}
        async with client.stream("POST", f"{url}/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    if not last:
                        firsts += 1
                        if firsts == (len(PROMPTS) + 1) // 2:
                            started.set()
                    last = json.loads(line[6:])
        return last

    limits = httpx.Limits(max_connections=len(PROMPTS))
    async with httpx.AsyncClient(timeout=240, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(len(PROMPTS)))))


def _in_background(run: Any) -> tuple[threading.Thread, list[Any]]:
    """Start `run(started)` (a load whose requests all set `started` once they have their
    first token) on a thread; once `started` is set, the thread and the list its results
    go into."""
    started = threading.Event()
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.extend(run(started)))
    runner.start()
    assert started.wait(120)
    return runner, results


def _same_outputs(results: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Each request's last event (or whole answer) as its reference's: tokens, text, end."""
    assert len(results) == len(want)
    for got, expected in zip(results, want, strict=True):
        assert "error" not in got, got
        assert got["output_ids"] == expected["output_ids"]
        assert got["text"] == expected["text"]
        assert got["meta_info"]["finish_reason"]["type"] == "length"


def _busiest_decode(url: str) -> tuple[str, int]:
    decode = {n: p["num_requests"] for n, p in _pools(url).items() if p["role"] == "decode"}
    name = max(decode, key=lambda n: decode[n])
    return name, decode[name]


@pytest.mark.parametrize("decode_dp", [1, 2], ids=["one-rank", "expert-parallel"])
def test_requests_move_with_their_kv_when_their_decode_instance_is_scaled_down(
    launch_tiny, decode_dp
):
    """Streams and whole calls decoding on a decode instance scaled down (drain timeout 0)
    move to the one that stays with their KV: the same tokens and text as without the move,
    no prompt or output computed again, every page free after. With expert-parallel decode
    instances the requests leave one rank of a lockstep pool and join another's."""
    server = launch_tiny(admin_token=TOKEN, decode_instances=2, decode_dp=decode_dp)
    url = server.url
    try:
        want = asyncio.run(_run_all(url, threading.Event()))
        assert all(w["meta_info"]["completion_tokens"] == NEW_TOKENS for w in want)
        runner, results = _in_background(lambda started: asyncio.run(_run_all(url, started)))
        busy, num_busy = _busiest_decode(url)
        assert num_busy >= 2
        resp = _scale(url, {"remove": [busy], "drain_timeout_s": 0})
        runner.join(240)
        report = resp.json()
        assert resp.status_code == 200 and report["ok"], report
        # Every request there moved with its KV; none was computed again.
        assert report["requests_migrated"] >= 2 and report["requests_resumed"] == 0, report
        assert report["requests_retried"] == 0, report
        _same_outputs(results, want)
        assert server.router.num_migrated == report["requests_migrated"]
        assert server.router.num_resumed == 0
        assert _metric(url, "pdserve_requests_migrated_total") == report["requests_migrated"]
        # The prefill rank computed each prompt once per run: the moves took no prefill.
        assert _by_instance(url)["prefill-0"]["transfers"]["sent"] == 2 * len(PROMPTS)
        status = httpx.get(f"{url}/v1/stats", timeout=30).json()
        assert status["num_migrated"] == report["requests_migrated"]
        _wait_all_pages_free(url)
    finally:
        server.stop()


def test_a_migration_whose_transfer_fails_resumes_the_request_from_its_output(launch_tiny):
    """The decode instance that stays never posts the moving request's receive: the
    migration's transfer times out on the rank it left, and the request resumes from its
    output instead (computed again) — the same tokens, no page left behind."""
    server = launch_tiny(
        admin_token=TOKEN, decode_instances=2, allow_fault_injection=True,
        transfer_timeout_s=2.0,
    )  # fmt: skip
    url = server.url
    try:
        body = {"input_ids": PROMPTS[4], "sampling_params": _greedy(600)}
        want = httpx.post(f"{url}/generate", json=body, timeout=120).json()
        events: list[Any] = []
        first = threading.Event()

        def stream() -> None:
            with httpx.stream(
                "POST", f"{url}/generate", json={**body, "stream": True}, timeout=240
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(60)
        busy, _ = _busiest_decode(url)
        stays = [n for n, p in _pools(url).items() if p["role"] == "decode" and n != busy]
        (rank,) = _pools(url)[stays[0]]["ranks"]
        ray.get(server.router.ranks.handles[rank].inject_fault.remote("withhold_receive", 1))
        began = time.monotonic()
        resp = _scale(url, {"remove": [busy], "drain_timeout_s": 0})
        t.join(120)
        report = resp.json()
        assert resp.status_code == 200 and report["ok"], report
        # Its move failed: it counts as resumed, not migrated.
        assert report["requests_migrated"] == 0 and report["requests_resumed"] == 1, report
        assert time.monotonic() - began >= 2.0  # the migration's transfer timed out first
        last = events[-1]
        assert "error" not in last, last
        assert last["output_ids"] == want["output_ids"]
        assert server.router.num_migrated == 0 and server.router.num_resumed == 1
        _wait_all_pages_free(url)
    finally:
        server.stop()


def test_no_migration_without_another_decode_instance(launch_tiny):
    """`KVMoves.move_from` asks nothing when no other decode rank is up."""
    server = launch_tiny(admin_token=TOKEN)
    try:
        decode = [i for i, info in enumerate(server.router.infos) if info.role == "decode"]

        async def ask() -> int:
            return int(server.router.moves.move_from(decode))

        future = asyncio.run_coroutine_threadsafe(ask(), server.router.loop)
        assert future.result(10) == 0
    finally:
        server.stop()


def _long_streams(url: str, n: int, started: threading.Event) -> list[dict[str, Any]]:
    """`n` greedy streams of `LONG` tokens at once; each one's last event. `started` is set
    once every one has its first token."""
    firsts = 0

    async def one(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        nonlocal firsts
        body = {"input_ids": PROMPTS[i], "sampling_params": _greedy(LONG), "stream": True}
        last: dict[str, Any] = {}
        async with client.stream("POST", f"{url}/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    if not last:
                        firsts += 1
                        if firsts == n:
                            started.set()
                    last = json.loads(line[6:])
        return last

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=240) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(n))))

    return asyncio.run(run())


LONG = 3800  # four such requests reserve 15.3k of the 16k tokens of `_big_kv`'s decode rank


def _big_kv() -> Any:
    from workers.engine.config import EngineConfig

    return EngineConfig(page_size=16, kv_capacity_tokens=16384, device="cpu",
                        preload_structured_output=False)  # fmt: skip


def test_a_new_decode_instance_takes_running_requests_with_their_kv(launch_tiny):
    """Scaled up under load, the new decode instance does not wait for new requests: the
    requests decoding on the busy one move there with their KV until both hold about the
    same share of their KV capacity — the same tokens, nothing computed again."""
    server = launch_tiny(admin_token=TOKEN, engine=_big_kv())
    url = server.url
    try:
        want = _long_streams(url, 4, threading.Event())
        runner, results = _in_background(lambda started: _long_streams(url, 4, started))
        resp = _scale(url, {"decode": 2})
        report = resp.json()
        assert resp.status_code == 200 and report["ok"] and report["started"] == ["decode-1"]
        # The old instance held 94% of its KV capacity in reservations, the new one none: two
        # of the four requests move (then each holds about half).
        assert report["requests_migrated"] == 2, json.dumps(report)
        runner.join(240)
        _same_outputs(results, want)
        assert server.router.num_migrated == 2 and server.router.num_resumed == 0
        stats = _by_instance(url)
        assert stats["decode-1"]["transfers"]["received"] == 2
        assert stats["prefill-0"]["transfers"]["sent"] == 8
        _wait_all_pages_free(url)
    finally:
        server.stop()


def test_without_kv_migration_a_new_decode_instance_takes_only_new_requests(launch_tiny):
    server = launch_tiny(admin_token=TOKEN, kv_migration=False, engine=_big_kv())
    url = server.url
    try:
        runner, results = _in_background(lambda started: _long_streams(url, 4, started))
        report = _scale(url, {"decode": 2}).json()
        assert report["ok"] and report["requests_migrated"] == 0, report
        pools = {p["name"]: p["num_requests"] for p in report["pools"]}
        assert pools["decode-0"] == 4 and pools["decode-1"] == 0, pools  # still running
        runner.join(240)
        assert all("error" not in r for r in results)
        assert _by_instance(url)["decode-1"]["transfers"]["received"] == 0
    finally:
        server.stop()


def test_requests_still_in_prefill_move_with_their_kv_once_they_decode(launch_tiny):
    """Scaled down while its requests' prompts still compute on the prefill rank: each goes
    to the leaving instance first (its KV was headed there), then moves with it — none is
    computed again or started over."""
    server = launch_tiny(admin_token=TOKEN, decode_instances=2, engine=_big_kv())
    url = server.url
    prompts = [[(13 * i + 7 * k) % 900 + 3 for k in range(1500 + 40 * i)] for i in range(8)]

    async def run_all(scale: bool) -> tuple[list[list[int]], dict[str, Any] | None]:
        async def one(client: httpx.AsyncClient, p: list[int]) -> list[int]:
            body = {"input_ids": p, "sampling_params": _greedy(64)}
            resp = await client.post(f"{url}/generate", json=body)
            assert resp.status_code == 200, resp.text
            return list(resp.json()["output_ids"])

        async with httpx.AsyncClient(timeout=240) as client:
            tasks = [asyncio.ensure_future(one(client, p)) for p in prompts]
            report = None
            if scale:
                while True:  # every request routed, half of them to each decode instance
                    pools = (await client.get(f"{url}/admin/pools", headers=AUTH)).json()
                    counts = {p["name"]: p["num_requests"] for p in pools["pools"]}
                    if counts["decode-0"] + counts["decode-1"] == len(prompts):
                        break
                    await asyncio.sleep(0.01)
                assert counts["decode-0"] > 0, counts
                resp = await client.post(
                    f"{url}/admin/scale", headers=AUTH,
                    json={"remove": ["decode-0"], "drain_timeout_s": 0},
                )  # fmt: skip
                report = resp.json()
                report["on_it"] = counts["decode-0"]
            return list(await asyncio.gather(*tasks)), report

    try:
        want, _ = asyncio.run(run_all(False))
        got, report = asyncio.run(run_all(True))
        assert got == want
        assert report is not None and report["ok"], report
        assert report["requests_migrated"] == report["on_it"], report
        assert report["requests_resumed"] == 0 and report["requests_retried"] == 0, report
        assert server.router.num_resumed == 0 and server.router.num_retries == 0
        assert _by_instance(url)["prefill-0"]["transfers"]["sent"] == 2 * len(prompts)
        _wait_all_pages_free(url)
    finally:
        server.stop()


def test_colocated_instances_move_requests_with_their_kv_both_ways(launch_tiny):
    """Colocated instances (a server that may scale opens a transfer engine on each rank): a
    new instance takes half the running requests with their KV, and when the old one is
    removed (drain timeout 0) the rest follow it there — the same tokens, nothing computed
    again, no page left."""
    server = launch_tiny(admin_token=TOKEN, colocated=True, engine=_big_kv())
    url = server.url
    try:
        assert all(info.migrates for info in server.router.infos)
        want = _long_streams(url, 4, threading.Event())
        runner, results = _in_background(lambda started: _long_streams(url, 4, started))
        up = _scale(url, {"colocated": 2}).json()
        assert up["ok"] and up["requests_migrated"] == 2, json.dumps(up)
        down = _scale(url, {"remove": ["colocated-0"], "drain_timeout_s": 0}).json()
        assert down["ok"] and down["requests_migrated"] == 2, json.dumps(down)
        assert down["requests_resumed"] == 0 and down["requests_retried"] == 0, down
        runner.join(240)
        _same_outputs(results, want)
        assert server.router.num_migrated == 4 and server.router.num_resumed == 0
        _wait_all_pages_free(url)
    finally:
        server.stop()


def test_a_colocated_server_that_cannot_scale_opens_no_transfer_engine(launch_tiny):
    server = launch_tiny(colocated=True)
    try:
        assert not any(info.migrates for info in server.router.infos)
    finally:
        server.stop()


RELIEF_NEW = 600  # two such requests outgrow the 1024 tokens of `_small_kv`'s decode ranks (by 256)


def _small_kv(swap_gib: float = 4.0) -> Any:
    from workers.engine.config import EngineConfig

    return EngineConfig(page_size=16, kv_capacity_tokens=1024, device="cpu",
                        preload_structured_output=False, kv_swap_space=swap_gib)  # fmt: skip


def _placed(server: Any, rids: list[str]) -> dict[str, int]:
    """The decode rank each client request (by rid) runs on now."""
    while True:
        try:
            reqs = list(server.router.moves.requests.values())  # (its loop changes it)
            break
        except RuntimeError:
            continue
    return {r.client_rid: r.rank for r in reqs if r.client_rid in rids}


@pytest.mark.parametrize(
    ("interval_s", "swap_gib"), [(0.05, 4.0), (0.0, 4.0), (0.0, 0.0)],
    ids=["relief", "no-relief-swap", "no-relief-recompute"],
)  # fmt: skip
def test_a_decode_rank_whose_kv_runs_out_hands_requests_to_one_with_room(
    launch_tiny, interval_s, swap_gib
):
    """Two requests each on two decode instances, more than a rank's KV holds in
    the end; those on one rank are aborted, and the two on the other outgrow its KV. With
    `--kv-pressure-interval` one of them moves there with its KV before the pages run out
    (nothing preempted, nothing computed again); without, the rank preempts one, whose KV
    waits in host memory (`--kv-swap-space`) or which computes its prompt and output again
    there. The same tokens every way."""
    server = launch_tiny(
        decode_instances=2, engine=_small_kv(swap_gib), kv_pressure_interval_s=interval_s,
        allow_fault_injection=True,
    )  # fmt: skip
    url = server.url
    rids = [f"pressed-{k}" for k in range(4)]
    prompts = [PROMPTS[k][:40] for k in range(4)]
    try:
        started = threading.Event()
        done: dict[str, dict[str, Any]] = {}

        async def one(client: httpx.AsyncClient, k: int) -> None:
            body = {"input_ids": prompts[k], "rid": rids[k], "stream": True,
                    "sampling_params": _greedy(RELIEF_NEW)}  # fmt: skip
            async with client.stream("POST", f"{url}/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        done[rids[k]] = json.loads(line[6:])
                        if len(done) == len(rids):
                            started.set()

        async def run() -> None:
            async with httpx.AsyncClient(timeout=240) as client:
                await asyncio.gather(*(one(client, k) for k in range(len(rids))))

        runner = threading.Thread(target=lambda: asyncio.run(run()))
        runner.start()
        assert started.wait(120)
        placed = _placed(server, rids)
        assert sorted(placed.values()).count(placed[rids[0]]) == 2, placed  # two on each
        pressed = placed[rids[0]]
        if interval_s:
            # The tiny model fills the rank's KV in about a second, a few looks: too fast for a
            # look's timing on a loaded host. At 10 ms more a step, its last 5 % (the least
            # floor) take a quarter of a second, many looks.
            handle = server.router.ranks.handles[pressed]
            ray.get(handle.inject_fault.remote("slow_step", RELIEF_NEW), timeout=30)
        for rid, rank in placed.items():
            if rank != pressed:
                httpx.post(f"{url}/abort_request", json={"rid": rid}, timeout=30)
        runner.join(240)
        kept = [k for k in range(4) if placed[rids[k]] == pressed]
        for k in kept:
            assert done[rids[k]]["meta_info"]["finish_reason"]["type"] == "length", done
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        preempted = stats["ranks"][pressed]["stats"]["num_preemptions"]
        if interval_s:
            assert stats["num_kv_pressure_moves"] >= 1 and stats["num_migrated"] >= 1, stats
            assert preempted == 0 and stats["num_resumed"] == 0, stats
            # The rank that took them counts them (other routers' watches read it).
            moved_in = [r["stats"]["num_moved_in"] for r in stats["ranks"]]
            assert moved_in[pressed] == 0 and sum(moved_in) == stats["num_migrated"], stats
            assert _metric(url, "pdserve_kv_pressure_moves_total") >= 1
        else:
            assert stats["num_kv_pressure_moves"] == 0 and stats["num_migrated"] == 0, stats
            assert preempted >= 1, stats
            swapped = stats["ranks"][pressed]["stats"]["num_swapped_out"]
            assert swapped == (preempted if swap_gib else 0), stats
            assert stats["ranks"][pressed]["stats"]["num_swapped_tokens"] == 0, stats
        # The same tokens as both at once, one on each rank (room enough).
        body = {"input_ids": [prompts[k] for k in kept], "sampling_params": _greedy(RELIEF_NEW)}
        want = httpx.post(f"{url}/generate", json=body, timeout=120).json()
        assert [done[rids[k]]["output_ids"] for k in kept] == [w["output_ids"] for w in want]
        _wait_all_pages_free(url)
    finally:
        server.stop()
