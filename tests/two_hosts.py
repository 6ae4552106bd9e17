"""A two-host deployment on one machine, for `test_multinode`: each host is a Linux network
namespace with its own address on a private switch (`tests/netns.py`), a Ray head runs in host
A, a Ray worker node in host B, and `pdserve serve` (the CLI, as an operator runs it) in host A.
`deploy()` starts it, waits until it serves, and stops it; `Deployment` holds its handles and
the greedy outputs of `PROMPTS` on a local in-process `Engine` to compare against.

Setup notes: Ray's token authentication is on (2.60's default) with a fresh token handed to
every Ray process and the driver through `RAY_AUTH_TOKEN` (with `RAY_AUTH_MODE=token`); nothing
is read from or written to `~/.ray/auth_token`. Each node has its own `--temp-dir` (so the
`ray_current_cluster` file of this cluster is not in `/tmp/ray`, where the suite's own
`ray.init()` looks) and its own network namespace (so no port can clash with another Ray on
the machine). `UCX_TLS=tcp`: namespaces share one kernel, /dev/shm and ptrace, so UCX would
otherwise move the KV through its shared-memory transports between the "hosts" (measured:
~300 bytes over the link for a 1.3 MB transfer) instead of over the network.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.netns import VirtualNetwork

ROOT = Path(__file__).resolve().parents[1]
RAY_PORT = 6379  # each host has its own network namespace: no clash with any other Ray
HTTP_PORT = 30000
TRANSFER_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 30.0
GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [list(range(5, 40)), [7, 3, 900, 41, 41, 12, 600, 5, 88], list(range(5, 1005))]

# Waits for both nodes to be alive in the cluster (run inside host A).
WAIT_NODES = textwrap.dedent(
    """
    import sys, time
    from ray._raylet import GcsClient
    address, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
    client, alive, error = None, 0, None
    while time.monotonic() < deadline:
        try:
            client = client or GcsClient(address=address)
            infos = client.get_all_node_info(timeout=5).values()
            alive = sum(1 for n in infos if n.state == 0)  # GcsNodeInfo.ALIVE
            if alive >= want:
                sys.exit(0)
        except Exception as e:
            error = e
        time.sleep(0.3)
    sys.exit(f"{alive} of {want} nodes alive after {sys.argv[3]} s (last error: {error!r})")
    """
)


@dataclass
class Deployment:
    net: VirtualNetwork
    url: str
    serve_log: Path
    serve: subprocess.Popen[Any]
    worker: subprocess.Popen[Any]  # host B's Ray node (`ray start --block`)
    start_worker: Callable[[str], subprocess.Popen[Any]]  # B joins (again): a new Ray node
    wait_nodes: Callable[[int], None]  # until that many nodes are alive
    reference: dict[int, list[int]] = field(default_factory=dict)  # prompt index -> tokens

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.serve_log.read_text(errors="replace")[-n:]
        return ""


def _client() -> Any:
    import httpx

    # trust_env=False: a CI proxy setting must not capture requests to the namespaces.
    return httpx.Client(trust_env=False, timeout=60)


def _generate(client: Any, url: str, ids: list[int], timeout: float = 60) -> Any:
    body = {"input_ids": ids, "sampling_params": GREEDY}
    return client.post(f"{url}/generate", json=body, timeout=timeout)


def _local_reference() -> dict[int, list[int]]:
    """Greedy outputs of PROMPTS on an in-process engine (no Ray, no transfer)."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.messages import GenerateRequest, SamplingParams

    config = EngineConfig(page_size=16, kv_capacity_tokens=4096, device="cpu")
    engine = Engine(_model_dir(), config, progress=False)
    out: dict[int, list[int]] = {}
    for i, ids in enumerate(PROMPTS):
        engine.add(GenerateRequest(f"ref{i}", list(ids), SamplingParams(**GREEDY)))  # type: ignore[arg-type]
        tokens: list[int] = []
        while engine.has_work:
            for delta in engine.step():
                assert delta.error is None, delta.error
                tokens += delta.token_ids
        out[i] = tokens
    return out


def _wait_health(client: Any, url: str, timeout_s: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {proc.returncode}")
        try:
            r = client.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return
            last = (r.status_code, r.text[:300])
        except Exception as e:  # not listening yet
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"/health not 200 after {timeout_s:.0f} s (last: {last!r})")


