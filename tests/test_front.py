"""Front routers (`pdserve serve --front NAME`): more routers for one deployment, each a
`pdserve serve` process as users run it, on this session's Ray cluster. The primary router
starts the pools (prefill + decode, disaggregated); a front router serves the same ranks: the
same greedy tokens through either, both at once; a front router that dies leaves nothing on
the ranks, and its requests are not touched by a primary that dies and is taken over; scale
ups and downs by the primary reach the front router; admin commands that change the pools
are refused by a front router with a 409 naming the primary."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.test_deployment import _down, _Serve

pytestmark = pytest.mark.timeout(420)

TOKEN = "front-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POOLS = ("--prefill-dp", "1", "--decode-dp", "1")
MOVED = 4000  # tokens of the requests a scale-down moves: they run for ~10 s, it moves in ~2


def _body(i: int, max_new_tokens: int = 24, stream: bool = False) -> dict[str, Any]:
    return {
        "input_ids": list(range(5 + i, 40 + i)), "stream": stream,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                            "ignore_eos": True},
    }  # fmt: skip


def _greedy(url: str, i: int) -> list[int]:
    r = httpx.post(f"{url}/generate", json=_body(i), timeout=120)
    assert r.status_code == 200, r.text
    return list(r.json()["output_ids"])


def _stats(url: str) -> list[dict[str, Any]]:
    ranks: list[dict[str, Any]] = httpx.get(f"{url}/v1/stats", timeout=10).json()["ranks"]
    return ranks


def _wait(what: str, check: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _generate_calls(url: str) -> float:
    """The /generate calls a router answered with 200 (its `/metrics`)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith('pdserve_requests_total{route="/generate",status="200"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _generated(url: str) -> int:
    return sum(r["stats"]["num_generated_tokens"] for r in _stats(url))


def _idle(url: str) -> bool:
    """Every rank holds no request and no page (seen from the router at `url`)."""
    return all(
        r["stats"] is not None
        and r["stats"]["num_running"] == 0
        and r["stats"]["num_waiting"] == 0
        and r["stats"]["num_pages_used"] == 0
        for r in _stats(url)
    )


class _Streams:
    """Long streamed requests on a router, read until they end (or their router dies)."""

    def __init__(self, url: str, count: int, max_new_tokens: int = 4000):
        self.started = threading.Semaphore(0)
        self.results: list[list[int] | None] = [None] * count
        self.threads = [
            threading.Thread(target=self._run, args=(url, i, max_new_tokens), daemon=True)
            for i in range(count)
        ]
        for t in self.threads:
            t.start()

    def _run(self, url: str, i: int, max_new_tokens: int) -> None:
        ids: list[int] = []
        said = False
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream("POST", f"{url}/generate", json=_body(i, max_new_tokens, True),
                         timeout=120) as r,
        ):  # fmt: skip
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: ") :])
                if not said:
                    said = True
                    self.started.release()
                ids = event.get("output_ids", ids)
                if event.get("meta_info", {}).get("finish_reason"):
                    self.results[i] = ids

    def wait_started(self) -> None:
        for _ in self.threads:
            assert self.started.acquire(timeout=120)

    def join(self) -> list[list[int] | None]:
        for t in self.threads:
            t.join(180)
        return self.results


