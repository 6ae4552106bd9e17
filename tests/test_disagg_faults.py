"""Disaggregated serving when something fails: a prefill or decode rank killed mid-load
(its requests wait for its restart and resume there, fail with an error naming the rank when
that wait is off, or are retried on another pair; the pool recovers), a rank refusing a
request by fault injection, a decode rank that never posts its receive (the transfer times
out), a client gone during a transfer (both sides freed), an abort sent in the same instant as
its request, and a rank of a two-rank expert-parallel pool killed (both restart and serve; the
requests it held resume from their output, on another instance when there is one)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
import pytest

from tests.disagg_calls import (
    _generate,
    _generate_async,
    _greedy,
    _greedy_outputs,
    _metric,
    _wait_all_pages_free,
)
from workers.engine.messages import SamplingParams

pytest.importorskip("workers.transfer")
pytestmark = pytest.mark.timeout(300)


def _health(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=10).status_code


def _wait_healthy(url: str, timeout_s: float = 90.0) -> None:
    """Until every rank is up (`/health` "ok", not "degraded")."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/health", timeout=10).json().get("status") != "ok":
        assert time.monotonic() < deadline, "the pool did not recover"
        time.sleep(0.3)


@pytest.mark.parametrize("victim,wait", [("decode", True), ("prefill", True), ("decode", False)])
def test_a_dead_rank_s_requests_wait_for_its_restart_or_fail(victim, wait, launch_tiny):
    """A rank of the only prefill/decode pair is killed under load. By default
    (`--rank-restart-wait`) its requests wait for Ray to restart it and resume there from
    their output: every one succeeds, with the same greedy tokens as without the failure.
    With the wait off they end with an error naming the rank. Either way the pool recovers
    and nothing is left behind."""
    import ray

    server = launch_tiny() if wait else launch_tiny(rank_restart_wait_s=0)
    try:
        roles = [r["info"]["role"] for r in httpx.get(f"{server.url}/v1/stats").json()["ranks"]]
        handle = server.ranks[roles.index(victim)]
        rng = random.Random(9)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(200, 600))] for _ in range(12)]
        want = _greedy_outputs(server.url, prompts, 200) if wait else []

        async def run() -> list[dict[str, Any] | BaseException]:
            async def one(client: httpx.AsyncClient, p: list[int]) -> dict[str, Any]:
                body = {"input_ids": p, "sampling_params": _greedy(200), "stream": False}
                r = await client.post(f"{server.url}/generate", json=body)
                return {"status": r.status_code, "body": r.json()}

            async def victim_busy(client: httpx.AsyncClient) -> bool:
                stats = (await client.get(f"{server.url}/v1/stats")).json()["ranks"]
                st = stats[roles.index(victim)]["stats"]
                return st is not None and st["num_running"] + st["num_waiting"] > 0

            async with httpx.AsyncClient(timeout=120) as client:
                tasks = [asyncio.ensure_future(one(client, p)) for p in prompts]
                # Killed while it holds requests (a fixed delay raced the prefill rank, which
                # can be done with all twelve prompts in a fraction of a second).
                deadline = time.monotonic() + 30
                while not await victim_busy(client):
                    assert time.monotonic() < deadline, f"the {victim} rank never got work"
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                ray.kill(handle, no_restart=False)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                assert time.monotonic() - started < 100, "requests hung after the rank died"
                return results

        waited_before = server.router.num_waited
        results = asyncio.run(run())
        assert all(isinstance(r, dict) for r in results), results
        failed = [r for r in results if isinstance(r, dict) and r["status"] != 200]
        if wait:
            assert not failed, failed
            assert [r["body"]["output_ids"] for r in results if isinstance(r, dict)] == want
            assert server.router.num_waited > waited_before, "no request waited for the rank"
        else:
            assert failed, "killing a rank mid-load should fail some requests"
            assert all("rank" in r["body"]["error"]["message"] for r in failed)
            assert server.router.num_waited == waited_before
        _wait_healthy(server.url)
        r = httpx.post(
            f"{server.url}/generate",
            json={"input_ids": prompts[0][:50], "sampling_params": _greedy(8)},
            timeout=60,
        )
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 8, r.text
        _wait_all_pages_free(server.url)
        assert server.router.num_waiting == 0
    finally:
        server.stop()


