"""A server's health and life: `/health`, `/v1/models` and `/metrics` on the shared tiny
server; then, each on a server of its own, a request timeout and a rank killed under
requests in flight, a failing rank that Ray restarts, and `pdserve serve` draining its
requests on SIGTERM before it exits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from tests.disagg_calls import _metric
from tests.http_calls import _client, _greedy, _long_body, _rank, _wait_idle


@pytest.mark.timeout(120)
def test_health_models_and_metrics(tiny_server, info):
    with _client(tiny_server) as c:
        assert c.get("/health").status_code == 200
        assert c.head("/health").status_code == 200  # (some load balancers probe so)
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"]
        assert models["data"][0]["max_model_len"] == info["max_context_len"]
        c.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": _greedy(4)})
        text = c.get("/metrics").text
    for name in (
        "pdserve_requests_total",
        "pdserve_prompt_tokens_total",
        "pdserve_generation_tokens_total",
        "pdserve_time_to_first_token_seconds_bucket",
        "pdserve_time_per_output_token_seconds_bucket",
        "pdserve_e2e_request_latency_seconds_bucket",
        "pdserve_num_running_requests",
        "pdserve_num_queued_requests",
        'pdserve_request_finish_total{reason="length"}',
        "pdserve_request_retries_total",
        "pdserve_rank_failures_total",
        "pdserve_draining 0.0",
        "pdserve_kv_pages_used",
        "pdserve_kv_pages_free",
        'pdserve_gc_seconds_total{process="router"}',
        "pdserve_router_cpu_seconds_total",
        'pdserve_gc_seconds_total{process="rank-0"}',
        'pdserve_gc_longest_pause_seconds{process="rank-0"}',
    ):
        assert name in text, name
    assert 'pdserve_requests_total{route="/generate",status="200"}' in text


# ---- timeouts and a rank that dies --------------------------------------------------------------


@pytest.mark.timeout(300)
def test_timeout_and_dead_rank_end_requests_with_errors(launch_tiny):
    """A request past its timeout; requests on a rank killed for good, whose instance is not
    replaced (`--disable-instance-replacement`): they end with an error at once, not after
    `--rank-restart-wait`."""
    import ray

    server = launch_tiny(replace_dead_instances=False)
    try:
        url = server.url
        info = _rank(url)["info"]
        body, _ = _long_body(info, stream=False)
        server.router.request_timeout_s = 0.05
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        _wait_idle(url)
        server.router.request_timeout_s = None

        events: list[Any] = []
        first = threading.Event()

        def consume() -> None:
            with httpx.stream(
                "POST", f"{url}/generate", json={**body, "stream": True}, timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: ") :]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        first.set()

        whole: list[httpx.Response] = []  # a call not streamed: its tokens wait on the rank

        def call() -> None:
            whole.append(httpx.post(f"{url}/generate", json=body, timeout=60))

        reader = threading.Thread(target=consume)
        caller = threading.Thread(target=call)
        reader.start()
        caller.start()
        assert first.wait(60)
        ray.kill(server.ranks[-1], no_restart=True)  # the generating (decode) rank
        reader.join(60)
        caller.join(60)
        assert not reader.is_alive(), "the stream hung after its rank died"
        assert not caller.is_alive(), "the call hung after its rank died"
        assert events[-1] == "[DONE]"
        assert "rank" in events[-2]["error"]["message"]
        assert whole[0].status_code >= 500 and "rank" in whole[0].json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/generate", json={"text": "hi"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["message"]
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_a_failing_rank_ends_its_requests_and_is_restarted(launch_tiny):
    import ray

    server = launch_tiny(colocated=True, allow_fault_injection=True)
    try:
        url = server.url
        body = {"input_ids": list(range(5, 40)), "sampling_params": {"max_new_tokens": 8}}
        rank = server.ranks[0]
        # add_request fails inside the rank (not a refusal) and there is no other rank: 503.
        ray.get(rank.inject_fault.remote("fail_add", 1))
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert "engine rank 0" in r.json()["error"]["message"]
        assert "fail_add" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        # Slow steps (for tests that race a watch against the decode): each takes 10 ms more.
        long = {**body, "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}}
        took = []
        for slow in (False, True):
            if slow:
                ray.get(rank.inject_fault.remote("slow_step", 50))
            began = time.monotonic()
            r = httpx.post(f"{url}/generate", json=long, timeout=60)
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 50, r.text
            took.append(time.monotonic() - began)
        assert took[1] - took[0] >= 0.3, took  # 0.5 s of sleeps
        # A step fails, or the loop around the steps (here: once it took the request in):
        # its requests end with the error, the rank exits and Ray restarts it.
        for fault, said in (("fail_step", "engine step failed"), ("fail_loop", "loop failed")):
            pid = ray.get(rank.ready.remote()).pid
            ray.get(rank.inject_fault.remote(fault, 1))
            r = httpx.post(f"{url}/generate", json=body, timeout=60)
            assert r.status_code >= 500, r.text
            assert said in r.json()["error"]["message"], r.text
            deadline = time.monotonic() + 90
            while True:
                health = httpx.get(f"{url}/health").status_code
                if health == 200 and server.router.rank_errors == [None]:
                    info = server.router.infos[0]
                    if info is not None and info.pid != pid:
                        break
                assert time.monotonic() < deadline, f"the rank was not restarted after {fault}"
                time.sleep(0.3)
            r = httpx.post(f"{url}/generate", json=body, timeout=60)
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 8, r.text
        _wait_idle(url)
        metrics = httpx.get(f"{url}/metrics").text
        assert "pdserve_rank_failures_total 2.0" in metrics
        assert 'pdserve_request_finish_total{reason="error"} 2.0' in metrics
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_sigterm_drains_the_requests_in_flight_then_stops(ray_session, tiny_model_dir):
    """`pdserve serve` as users run it (its own process, joining this session's Ray cluster):
    SIGTERM refuses new requests and lets the one in flight finish, then exits 0."""
    import os
    import signal

    import ray

    cmd = [
        sys.executable, "-m", "orchestrator.cli", "serve", "--model", str(tiny_model_dir),
        "--address", ray.get_runtime_context().gcs_address, "--port", "0", "--colocated",
        "--kv-capacity-tokens", "4096", "--drain-timeout", "60",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url: list[str] = []
    serving = threading.Event()

    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line and " on http://" in line:
                url.append(line.rsplit(" on ", 1)[1].strip())
                serving.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert serving.wait(150), "".join(lines)
        base = url[0]
        n = 600
        body = {
            "input_ids": list(range(5, 30)), "stream": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
        }  # fmt: skip
        last: dict[str, Any] = {}
        first = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{base}/generate", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        last.update(json.loads(line[6:]))
                        first.set()

        consumer = threading.Thread(target=stream)
        consumer.start()
        assert first.wait(60)
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            health = httpx.get(f"{base}/health", timeout=10)
            if health.status_code == 503 and health.json()["status"] == "draining":
                break
            assert time.monotonic() < deadline, health.text
            time.sleep(0.05)
        assert httpx.get(f"{base}/v1/stats", timeout=10).json()["draining"] is True
        refused = httpx.post(f"{base}/generate", json={"text": "hi"}, timeout=30)
        assert refused.status_code == 503 and "shutting down" in refused.text, refused.text
        consumer.join(120)
        assert not consumer.is_alive()
        assert len(last["output_ids"]) == n, last.get("meta_info")
        assert last["meta_info"]["finish_reason"]["type"] == "length"
        assert proc.wait(60) == 0, "".join(lines)
        reader.join(10)
        assert any("draining 1 request(s)" in line for line in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.timeout(180)
def test_a_rid_is_free_again_as_soon_as_its_request_ended(tiny_server):
    """A client that aborts a request may send its `rid` again at once: the ranks know each
    attempt by an id of its own, so what they still hold of the old one (a receive in
    quarantine, a late target) cannot meet the new one. (It could: the new request was
    refused as already running for ~2 s, or waited 30 s for KV that never came.)"""
    import asyncio
    import random

    rng = random.Random(5)
    prompts = [[rng.randrange(5, 1000) for _ in range(rng.randint(200, 600))] for _ in range(24)]

    async def abort_then_reuse(client: httpx.AsyncClient, i: int) -> tuple[int, str, float]:
        rid = f"reused-{i}"
        body = {"input_ids": prompts[i], "rid": rid,
                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}  # fmt: skip
        first = asyncio.ensure_future(client.post("/generate", json=body))
        await asyncio.sleep(0.002 + 0.004 * (i % 8))  # mostly before the first token
        await client.post("/abort_request", json={"rid": rid})
        await first  # ended (aborted, or done): the rid is the client's again
        started = time.monotonic()
        again = {"input_ids": prompts[i][:20], "rid": rid, "sampling_params": _greedy(2)}
        r = await client.post("/generate", json=again)
        return r.status_code, r.text, time.monotonic() - started

    async def run() -> list[tuple[int, str, float]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=tiny_server, timeout=120, limits=limits) as c:
            return list(await asyncio.gather(*(abort_then_reuse(c, i) for i in range(24))))

    def failed_transfers() -> float:
        return _metric(tiny_server, "pdserve_kv_transfers_total", outcome="failed")

    failed_before = failed_transfers()
    results = asyncio.run(run())
    failed = [(status, text) for status, text, _ in results if status != 200]
    assert not failed, failed
    assert max(took for *_, took in results) < 10, results
    _wait_idle(tiny_server)
    assert failed_transfers() == failed_before  # an aborted transfer is no failure


@pytest.mark.timeout(180)
def test_a_stop_ends_the_requests_in_flight_with_an_error_not_a_cut(launch_tiny):
    """A server that stops with requests still running (its drain timed out, or none was
    asked for) ends each with its final error — a stream's error event and `[DONE]`, a JSON
    error — instead of cutting the responses off (found by an audit: streams ended mid-body,
    whole calls got an empty 500)."""
    server = launch_tiny(colocated=True)
    url = server.url
    body = {"input_ids": list(range(5, 40)),
            "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}  # fmt: skip
    lines: list[str] = []
    whole: list[httpx.Response] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True},
                          timeout=60) as r:  # fmt: skip
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    def call() -> None:
        whole.append(httpx.post(f"{url}/generate", json=body, timeout=60))

    threads = [threading.Thread(target=stream), threading.Thread(target=call)]
    try:
        for t in threads:
            t.start()
        assert first.wait(60)
        deadline = time.monotonic() + 30
        while server.router.num_in_flight < 2:
            assert time.monotonic() < deadline and not whole, whole and whole[0].text
            time.sleep(0.01)
    finally:
        server.stop()
    for t in threads:
        t.join(60)
    assert lines[-1] == "data: [DONE]", lines[-2:]
    last = json.loads(lines[-2][len("data: ") :])
    assert "shutting down" in last["error"]["message"], last
    assert whole[0].status_code == 500, whole[0].text
    assert "shutting down" in whole[0].json()["error"]["message"]