def test_a_front_router_serves_the_deployment_beside_its_router(ray_session, tiny_model_dir):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    name = f"f-{uuid.uuid4().hex[:8]}"
    primary = _Serve(gcs, tiny_model_dir, name, "--admin-token", TOKEN, pools=POOLS)
    front = again = primary2 = None
    try:
        url = primary.wait_serving()
        want = [_greedy(url, i) for i in range(4)]
        front = _Serve(
            gcs,
            tiny_model_dir,
            "",
            "--front",
            name,
            "--admin-token",
            TOKEN,
            "--grpc-port",
            "0",
            pools=POOLS,
        )
        front_url = front.wait_serving()
        assert "front router" in front.log and f"deployment {name}" in front.log, front.log
        assert [_greedy(front_url, i) for i in range(4)] == want

        # Both routers at once, on the same ranks.
        mine = _Streams(url, 4, max_new_tokens=24)
        theirs = _Streams(front_url, 4, max_new_tokens=24)
        assert mine.join() == want and theirs.join() == want

        # `pdserve bench` over both routers: the requests go to each in turn.
        served = _generate_calls(front_url)
        bench = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "bench", "--url", url, "--url",
             front_url, "--num-prompts", "8", "--input-len", "8", "--output-len", "4",
             "--concurrency", "4", "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stdout + bench.stderr
        assert json.loads(bench.stdout)["num_requests"] == 8, bench.stdout
        assert _generate_calls(front_url) - served == 4

        # Admin commands that change the pools belong to the primary.
        r = httpx.post(f"{front_url}/admin/scale", json={"decode": 2}, headers=AUTH)
        assert r.status_code == 409 and "primary router" in r.text, r.text
        r = httpx.post(f"{front_url}/admin/rebalance", json={}, headers=AUTH)
        assert r.status_code == 409 and "primary router" in r.text, r.text
        assert httpx.post(f"{front_url}/admin/flush_cache", headers=AUTH).status_code == 200
        _refused_over_grpc(front.log.split("gRPC (pdserve.v1) on ")[1].split()[0])
        stats = httpx.get(f"{front_url}/v1/stats", timeout=10).json()
        assert stats["front"]["deployment"] == name and stats["deployment"] is None, stats
        status = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "status", "--url", front_url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert f"front router {stats['front']['tag']} of deployment {name}" in status.stdout, (
            status.stdout + status.stderr
        )

        # A front router that dies: its requests end on the ranks (pages freed), the
        # primary's run on.
        before = _generated(url)
        long_front = _Streams(front_url, 3)
        long_front.wait_started()
        # The ranks report holding them (the primary's autoscaler counts them so).
        held = max(r["stats"]["num_reserved_tokens"] for r in _stats(url))
        assert held >= 3 * 4000, held
        kept = _Streams(url, 2, max_new_tokens=200)
        front.stop(signal.SIGKILL)
        kept_results = kept.join()
        assert all(r is not None and len(r) == 200 for r in kept_results), kept_results
        _wait("the dead front router's requests left the ranks", lambda: _idle(url))
        # Aborted when their router's connections broke, not run to their 4000 tokens.
        assert _generated(url) - before < 2 * 200 + 3 * 4000 // 2

        # A primary that dies and is taken over leaves a front router's requests alone.
        again = _Serve(gcs, tiny_model_dir, "", "--front", name, pools=POOLS)
        again_url = again.wait_serving()
        flowing = _Streams(again_url, 2, max_new_tokens=300)
        flowing.wait_started()
        primary.stop(signal.SIGKILL)
        primary2 = _Serve(gcs, tiny_model_dir, name, "--admin-token", TOKEN, pools=POOLS)
        url = primary2.wait_serving()
        assert "aborted 0 request(s) of the previous router" in primary2.log, primary2.log
        results = flowing.join()
        assert all(r is not None and len(r) == 300 for r in results), results

        # Scaling by the primary reaches the front router.
        r = httpx.post(f"{url}/admin/scale", json={"decode": 2}, headers=AUTH, timeout=300)
        assert r.status_code == 200 and r.json()["ok"], r.text
        _wait("the front router took on the new instance", lambda: len(_stats(again_url)) == 3)
        assert [_greedy(again_url, i) for i in range(4)] == want
        # Each router counts the other's requests when it picks a rank
        # (`orchestrator.peer_load`): a stream through the front router, then one through the
        # primary, decode on different ranks (by its own counts alone, the primary would
        # pick the same one, the first).
        first = _Streams(again_url, 1, max_new_tokens=MOVED)
        first.wait_started()
        _wait("the primary counted the front router's request",
              lambda: any(r["load"]["peer_requests"] for r in _stats(url)))  # fmt: skip
        second = _Streams(url, 1, max_new_tokens=MOVED)
        second.wait_started()
        decoding = [r["stats"]["num_running"] for r in _stats(url) if r["info"]["role"] == "decode"]
        assert decoding == [1, 1], _stats(url)
        assert first.join() == second.join() and first.results[0] is not None
        # A scale-down moves the front router's requests still on the instance that goes
        # to the one that stays with their KV, as the primary's own: the same tokens.
        before = httpx.get(f"{again_url}/v1/stats", timeout=10).json()
        moving = _Streams(again_url, 4, max_new_tokens=MOVED)
        moving.wait_started()
        r = httpx.post(f"{url}/admin/scale", json={"decode": 1, "drain_timeout_s": 0},
                       headers=AUTH, timeout=300)  # fmt: skip
        assert r.status_code == 200 and r.json()["ok"], r.text
        _wait("the front router forgot the instance", lambda: len(_stats(again_url)) == 2)
        moved = moving.join()
        after = httpx.get(f"{again_url}/v1/stats", timeout=10).json()
        assert after["num_migrated"] - before["num_migrated"] >= 1, (after, again.log)
        assert after["num_resumed"] == before["num_resumed"], (after, again.log)
        assert "moved to other instances with their KV" in again.log, again.log
        batch = {"input_ids": [_body(i)["input_ids"] for i in range(4)],
                 "sampling_params": _body(0, MOVED)["sampling_params"]}  # fmt: skip
        r = httpx.post(f"{url}/generate", json=batch, timeout=300)
        assert moved == [o["output_ids"] for o in r.json()]
        assert [_greedy(again_url, i) for i in range(4)] == want
        _wait("nothing left on the ranks", lambda: _idle(url))
        # A front router's graceful stop leaves the pools to their primary.
        assert again.stop() == 0, again.log
        assert [_greedy(url, i) for i in range(2)] == want[:2]
    finally:
        for s in (front, again, primary, primary2):
            if s is not None and s.proc.poll() is None:
                s.stop(signal.SIGKILL)
        _down(gcs, "--deployment", name, "--force")


