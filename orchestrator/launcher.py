"""Bring a server up in-process: engine ranks (Ray actors), router, HTTP app on uvicorn.

For programs (the CLI, tests, benchmark scripts):

    ray.init()
    server = launch(ServeConfig(port=0))     # blocks until the ranks are ready and it listens
    ... server.url ...                       # e.g. http://127.0.0.1:41235
    server.stop()                            # stops HTTP and the router, shuts the ranks down
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import uvicorn
from fastapi import FastAPI

from orchestrator import deployment as dep
from orchestrator.config import ServeConfig, host_port
from orchestrator.placement import PoolPlacement
from orchestrator.pool_instance import kill_actors, pool_specs, wait_ranks_ready
from orchestrator.pools import PoolSet
from orchestrator.router import Router
from orchestrator.server import create_app
from orchestrator.tls import TlsFiles
from orchestrator.tokenizer import Tokenizer
from workers.model.config import ModelConfig
from workers.model.hub import checkpoint_dir

logger = logging.getLogger(__name__)


def resolve_model_dir(config: ServeConfig) -> Path:
    """The checkpoint dir to serve: `config.model` (a Hub repository fetched first), or the
    built-in tiny model (written once)."""
    if config.checkpoint is not None:
        return checkpoint_dir(config.checkpoint)
    from workers.model.tiny import ensure_tiny_checkpoint

    return Path(ensure_tiny_checkpoint())


def start_eplb(ranks: list[Any], infos: list[Any], model_dir: Path, config: ServeConfig) -> Any:
    """The EPLB service over the expert-parallel pools (None when there is none)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from eplb.service import EPLBService
    from orchestrator.eplb_watch import expert_pools

    handles = expert_pools(ranks, infos, ModelConfig.from_dir(model_dir).n_group)
    if not handles:
        return None
    # On the router's node: it fails with the router, not with a pool's node. Ray restarts it
    # when its process dies; `EplbWatch` then hands it the pools of that moment.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    service: Any = (
        ray.remote(EPLBService)
        .options(num_cpus=0, max_concurrency=8, max_restarts=-1, scheduling_strategy=here)
        .remote(
            handles,
            config.eplb_interval_s,
            config.eplb_min_balancedness,
            max_staging_bytes=int(config.eplb_max_staging_gib * (1 << 30)),
        )
    )
    ray.get(service.start.remote())
    return service


def local_ray_cpus(config: ServeConfig, num_cores: int) -> int | None:
    """The CPUs a Ray this process starts itself should declare: None (Ray counts the cores)
    when they hold the topology's ranks (with the instances autoscaling may add), else what
    the ranks need, so that a small machine still runs any topology — its ranks then share
    cores: right for trying a topology out, not for measuring it."""
    specs = pool_specs(config, 0)
    for role, most in config.autoscale_bounds().items():  # room for what it may add by load
        mine = [s for s in specs if s.role == role]
        specs += mine[:1] * (most - len(mine))
    needed = sum(spec.num_ranks * spec.bundle["CPU"] for spec in specs)
    return math.ceil(needed) if needed > num_cores else None