@contextlib.contextmanager
def deploy() -> Iterator[Deployment]:
    """Hosts A and B, a Ray node in each and `pdserve serve` in A, until it answers `/health`;
    torn down on exit (the server first, then the Ray nodes and the namespaces)."""
    model_dir = _model_dir()  # written once here, before two processes could race for it
    # Short: Ray's unix socket paths live under it (at most 107 characters).
    tmp = Path(tempfile.mkdtemp(prefix="pdmn", dir="/tmp"))
    net = VirtualNetwork(["a", "b"])
    logs: dict[str, Any] = {}
    try:
        net.open()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "UCX_"))}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_USAGE_STATS_ENABLED="0",
            UCX_TLS="tcp",
            PYTHONUNBUFFERED="1",
        )
        a, b = net.ips["a"], net.ips["b"]
        bin_dir = Path(sys.executable).parent
        ray = str(bin_dir / "ray") if (bin_dir / "ray").exists() else shutil.which("ray") or "ray"
        common = ["--block", "--num-cpus=2", "--disable-usage-stats"]
        for name in ("head", "worker", "serve"):
            logs[name] = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
        head = net.popen(
            "a",
            [ray, "start", "--head", f"--node-ip-address={a}", f"--port={RAY_PORT}",
             "--include-dashboard=false", f"--temp-dir={tmp}/a", *common],
            env=env, cwd=ROOT, stdout=logs["head"], stderr=subprocess.STDOUT,
        )  # fmt: skip

        def start_worker(tag: str) -> subprocess.Popen[Any]:
            return net.popen(
                "b",
                [ray, "start", f"--address={a}:{RAY_PORT}", f"--node-ip-address={b}",
                 f"--temp-dir={tmp}/b{tag}", *common],
                env=env, cwd=ROOT, stdout=logs["worker"], stderr=subprocess.STDOUT,
            )  # fmt: skip

        def wait_nodes(count: int) -> None:
            wait = net.run(
                "a",
                [sys.executable, "-c", WAIT_NODES, f"{a}:{RAY_PORT}", str(count), "90"],
                env=env, cwd=ROOT, timeout=120,
            )  # fmt: skip
            if wait.returncode != 0:
                tails = {n: (tmp / f"{n}.log").read_text(errors="replace")[-2000:] for n in logs}
                raise RuntimeError(f"Ray cluster not up: {wait.stderr[-2000:]}\n{tails}")

        worker = start_worker("")
        wait_nodes(2)
        assert head.poll() is None and worker.poll() is None
        url = f"http://{a}:{HTTP_PORT}"
        serve = net.popen(
            "a",
            [sys.executable, "-m", "orchestrator.cli", "serve", "--model", model_dir,
             "--address", f"{a}:{RAY_PORT}",
             "--host", a, "--port", str(HTTP_PORT), "--num-threads", "1",
             "--kv-capacity-tokens", "4096", "--page-size", "16", "--device", "cpu",
             "--transfer-timeout", str(TRANSFER_TIMEOUT_S),
             "--request-timeout", str(REQUEST_TIMEOUT_S), "--log-level", "warning"],
            env=env, cwd=ROOT, stdout=logs["serve"], stderr=subprocess.STDOUT,
        )  # fmt: skip
        dep = Deployment(net, url, tmp / "serve.log", serve, worker, start_worker, wait_nodes)
        # The local reference engine loads while the ranks do.
        dep.reference = _local_reference()
        with _client() as client:
            try:
                _wait_health(client, url, 150, serve)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{e}\n--- serve log ---\n{dep.log_tail()}") from None
        yield dep
        # Stop the server first (it removes its placement groups), then the Ray nodes.
        net.stop(serve, grace_s=15)
    finally:
        net.close()
        for f in logs.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _ranks(client: Any, url: str) -> list[dict[str, Any]]:
    r = client.get(f"{url}/v1/stats", timeout=10)
    r.raise_for_status()
    ranks: list[dict[str, Any]] = r.json()["ranks"]
    return ranks


def _model_dir() -> str:
    from workers.model.tiny import ensure_tiny_checkpoint

    return str(ensure_tiny_checkpoint())