def _refused_over_grpc(address: str) -> None:
    import grpc

    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    metadata = [("authorization", f"Bearer {TOKEN}")]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for call, request in ((stub.Scale, pb.ScaleRequest(instances={"decode": 2})),
                              (stub.Rebalance, pb.RebalanceRequest())):  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                call(request, metadata=metadata, timeout=30)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
            assert "primary router" in (e.value.details() or "")


def test_front_router_refusals(ray_session, tiny_model_dir):
    from orchestrator.config import ServeConfig

    with pytest.raises(ValueError, match="--front needs --address"):
        ServeConfig(front="d1")
    with pytest.raises(ValueError, match="give one of them"):
        ServeConfig(front="d1", deployment="d2", ray_address="auto")
    # A front router may read its deployment's serve file, which names the deployment.
    from orchestrator.cli import build_parser
    from orchestrator.cli.serve import serve_config

    args = build_parser().parse_args(
        ["serve", "--address", "auto", "--front", "d1", "--deployment", "d1", "--keep-pools"]
    )
    config = serve_config(args)
    assert config.front == "d1" and config.deployment is None and not config.keep_pools
    with pytest.raises(ValueError, match="--front 'a/b': 1 to 63 letters"):
        ServeConfig(front="a/b", ray_address="auto")
    import ray

    gcs = ray.get_runtime_context().gcs_address
    from orchestrator import deployment as dep
    from orchestrator.front import first_ranks

    name = f"e-{uuid.uuid4().hex[:8]}"  # recorded, its actors not there (yet)
    instance = dep.InstanceRecord("colocated", 0, 1, {"CPU": 1.0})
    dep.save(dep.DeploymentRecord(name, dep.code_fingerprint(), {}, [instance]))
    try:
        with pytest.raises(dep.DeploymentError, match="has had no pool instance ready for 0 s"):
            first_ranks(name, 0.1)
    finally:
        dep.delete(name)
    missing = _Serve(gcs, tiny_model_dir, "", "--front", "nobody-here", pools=POOLS)
    assert missing.proc.wait(120) == 2, missing.log
    assert "no deployment 'nobody-here' in this Ray cluster" in missing.log, missing.log