def test_requests_on_a_dead_prefill_rank_are_retried_on_another_pair(launch_tiny):
    import ray

    server = launch_tiny(prefill_instances=2)
    try:
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        victim = server.ranks[[r["info"]["role"] for r in ranks].index("prefill")]
        rng = random.Random(11)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(300, 700))] for _ in range(16)]

        async def run() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=120) as client:
                calls = (_generate_async(client, server.url, p, 16) for p in prompts)
                tasks = [asyncio.ensure_future(c) for c in calls]
                # Kill the rank once it has taken prompts and still holds some (its own stats,
                # published after each step), not after a guessed delay: hand-offs are fast.
                deadline = time.monotonic() + 30
                while True:
                    st = await victim.stats.remote()
                    if st.num_waiting + st.num_running >= 2:
                        break
                    assert time.monotonic() < deadline, "the prefill rank never held prompts"
                    await asyncio.sleep(0.005)
                ray.kill(victim, no_restart=False)
                return list(await asyncio.gather(*tasks))

        results = asyncio.run(run())
        assert server.router.num_retries > 0, "no request was retried"
        # Retried requests succeed; one may still fail if its retry hit a second failure, but
        # only with a clear error naming the rank.
        failed = [text for status, text in results if status != 200]
        assert len(failed) <= 1 and all("rank" in t for t in failed), results
        _wait_healthy(server.url)
        _wait_all_pages_free(server.url)
    finally:
        server.stop()


def test_a_prefill_rank_failing_to_take_a_request_retries_it_elsewhere(launch_tiny):
    import ray

    server = launch_tiny(prefill_instances=2, allow_fault_injection=True)
    try:
        roles = [r["info"]["role"] for r in httpx.get(f"{server.url}/v1/stats").json()["ranks"]]
        victim = server.ranks[roles.index("prefill")]
        # The rank's next add_request fails (not a refusal: an internal error, as when its
        # process is going down). Two requests at once go to the two prefill ranks (fewest
        # queued prompt tokens), so one of them hits it.
        ray.get(victim.inject_fault.remote("fail_add", 1))

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                bodies = [
                    {"input_ids": list(range(5 + i, 60 + i)), "sampling_params": _greedy(8)}
                    for i in range(2)
                ]
                posts = [client.post(f"{server.url}/generate", json=b) for b in bodies]
                return list(await asyncio.gather(*posts))

        results = asyncio.run(run())
        assert all(r.status_code == 200 for r in results), [r.text for r in results]
        assert all(len(r.json()["output_ids"]) == 8 for r in results)
        assert server.router.num_retries == 1
        assert "pdserve_request_retries_total 1.0" in httpx.get(f"{server.url}/metrics").text
        _wait_all_pages_free(server.url)
    finally:
        server.stop()


def test_decode_rank_that_never_posts_its_receive_fails_the_request_cleanly(launch_tiny):
    import ray

    server = launch_tiny(allow_fault_injection=True, transfer_timeout_s=1.0)
    try:
        roles = [r["info"]["role"] for r in httpx.get(f"{server.url}/v1/stats").json()["ranks"]]
        decode = server.ranks[roles.index("decode")]
        ray.get(decode.inject_fault.remote("withhold_receive", 1))
        started = time.monotonic()
        r = _generate(server.url, list(range(5, 60)), 8)
        assert time.monotonic() - started < 10, "the transfer timeout did not end the request"
        assert r.status_code >= 500, r.text
        message = r.json()["error"]["message"]
        assert "KV transfer" in message and "timed out" in message, message
        _wait_all_pages_free(server.url)
        send_failed = {"side": "send", "outcome": "failed"}
        assert _metric(server.url, "pdserve_kv_transfers_total", **send_failed) == 1
        r = _generate(server.url, list(range(5, 60)), 8)
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 8, r.text
        with pytest.raises(ray.exceptions.RayTaskError, match="unknown fault"):
            ray.get(decode.inject_fault.remote("no-such-fault", 1))
    finally:
        server.stop()


