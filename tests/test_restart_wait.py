"""Requests whose only rank (pair) fails wait for it (`--rank-restart-wait`). A rank that dies
under streamed requests: the streams stay open — kept alive by SSE comments while they wait,
which clients, the `openai` one included, skip — and go on once Ray has restarted the rank,
with the same greedy tokens as without the failure; `/v1/stats` and `/metrics` show the wait.
A rank dead for good (Ray will not restart it), alone or in an expert-parallel pool: its
instance is replaced, a failed start of the replacement retried, and the requests resume on
the new instance."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.disagg_calls import _greedy, _greedy_outputs, _metric, _wait_all_pages_free

pytestmark = pytest.mark.timeout(240)


def test_streams_wait_for_their_restarted_rank_kept_alive_and_resume(launch_tiny):
    import openai
    import ray

    server = launch_tiny(colocated=True, sse_keepalive_s=0.5)
    try:
        url = server.url
        prompt = list(range(7, 90))
        body = {"input_ids": prompt, "sampling_params": _greedy(600), "stream": True}
        want = httpx.post(url + "/generate", json={**body, "stream": False}, timeout=120).json()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        completion = {"model": client.models.list().data[0].id, "prompt": prompt[:40],
                      "max_tokens": 600, "temperature": 0.0}  # fmt: skip
        want_text = client.completions.create(**completion, extra_body={"ignore_eos": True})
        want_text = want_text.choices[0].text

        lines: list[str] = []
        started = threading.Event()
        chunks: list[Any] = []

        def stream_generate() -> None:
            with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line:
                        continue  # the blank line after each event
                    lines.append(line)
                    if line.startswith("data: {"):
                        started.set()

        def stream_openai() -> None:
            for chunk in client.completions.create(
                **completion, stream=True, extra_body={"ignore_eos": True}
            ):
                chunks.append(chunk)

        threads = [threading.Thread(target=stream_generate), threading.Thread(target=stream_openai)]
        for t in threads:
            t.start()
        assert started.wait(60)
        waited_before = server.router.num_waited
        ray.kill(server.ranks[0], no_restart=False)
        # While the rank restarts: nothing can take a request, and the two wait.
        saw_wait = saw_gauge = False  # each read on its own: the wait may end between them
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            stats = httpx.get(url + "/v1/stats", timeout=10).json()
            saw_wait |= stats["num_waiting_for_rank"] > 0
            saw_gauge |= _metric(url, "pdserve_requests_waiting_for_rank") >= 1
            time.sleep(0.1)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a stream hung after its rank died"
        assert saw_wait and saw_gauge and server.router.num_waited >= waited_before + 1

        events = [json.loads(line[len("data: ") :]) for line in lines
                  if line.startswith("data: {")]  # fmt: skip
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert events[-1]["output_ids"] == want["output_ids"], "other tokens after the wait"
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
        assert ": keep-alive" in lines, "no keep-alive while the stream waited"
        text = "".join(c.choices[0].text for c in chunks)
        assert text == want_text and chunks[-1].choices[0].finish_reason == "length"
        _wait_all_pages_free(url)
        assert server.router.num_waiting == 0 and server.router.num_in_flight == 0
    finally:
        server.stop()


def test_an_instance_with_a_rank_dead_for_good_is_replaced_and_its_requests_resume_there(
    launch_tiny, monkeypatch
):
    """The decode rank of the only pair is killed for good (Ray will not restart it): its
    instance is taken down and a new one started — its first start fails here, and is tried
    again — and the requests that ran on it resume there with the same greedy tokens."""
    import asyncio

    import ray

    from orchestrator import replacement
    from tests.disagg_calls import _generate_async

    server = launch_tiny()
    try:
        url = server.url
        prompts = [list(range(3 + i, 60 + 7 * i)) for i in range(4)]
        want = _greedy_outputs(url, prompts, 300)
        monkeypatch.setattr(replacement, "REPLACE_RETRY_S", 0.5)
        assert server.pools is not None
        real_start = server.pools.start_instance
        fails = [1]

        def start_instance(spec: Any, cancelled: Any) -> Any:
            if fails[0]:
                fails[0] -= 1
                raise RuntimeError("injected: the first replacement does not start")
            return real_start(spec, cancelled)

        monkeypatch.setattr(server.pools, "start_instance", start_instance)
        roles = [r["info"]["role"] for r in httpx.get(url + "/v1/stats").json()["ranks"]]
        decode = server.ranks[roles.index("decode")]

        async def run() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=180) as client:
                tasks = [asyncio.ensure_future(_generate_async(client, url, p, 300))
                         for p in prompts]  # fmt: skip
                deadline = time.monotonic() + 60
                while (await decode.stats.remote()).num_running < 2:
                    assert time.monotonic() < deadline, "the decode rank never ran them"
                    await asyncio.sleep(0.01)
                ray.kill(decode, no_restart=True)
                return list(await asyncio.gather(*tasks))

        results = asyncio.run(run())
        assert [status for status, _ in results] == [200] * len(prompts), results
        assert [json.loads(text)["output_ids"] for _, text in results] == want
        assert fails == [0], "the failing first start was not tried"
        pools = {p["name"]: p["state"] for p in httpx.get(url + "/v1/stats").json()["pools"]}
        assert pools == {"prefill-0": "serving", "decode-2": "serving"}, pools
        assert _metric(url, "pdserve_pool_instances_replaced_total", role="decode") == 1
        assert server.router.num_replacing == 0
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=10).json()["status"] != "ok":
            assert time.monotonic() < deadline, "not healthy after the replacement"
            time.sleep(0.2)
        _wait_all_pages_free(url)
    finally:
        server.stop()


def test_an_expert_parallel_instance_with_a_rank_dead_for_good_is_replaced(launch_tiny):
    """One rank of the only (two-rank, colocated) pool is killed for good while it and its
    peer run requests: the peer leaves the broken pool, the instance is replaced by one of two
    new ranks, and every request resumes there with the same greedy tokens."""
    import asyncio

    import ray

    from tests.disagg_calls import _generate_async

    server = launch_tiny(colocated=True, num_ranks=2)
    try:
        url = server.url
        prompts = [list(range(5 + i, 50 + 9 * i)) for i in range(6)]
        want = _greedy_outputs(url, prompts, 300)

        async def run() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=180) as client:
                tasks = [asyncio.ensure_future(_generate_async(client, url, p, 300))
                         for p in prompts]  # fmt: skip
                deadline = time.monotonic() + 60
                while True:
                    stats = await asyncio.gather(*(r.stats.remote() for r in server.ranks[:2]))
                    if all(st.num_running > 0 for st in stats):
                        break
                    assert time.monotonic() < deadline, "the pool never ran them"
                    await asyncio.sleep(0.01)
                ray.kill(server.ranks[1], no_restart=True)
                return list(await asyncio.gather(*tasks))

        results = asyncio.run(run())
        assert [status for status, _ in results] == [200] * len(prompts), results
        assert [json.loads(text)["output_ids"] for _, text in results] == want
        pools = {p["name"]: p for p in httpx.get(url + "/v1/stats").json()["pools"]}
        assert list(pools) == ["colocated-1"] and pools["colocated-1"]["ranks"] == [2, 3], pools
        _wait_all_pages_free(url)
    finally:
        server.stop()