def test_mixed_traffic_on_both_routers_while_the_primary_churns(ray_session, tiny_model_dir):
    """`benchmarks/soak.py` against the primary (taking a decode instance out at once every
    third admin turn, the last one replaced) and against a front router at the same time:
    every answer on both as asked — the front router follows the replacements without a gap
    — and nothing held on any rank afterwards."""
    import ray

    from orchestrator.deployment import NAMESPACE

    gcs = ray.get_runtime_context().gcs_address
    name = f"s-{uuid.uuid4().hex[:8]}"
    churn = ("--decode-instances", "2", "--kv-capacity-tokens", "16384")
    primary = _Serve(gcs, tiny_model_dir, name, "--admin-token", TOKEN, *churn, pools=POOLS)
    front = None
    try:
        url = primary.wait_serving()
        front = _Serve(gcs, tiny_model_dir, "", "--front", name, pools=POOLS)
        front_url = front.wait_serving()
        soak = [sys.executable, "benchmarks/soak.py", "--duration", "20", "--concurrency", "4"]
        runs = [
            subprocess.Popen([*soak, "--url", url, "--admin-token", TOKEN, "--admin-every", "2",
                              "--churn", "decode"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True),
            subprocess.Popen([*soak, "--url", front_url, "--seed", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True),
        ]  # fmt: skip
        outs = [run.communicate(timeout=240)[0] for run in runs]
        assert "/admin/scale" in outs[0], outs[0]
        for run, out in zip(runs, outs, strict=True):
            assert run.returncode == 0 and "0 unexpected answer(s), 0 leak(s)" in out, out

        # Decode ranks dead for good: the primary replaces their instances, and the front
        # router's requests wait for the new ones and go on there, as the primary's do.
        streams = _Streams(front_url, 2, max_new_tokens=400)
        streams.wait_started()
        pools = httpx.get(f"{url}/admin/pools", headers=AUTH, timeout=30).json()["pools"]
        for p in pools:
            if p["role"] == "decode" and p["state"] == "serving":
                rank = ray.get_actor(f"{name}/{p['name']}/rank-0", namespace=NAMESPACE)
                ray.kill(rank, no_restart=True)
        results = streams.join()
        assert all(r is not None and len(r) == 400 for r in results), (results, front.log)

        # Front routers keep a deployment whose primary is gone from `pdserve down`; once it
        # is removed anyway, a front router says so on /health.
        primary.stop(signal.SIGKILL)
        refused = _down(gcs, "--deployment", name)
        assert refused.returncode == 1 and "served by front router" in refused.stderr, refused
        assert _down(gcs, "--deployment", name, "--force").returncode == 0
        _wait("the front router reports nothing to serve",
              lambda: httpx.get(f"{front_url}/health", timeout=10).status_code == 503)  # fmt: skip

        def says_removed() -> bool:
            r = httpx.post(f"{front_url}/generate", json=_body(0), timeout=30)
            assert r.status_code == 503, r.text
            return "deployment was removed" in r.text

        _wait("the front router forgot the removed deployment's instances", says_removed)
        assert "deployment " + name + " is gone" in front.log, front.log
    finally:
        for s in (front, primary):
            if s is not None and s.proc.poll() is None:
                s.stop(signal.SIGKILL)
        _down(gcs, "--deployment", name, "--force")