def test_client_gone_during_a_transfer_or_an_abort_at_once_frees_both_sides(launch_tiny):
    import ray

    server = launch_tiny(allow_fault_injection=True, transfer_timeout_s=60.0)
    try:
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        roles = [r["info"]["role"] for r in ranks]
        prefill_index = roles.index("prefill")
        ray.get(server.ranks[roles.index("decode")].inject_fault.remote("withhold_receive", 1))

        def prefill_stats() -> dict[str, Any]:
            stats = httpx.get(f"{server.url}/v1/stats").json()["ranks"][prefill_index]["stats"]
            return dict(stats)

        async def run() -> None:
            body = {"input_ids": list(range(5, 90)), "sampling_params": _greedy(8), "stream": True}
            url = f"{server.url}/generate"
            async with (
                httpx.AsyncClient(timeout=30) as client,
                client.stream("POST", url, json=body) as resp,
            ):
                assert resp.status_code == 200
                # The prompt is done and its KV waits to be sent: the transfer is in flight.
                deadline = time.monotonic() + 20
                while prefill_stats()["num_in_transfer"] == 0:
                    assert time.monotonic() < deadline, "the transfer never started"
                    await asyncio.sleep(0.05)
                assert prefill_stats()["num_pages_used"] > 0
            # Leaving the block closed the connection: the client is gone.

        asyncio.run(run())
        _wait_all_pages_free(server.url, timeout_s=15)
        assert all(r["stats"]["num_in_transfer"] == 0 for r in
                   httpx.get(f"{server.url}/v1/stats").json()["ranks"])  # fmt: skip
        r = _generate(server.url, list(range(5, 90)), 8)
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 8, r.text

        # An abort in the same event-loop pass as the request (its adds have not left yet)
        # reaches both ranks after them: the request ends as aborted, at once, not retried.
        # (An abort that overtook its add was a no-op on that rank: a lost decode-side abort
        # left the request running; a prefill side aborted alone failed the decode side's
        # receive, and the router retried what the client had aborted.)
        router = server.router
        assert router.loop is not None
        sampling = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)

        async def abort_at_once(rid: str) -> tuple[bool, list[Any]]:
            outs = router.generate(list(range(5, 90)), sampling, rid=rid)
            task = asyncio.ensure_future(_collect(outs))
            await asyncio.sleep(0)  # the request registered, its adds scheduled
            assert rid in router.attempt_of
            found = await router.abort(rid)
            return found, await asyncio.wait_for(task, 20)

        retries = router.num_retries
        for i in range(3):
            call = abort_at_once(f"abort-at-once-{i}")
            found, outs = asyncio.run_coroutine_threadsafe(call, router.loop).result(60)
            assert found and outs[-1].finish_reason == "abort", outs[-1]
            assert sum(len(o.token_ids) for o in outs) < 100
        assert router.num_retries == retries
        _wait_all_pages_free(server.url, timeout_s=15)
    finally:
        server.stop()


def test_a_burst_the_prefill_rank_needs_longer_than_the_transfer_timeout_for(launch_tiny):
    """A decode rank with a large cache reserves pages for a burst of long prompts at once;
    the prefill rank computes them for longer than `--transfer-timeout`. It keeps the decode
    rank's receives waiting (NIXL `wait` notifications): every request completes. (Before,
    each receive timed out `--transfer-timeout` after its pages were reserved: with 2 s, 17 of
    these 32 failed. 1 s here: the burst takes ~4.5 s on 2 cores, a margin for faster hosts;
    a prefill step of 2048 tokens takes ~0.15 s, well inside the keep-alive's timeout / 6.)"""
    from workers.engine.config import EngineConfig

    engine = EngineConfig(
        page_size=16, kv_capacity_tokens=40000, device="cpu", preload_structured_output=False
    )
    server = launch_tiny(engine=engine, transfer_timeout_s=1.0)
    try:
        rng = random.Random(4)
        prompts = [[rng.randrange(5, 1000) for _ in range(1900)] for _ in range(32)]

        async def burst() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(
                    *(_generate_async(client, server.url, p, 8) for p in prompts)
                )

        started = time.monotonic()
        answers = asyncio.run(burst())
        elapsed = time.monotonic() - started
        failed = [text for status, text in answers if status != 200]
        assert not failed, f"{len(failed)} failed: {failed[0]}"
        assert all(len(json.loads(text)["output_ids"]) == 8 for _, text in answers)
        assert elapsed > 1.0, f"the burst took {elapsed:.1f} s: not longer than the timeout"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "pdserve_request_retries_total 0.0" in metrics
        _wait_all_pages_free(server.url)
    finally:
        server.stop()