class ServerThread:
    """uvicorn serving `app` on its own thread and event loop."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        log_level: str = "warning",
        access_log: bool = False,
        tls: TlsFiles | None = None,
    ):
        """`tls`: the PEM files to serve HTTPS with (and to check clients' certificates)."""
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            lifespan="on",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
            ssl_certfile=tls.certfile if tls else None,
            ssl_keyfile=tls.keyfile if tls else None,
            ssl_ca_certs=tls.client_cas if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_cas else ssl.CERT_NONE,
        )
        self.scheme = "https" if tls else "http"
        self.server = uvicorn.Server(config)
        self.app = app
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self._run, name="pdserve-http", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits so when it cannot start: see start
            self.server.run()

    def start(self, timeout_s: float = 60.0) -> None:
        """Start serving; return once it listens (`port` is then the bound port)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                error = getattr(self.app.state, "startup_error", None)
                if error is not None:
                    raise RuntimeError(f"the server failed to start: {error}") from error
                raise RuntimeError(
                    f"the HTTP server failed to start on {self.host}:{self.port} (is the port "
                    "in use? uvicorn's error is above)"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start in time")
            time.sleep(0.02)
        servers = getattr(self.server, "servers", [])
        if servers and servers[0].sockets:
            self.port = int(servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{self.scheme}://{host_port(host, self.port)}"

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)


@dataclass
class LocalServer:
    """A running server; `stop` ends HTTP, the router and (if it started them) the ranks."""

    url: str
    model_dir: Path
    router: Router
    http: ServerThread
    pools: PoolSet | None  # the pool instances it started (None: ranks given to `launch`)
    given_ranks: list[Any] = field(default_factory=list)
    eplb: Any = None  # the EPLB service actor it started
    grpc_port: int | None = None

    @property
    def ranks(self) -> list[Any]:
        """Every rank's actor handle by the router's index (ranks of instances scaled down
        included: indices are not reused)."""
        return list(self.router.ranks.handles)

    @property
    def placements(self) -> list[PoolPlacement]:
        return self.pools.placements if self.pools is not None else []

    @property
    def helpers(self) -> list[Any]:
        """The other actors it started (rendezvous, the EPLB service)."""
        own = self.pools.helpers if self.pools is not None else []
        return own + ([self.eplb] if self.eplb is not None else [])

    @property
    def grpc_address(self) -> str | None:
        if self.grpc_port is None:
            return None
        host = self.url.split("//", 1)[1].rsplit(":", 1)[0]
        return f"{host}:{self.grpc_port}"

    def drain(self, timeout_s: float, stop_now: threading.Event | None = None) -> int:
        """Refuse new requests (503) and wait up to `timeout_s` (or until `stop_now` is set)
        for the ones in flight to end, and for a scale that runs to wind up (it stops waiting
        for new instances and drains: the server's own drain is this one); returns how many
        requests are still in flight."""
        self.router.draining = True
        stop_now = stop_now or threading.Event()
        deadline = time.monotonic() + timeout_s
        while self.router.num_in_flight or (self.pools is not None and self.pools.scaling):
            if time.monotonic() > deadline or stop_now.wait(0.1):
                break
        return self.router.num_in_flight

    def end_requests(self, message: str, timeout_s: float = 5.0) -> None:
        """End the requests still in flight with `message` — each client gets its final
        error (an SSE error event and `[DONE]`, a JSON error) — and wait up to `timeout_s`
        for their handlers to send it: HTTP's own stop would cut them off mid-response."""
        loop = self.router.loop
        if loop is None or not self.router.num_in_flight or not self.http.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
            loop.call_soon_threadsafe(self.router.end_all, message)
        deadline = time.monotonic() + timeout_s
        while self.router.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # their last bytes leave before the connections close

    def stop(self) -> None:
        self.router.draining = True  # a scale that runs stops waiting for new instances ...
        if self.pools is not None:  # ... and for its drains, and answers before HTTP stops
            self.pools.stopping = True
            deadline = time.monotonic() + 10
            while self.pools.scaling and time.monotonic() < deadline:
                time.sleep(0.05)
        self.end_requests("the server is shutting down")
        self.http.stop()
        if self.pools is not None:
            self.pools.shutdown()
        if self.eplb is not None:
            kill_actors([self.eplb])


def _router(config: ServeConfig, ranks: list[Any], model_dir: Path, tag: str = "") -> Router:
    return Router(
        ranks,
        Tokenizer.from_dir(model_dir),
        model_name=config.model_name(model_dir),
        stream_silence_s=config.stream_silence_s,
        request_timeout_s=config.request_timeout_s,
        restart_wait_s=config.rank_restart_wait_s,
        max_queued_requests=config.max_queued_requests,
        tag=tag,
    )


def _serve_app(app: FastAPI, config: ServeConfig, router: Router) -> ServerThread:
    """Serve `app` on its thread; return once it listens and its router (and gRPC API)
    serve, or after 30 s."""
    http = ServerThread(
        app, config.host, config.port, config.log_level, config.access_log, config.tls
    )
    http.start()
    deadline = time.monotonic() + 30
    grpc = app.state.grpc_server
    while time.monotonic() < deadline and not (router.is_ready and (grpc is None or grpc.serving)):
        time.sleep(0.01)  # the router's own ready() calls return at once now (and the
        # gRPC health service follows it within 0.25 s)
    return http


def start_pools(model_dir: Path, config: ServeConfig) -> tuple[PoolSet, bool]:
    """The server's pool instances, started — or with `--deployment`, taken over when the
    cluster holds that deployment already (`orchestrator.deployment`): then also True. Raises
    DeploymentError when another router serves it, or its ranks run other settings or code."""
    if config.deployment is None:
        return PoolSet.start(model_dir, config), False
    name = config.deployment
    lease = dep.Lease(name)
    lease.acquire()
    try:
        record = dep.load(name)
        if record is None:
            pools, taken_over = PoolSet.start(model_dir, config), False
        else:
            remove = f"`pdserve down --address ... --deployment {name}`"
            if record.code != dep.code_fingerprint():
                raise dep.DeploymentError(
                    f"deployment {name!r} runs other pdserve code than this installation (its "
                    f"ranks started from {record.code}, this is {dep.code_fingerprint()}): "
                    f"remove it with {remove} and serve again"
                )
            diff = dep.differences(record.settings, dep.settings_of(config, model_dir))
            if diff:
                raise dep.DeploymentError(
                    f"deployment {name!r} runs with other settings ({'; '.join(diff)}): serve "
                    f"it with the flags it was started with, or remove it with {remove}"
                )
            pools, taken_over = PoolSet.take_over(model_dir, config, record), True
    except BaseException:
        lease.release()
        raise
    pools.lease = lease
    return pools, taken_over


def launch(
    config: ServeConfig,
    model_dir: Path | None = None,
    ranks: list[Any] | None = None,
    progress: Callable[[float], None] | None = None,
) -> LocalServer:
    """Start the pool instances (unless `ranks` are given, or with `config.front` the
    deployment's are served), wait for them, and serve HTTP on `config.host:config.port`
    (port 0: a free one) from a background thread. `ray.init` must have run."""
    if config.front is not None:
        return _launch_front(config, model_dir, progress)
    model_dir = model_dir or resolve_model_dir(config)
    pools, taken_over = start_pools(model_dir, config) if ranks is None else (None, False)
    given = list(ranks) if ranks is not None else []
    eplb = None
    try:
        ranks = pools.ranks if pools is not None else given
        wait_ranks_ready(ranks, config.ready_timeout_s, progress)
        infos = ray.get([r.ready.remote() for r in ranks])
        if taken_over:  # what the ranks hold is the old router's: its clients are gone
            left = sum(ray.get([r.abort_all.remote() for r in ranks], timeout=120))
            assert pools is not None
            logger.warning("deployment %s: took over %d pool instance(s) (%s); aborted %d "
                           "request(s) of the previous router", config.deployment,
                           len(pools.instances), ", ".join(i.name for i in pools.instances),
                           left)  # fmt: skip
        eplb = start_eplb(ranks, infos, model_dir, config)
        router = _router(config, ranks, model_dir)
        groups = ModelConfig.from_dir(model_dir).n_group if eplb is not None else 1
        app = create_app(router, config, eplb=eplb, pools=pools, expert_groups=groups)
        http = _serve_app(app, config, router)
    except BaseException:
        if pools is not None:
            if taken_over:  # a router that failed to start does not take the deployment down
                pools.keep_on_exit = True
            pools.shutdown()
        if eplb is not None:
            kill_actors([eplb])
        raise
    grpc_port = app.state.grpc_server.port if app.state.grpc_server is not None else None
    return LocalServer(http.url, model_dir, router, http, pools, given, eplb, grpc_port)


def _launch_front(
    config: ServeConfig, model_dir: Path | None, progress: Callable[[float], None] | None
) -> LocalServer:
    """A front router of deployment `config.front` (`orchestrator.front`): its serving
    instances' ranks, found by name, then HTTP; the ranks are not ours to stop."""
    from orchestrator import front

    assert config.front is not None
    if model_dir is None:
        model_dir = front.model_dir_of(config, front.load_record(config.front))
    # Ready ones only: those still starting are taken on by the watch.
    watch_known, ranks = front.first_ranks(config.front, config.ready_timeout_s, progress)
    router = _router(config, ranks, model_dir, tag=front.new_tag())
    watch = front.FrontWatch(router, config.front, watch_known, migrate=config.kv_migration)
    watch.lease = dep.front_lease(config.front, router.tag)  # `pdserve down` sees this router
    app = create_app(router, config, front=watch)
    http = _serve_app(app, config, router)
    logger.warning("front router %s of deployment %s: %d pool instance(s) (%s)", router.tag,
                   config.front, len(watch_known), ", ".join(watch_known))  # fmt: skip
    grpc_port = app.state.grpc_server.port if app.state.grpc_server is not None else None
    return LocalServer(http.url, model_dir, router, http, None, ranks, None, grpc_port)
