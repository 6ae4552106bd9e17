"""`pdserve serve --deployment NAME`: pools that outlive their router. `pdserve serve` as users
run it (its own process, joining this session's Ray cluster). A router killed with SIGKILL
leaves its ranks running; the next `serve` of the name takes them over — the same rank
processes, no model load — aborts what the old router left on them and serves the same greedy
tokens; a second `serve` of a served name is refused, and so is one with other settings; a
graceful stop removes everything, or with `--keep-pools` leaves it for the next router;
`pdserve down` removes a deployment that nothing serves."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)


class _Serve:
    """A `pdserve serve` process; `url` once it serves."""

    def __init__(
        self, gcs: str, model_dir: Any, name: str, *extra: str, pools: tuple[str, ...] = ()
    ):
        """`name`: the deployment it starts or takes over ("": none, e.g. a front router);
        `pools`: its pool flags (by default one colocated rank)."""
        deployment = ["--deployment", name] if name else []
        cmd = [
            sys.executable, "-m", "orchestrator.cli", "serve", "--model", str(model_dir),
            "--address", gcs, "--port", "0", *(pools or ("--colocated",)),
            "--kv-capacity-tokens", "32768", *deployment, "--drain-timeout", "0", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)  # fmt: skip
        self.lines: list[str] = []
        self.url = ""
        self.serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "serving" in line and " on http://" in line:
                self.url = line.rsplit(" on ", 1)[1].strip()
                self.serving.set()

    def wait_serving(self, timeout_s: float = 150) -> str:
        assert self.serving.wait(timeout_s), self.log
        return self.url

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.proc.wait(60)


def _greedy(url: str) -> list[int]:
    body = {"input_ids": list(range(5, 40)),
            "sampling_params": {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["output_ids"])


def _pids(url: str) -> list[int]:
    return [r["info"]["pid"] for r in httpx.get(f"{url}/v1/stats", timeout=10).json()["ranks"]]


def _actor_alive(name: str) -> bool:
    import ray

    from orchestrator.deployment import NAMESPACE

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def _down(gcs: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "down", "--address", gcs, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_deployment_outlives_its_router_and_is_taken_over(ray_session, tiny_model_dir):
    import ray

    from orchestrator.deployment import NAMESPACE

    gcs = ray.get_runtime_context().gcs_address
    name = f"t-{uuid.uuid4().hex[:8]}"
    rank = f"{name}/colocated-0/rank-0"
    first = _Serve(gcs, tiny_model_dir, name)
    second = third = None
    try:
        url = first.wait_serving()
        want = _greedy(url)
        pids = _pids(url)
        # Streams in flight when the router dies: their requests are left on the rank, long
        # enough to run on until the next router takes over.
        started = threading.Semaphore(0)

        def stream(i: int) -> None:
            body = {"input_ids": list(range(7 + i, 60)), "stream": True,
                    "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}  # fmt: skip
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r,
            ):
                said = False
                for line in r.iter_lines():  # read on: a client gone aborts its request
                    if line.startswith("data: {") and not said:
                        said = True
                        started.release()

        for i in range(6):
            threading.Thread(target=stream, args=(i,), daemon=True).start()
        for _ in range(6):
            assert started.acquire(timeout=60)
        first.stop(signal.SIGKILL)
        assert _actor_alive(rank), "the rank went with its router"
        held = ray.get(ray.get_actor(rank, namespace=NAMESPACE).stats.remote()).num_running
        assert held == 6, held

        second = _Serve(gcs, tiny_model_dir, name)
        url = second.wait_serving()
        took = re.search(r"took over 1 pool instance\(s\) \(colocated-0\); aborted (\d+) "
                         r"request\(s\)", second.log)  # fmt: skip
        assert took is not None and 1 <= int(took.group(1)) <= 6, second.log
        assert _pids(url) == pids, "the ranks were started again"
        assert _greedy(url) == want
        assert httpx.get(f"{url}/v1/stats", timeout=10).json()["deployment"] == name
        deadline = time.monotonic() + 30
        while True:  # the old router's request is gone: its pages are free
            st = httpx.get(f"{url}/v1/stats", timeout=10).json()["ranks"][0]["stats"]
            if st["num_pages_used"] == 0 and st["num_running"] == 0:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.2)

        # One router at a time; a take-over with other settings is refused.
        third = _Serve(gcs, tiny_model_dir, name)
        assert third.proc.wait(120) != 0 and "is served by pdserve serve pid" in third.log, (
            third.log
        )
        listed = _down(gcs)
        assert listed.returncode == 0 and f"{name}\tcolocated-0" in listed.stdout, listed
        refused = _down(gcs, "--deployment", name)
        assert refused.returncode == 1 and "is served by" in refused.stderr, refused
        # A graceful stop with --keep-pools... (the second router was started without it: it
        # is killed, and a router with --keep-pools takes over and stops gracefully.)
        assert second.stop(signal.SIGKILL) != 0
        other = _Serve(gcs, tiny_model_dir, name, "--page-size", "32")
        assert other.proc.wait(120) != 0, other.log
        assert "runs with other settings (engine.page_size: 16 -> 32" in other.log, other.log
        assert _actor_alive(rank), "a refused take-over removed the pools"

        third = _Serve(gcs, tiny_model_dir, name, "--keep-pools")
        url = third.wait_serving()
        assert _pids(url) == pids and _greedy(url) == want
        assert third.stop() == 0, third.log
        assert _actor_alive(rank), "--keep-pools did not keep them"

        removed = _down(gcs, "--deployment", name)
        assert removed.returncode == 0, removed
        assert rank in removed.stdout.split("\n")
        assert not _actor_alive(rank)
        assert name not in _down(gcs).stdout
    finally:
        for s in (first, second, third):
            if s is not None and s.proc.poll() is None:
                s.stop(signal.SIGKILL)
        _down(gcs, "--deployment", name, "--force")


def test_a_graceful_stop_removes_the_deployment(ray_session, tiny_model_dir):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    name = f"t-{uuid.uuid4().hex[:8]}"
    serve = _Serve(gcs, tiny_model_dir, name)
    try:
        url = serve.wait_serving()
        assert len(_greedy(url)) == 24
        assert _actor_alive(f"{name}/colocated-0/rank-0")
        assert serve.stop() == 0, serve.log
        assert not _actor_alive(f"{name}/colocated-0/rank-0")
        listed = _down(gcs)
        assert listed.returncode == 0 and name not in listed.stdout, listed
        gone = _down(gcs, "--deployment", name)
        assert gone.returncode == 1 and f"no deployment {name!r}" in gone.stderr, gone
    finally:
        if serve.proc.poll() is None:
            serve.stop(signal.SIGKILL)
        _down(gcs, "--deployment", name, "--force")


def test_a_deployment_needs_a_cluster_of_its_own():
    from orchestrator.config import ServeConfig

    with pytest.raises(ValueError, match="--deployment needs --address"):
        ServeConfig(deployment="d1")
    with pytest.raises(ValueError, match="1 to 63 letters"):
        ServeConfig(deployment="a/b", ray_address="auto")
    with pytest.raises(ValueError, match="--keep-pools needs --deployment"):
        ServeConfig(keep_pools=True)
    assert json.loads(json.dumps(ServeConfig(deployment="d1", ray_address="auto").deployment))


def test_a_record_reads_back_and_leaves_out_what_a_newer_router_added():
    from orchestrator import deployment as dep

    instance = dep.InstanceRecord("decode", 3, 2, {"CPU": 1.0}, None, True, True)
    record = dep.DeploymentRecord("d1", "c0de", {"transfer_timeout_s": 5.0}, [instance])
    assert dep.DeploymentRecord.from_json(record.to_json()) == record
    raw = json.loads(record.to_json())
    raw["instances"][0]["added_later"] = 1
    raw["also_added_later"] = {}
    again = dep.DeploymentRecord.from_json(json.dumps(raw))
    assert again == record and again.instances[0].moving
    # A field added later is written only when it is set: older routers read the rest.
    instance.moving = False
    assert "moving" not in json.loads(record.to_json())["instances"][0]
    assert dep.DeploymentRecord.from_json(record.to_json()) == record
    raw["format"] = "something-else"
    with pytest.raises(dep.DeploymentError, match="is not"):
        dep.DeploymentRecord.from_json(json.dumps(raw))