async def _collect(outs: Any) -> list[Any]:
    return [out async for out in outs]


def test_expert_parallel_pool_recovers_from_a_dead_rank(launch_tiny):
    """Killing one rank of the only (two-rank) pool: both ranks restart and meet again, and
    the pool's in-flight requests — the dead rank's and its peer's — wait for that and resume
    from their output, with the same greedy tokens as without the failure."""
    import ray

    server = launch_tiny(colocated=True, num_ranks=2)
    try:
        rng = random.Random(4)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(100, 300))] for _ in range(8)]
        want = _greedy_outputs(server.url, prompts, 300)

        async def run() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=120) as client:
                calls = (_generate_async(client, server.url, p, 300) for p in prompts)
                tasks = [asyncio.ensure_future(c) for c in calls]
                await asyncio.sleep(1.0)
                ray.kill(server.ranks[1], no_restart=False)
                return list(await asyncio.gather(*tasks))

        started = time.monotonic()
        results = asyncio.run(run())
        assert time.monotonic() - started < 100, "requests hung after a pool rank died"
        assert [status for status, _ in results] == [200] * len(prompts), results
        assert [json.loads(text)["output_ids"] for _, text in results] == want
        assert server.router.num_waited >= 2, server.router.num_waited
        _wait_healthy(server.url)
        r = _generate(server.url, prompts[0][:40], 8)
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 8, r.text
        _wait_all_pages_free(server.url)
    finally:
        server.stop()


def test_expert_parallel_pool_re_forms_after_its_rendezvous_and_a_rank_die(
    launch_tiny, tiny_model_dir
):
    """The pool's meeting point (a Ray actor) dies and Ray restarts it empty; then a rank dies
    while a dead rank 0 holds the new round's address (it joined and died: its store is not
    there). The ranks that meet it give up after the formation timeout, exit and are
    restarted, and the pool forms again and serves the same greedy tokens."""
    import dataclasses
    import socket

    import ray

    from tests.conftest import tiny_serve_config

    engine = dataclasses.replace(
        tiny_serve_config(tiny_model_dir).engine, pool_formation_timeout_s=5.0
    )
    server = launch_tiny(colocated=True, num_ranks=2, engine=engine)
    try:
        prompt = list(range(5, 45))
        before = _generate(server.url, prompt, 8)
        assert before.status_code == 200, before.text
        (rendezvous,) = [h for h in server.helpers if "Rendezvous" in repr(h)]
        ray.kill(rendezvous, no_restart=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = ("127.0.0.1", s.getsockname()[1])
        deadline = time.monotonic() + 60
        while True:  # the restarted meeting point takes joins again
            try:
                ghost = rendezvous.join.remote(0, dead)
                ray.get(ghost, timeout=0.5)
            except ray.exceptions.GetTimeoutError:
                break  # waiting in a new round, as a rank 0 that died after joining would
            except ray.exceptions.RayActorError:
                assert time.monotonic() < deadline, "the rendezvous was not restarted"
                time.sleep(0.2)
        pids = [r["info"]["pid"] for r in httpx.get(f"{server.url}/v1/stats").json()["ranks"]]
        ray.kill(server.ranks[1], no_restart=False)
        deadline = time.monotonic() + 120
        while _health(server.url) == 200:  # the router saw the rank go
            assert time.monotonic() < deadline
            time.sleep(0.1)
        _wait_healthy(server.url, timeout_s=120)
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        assert all(r["info"]["pid"] not in pids for r in ranks), (pids, ranks)
        after = _generate(server.url, prompt, 8)
        assert after.status_code == 200, after.text
        assert after.json()["output_ids"] == before.json()["output_ids"]
        _wait_all_pages_free(server.url)
    finally:
        server.stop()


def test_with_no_rank_to_take_it_a_stream_is_refused_with_503(launch_tiny):
    """A pool that is down (here: its rank killed for good) refuses streamed requests with a
    503 status, as whole ones, not with a 200 whose stream carries the error: load balancers
    and clients retry on the status."""
    import ray

    server = launch_tiny(colocated=True, replace_dead_instances=False)
    try:
        ray.kill(server.ranks[0], no_restart=True)
        deadline = time.monotonic() + 60
        while _health(server.url) == 200:
            assert time.monotonic() < deadline, "the router did not see the rank go"
            time.sleep(0.1)
        generate = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}
        completion = {"prompt": [5, 6, 7], "max_tokens": 2}
        for route, body in [
            ("/generate", generate),
            ("/generate", {**generate, "stream": True}),
            ("/v1/completions", completion),
            ("/v1/completions", {**completion, "stream": True}),
        ]:
            r = httpx.post(f"{server.url}{route}", json=body, timeout=30)
            assert r.status_code == 503, (route, body, r.text)
            assert "engine rank 0" in r.json()["error"]["message"], r.text
    finally:
        server.stop()


async def _watch_health(client: httpx.AsyncClient, url: str, statuses: list[str]) -> None:
    """Append each new `/health` status (a 503's too) until cancelled."""
    while True:
        r = await client.get(f"{url}/health")
        status = r.json().get("status") if r.status_code in (200, 503) else str(r.status_code)
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        await asyncio.sleep(0.02)


def test_requests_on_a_pool_that_loses_a_rank_resume_on_another_instance(launch_tiny):
    """A rank of a two-rank decode pool dies under load: the requests of both its ranks (the
    dead one's, failed by the router, and its peer's, which leaves the broken pool) go on
    from their output on the other decode instance, with the same greedy tokens as without
    the failure; meanwhile the server stays in service (`/health` 200 "degraded", never
    503); the pool restarts and nothing is left behind."""
    import ray

    server = launch_tiny(decode_dp=2, decode_instances=2)
    try:
        rng = random.Random(12)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(20, 120))] for _ in range(8)]
        want = _greedy_outputs(server.url, prompts, 400)
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        pool = [r["rank"] for r in ranks
                if r["info"]["role"] == "decode" and r["info"]["instance"] == 0]  # fmt: skip
        assert len(pool) == 2, ranks

        async def run() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=240) as client:
                calls = (_generate_async(client, server.url, p, 400) for p in prompts)
                tasks = [asyncio.ensure_future(c) for c in calls]
                # Killed once both ranks of the pool generate (a decode rank's running
                # requests have output), so that both ways of losing a rank are taken.
                deadline = time.monotonic() + 60
                while True:
                    stats = await asyncio.gather(*(server.ranks[i].stats.remote() for i in pool))
                    if all(st.num_running > 0 for st in stats):
                        break
                    assert time.monotonic() < deadline, "the pool never generated"
                    await asyncio.sleep(0.01)
                ray.kill(server.ranks[pool[1]], no_restart=False)
                health = asyncio.ensure_future(_watch_health(client, server.url, statuses))
                results = list(await asyncio.gather(*tasks))
                while "degraded" not in statuses and time.monotonic() < deadline + 60:
                    await asyncio.sleep(0.05)  # the router may see the rank go after the calls
                health.cancel()
                return results

        statuses: list[str] = []
        resumed_before = server.router.num_resumed
        results = asyncio.run(run())
        assert "degraded" in statuses and "failed" not in statuses, statuses
        assert [status for status, _ in results] == [200] * len(prompts), results
        assert [json.loads(text)["output_ids"] for _, text in results] == want
        assert server.router.num_resumed - resumed_before >= 2, server.router.num_resumed
        _wait_healthy(server.url, timeout_s=120)
        _wait_all_pages_free(server.url)
    finally:
        server.stop()
