"""Bring a server up in-process: engine ranks (Ray actors), router, HTTP app on uvicorn.

For programs (the CLI, tests, benchmark scripts):

    ray.init()
    server = launch(ServeConfig(port=0))     # blocks until the ranks are ready and it listens
    ... server.url ...                       # e.g. http://127.0.0.1:41235
    server.stop()                            # stops HTTP and the router, shuts the ranks down
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import ray
import uvicorn
from fastapi import FastAPI

from orchestrator.config import ServeConfig, TlsFiles, host_port
from orchestrator.placement import PoolPlacement, PoolSpec, place_pools, remove_placements
from orchestrator.router import Router
from orchestrator.server import create_app
from orchestrator.tokenizer import Tokenizer
from workers.model.hub import checkpoint_dir

logger = logging.getLogger(__name__)


def resolve_model_dir(config: ServeConfig) -> Path:
    """The checkpoint dir to serve: `config.model` (a Hub repository fetched first), or the
    built-in tiny model (written once)."""
    if config.checkpoint is not None:
        return checkpoint_dir(config.checkpoint)
    from workers.model.tiny import ensure_tiny_checkpoint

    return Path(ensure_tiny_checkpoint())


class StartedRanks(NamedTuple):
    ranks: list[Any]  # actor handles: pool instances in order, ranks of an instance in order
    placements: list[PoolPlacement]
    rendezvous: list[Any]  # one `Rendezvous` actor per pool instance of several ranks


PLACEMENT_FORMAT = "pdserve-expert-placement/1"


def read_expert_placements(path: str | None) -> dict[str, list[list[int]]]:
    """Saved placements per pool name (`pdserve rebalance --dump`); {} without a file."""
    if path is None:
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PLACEMENT_FORMAT:
        raise ValueError(f"{path} is not a saved expert placement ({PLACEMENT_FORMAT})")
    pools = data.get("pools")
    if not isinstance(pools, dict):
        raise ValueError(f"{path}: 'pools' must map pool names to phy2log lists")
    return {str(k): v for k, v in pools.items()}


def start_eplb(ranks: list[Any], infos: list[Any], model_dir: Path, config: ServeConfig) -> Any:
    """The EPLB service over the expert-parallel pools (None when there is none)."""
    from eplb.service import EPLBService, PoolHandle
    from workers.model.config import ModelConfig

    pools: dict[str, list[tuple[int, Any]]] = {}
    for handle, info in zip(ranks, infos, strict=True):
        if info.pool_size > 1:
            pools.setdefault(f"{info.role}-{info.instance}", []).append((info.pool_rank, handle))
    if not pools:
        return None
    num_groups = ModelConfig.from_dir(model_dir).n_group
    handles = [
        PoolHandle(name, [h for _, h in sorted(members, key=lambda m: m[0])], num_groups)
        for name, members in sorted(pools.items())
    ]
    service: Any = (
        ray.remote(EPLBService)
        .options(num_cpus=0, max_concurrency=8)
        .remote(handles, config.eplb_interval_s, config.eplb_min_balancedness)
    )
    ray.get(service.start.remote())
    return service


def pool_specs(config: ServeConfig, num_gpus: float) -> list[PoolSpec]:
    """The topology's pool instances and what each rank needs (CPUs; a GPU, or an equal share
    of the cluster's GPUs when there are fewer GPUs than ranks, e.g. a prefill and a decode rank
    on one GPU)."""
    engine = config.engine
    use_gpu = engine.device == "cuda" or (engine.device == "auto" and num_gpus > 0)
    if config.colocated:
        layout = [("colocated", 0, config.num_ranks)]
    else:
        layout = [("prefill", i, config.prefill_dp) for i in range(config.prefill_instances)]
        layout += [("decode", i, config.decode_dp) for i in range(config.decode_instances)]
    total_ranks = sum(n for _, _, n in layout)
    bundle: dict[str, float] = {"CPU": float(engine.num_threads or 1)}
    if use_gpu and num_gpus:
        bundle["GPU"] = min(1.0, num_gpus / total_ranks)
    return [PoolSpec(role, i, n, bundle) for role, i, n in layout]


def starts_local_ray(config: ServeConfig) -> bool:
    """`ray.init` will start a Ray of its own: no --address and no `RAY_ADDRESS` (a Ray this
    process starts gets no new nodes)."""
    return config.ray_address is None and not os.environ.get("RAY_ADDRESS")


def local_ray_cpus(config: ServeConfig, num_cores: int) -> int | None:
    """The CPUs a Ray this process starts itself should declare: None (Ray counts the cores)
    when they hold the topology's ranks, else what the ranks need, so that a small machine
    still runs any topology — its ranks then share cores: right for trying a topology out,
    not for measuring it."""
    needed = sum(spec.num_ranks * spec.bundle["CPU"] for spec in pool_specs(config, 0))
    return math.ceil(needed) if needed > num_cores else None


def start_ranks(model_dir: Path, config: ServeConfig) -> StartedRanks:
    """Place the topology's pool instances and start their engine rank actors (not waiting for
    the models to load); `ray.init` first."""
    from workers.engine.launch import start_engine_rank
    from workers.ep.group import PoolMember, Rendezvous

    specs = pool_specs(config, ray.cluster_resources().get("GPU", 0))
    saved = read_expert_placements(config.init_expert_placement)
    placements = place_pools(
        specs, config.placement_timeout_s, fixed_cluster=starts_local_ray(config)
    )
    ranks: list[Any] = []
    meeting_points: list[Any] = []
    try:
        for placement in placements:
            spec = placement.spec
            rendezvous = None
            if spec.num_ranks > 1:
                rendezvous = (
                    ray.remote(Rendezvous)
                    .options(num_cpus=0, max_restarts=-1)
                    .remote(spec.num_ranks)
                )
                meeting_points.append(rendezvous)
            share = spec.bundle.get("GPU", 0.0)
            engine = dataclasses.replace(config.engine, gpu_memory_share=share or 1.0)
            for i in range(spec.num_ranks):
                ranks.append(
                    start_engine_rank(
                        str(model_dir),
                        engine,
                        num_cpus=spec.bundle["CPU"],
                        num_gpus=spec.bundle.get("GPU", 0.0),
                        role=spec.role,
                        instance=spec.instance,
                        transfer_backend=config.transfer_backend,
                        transfer_timeout_s=config.transfer_timeout_s,
                        allow_fault_injection=config.allow_fault_injection,
                        scheduling_strategy=placement.strategy(i),
                        pool=PoolMember(i, spec.num_ranks, rendezvous) if rendezvous else None,
                        initial_phy2log=saved.get(spec.name) if rendezvous else None,
                        checkpoint=config.checkpoint,
                    )
                )
    except BaseException:
        shutdown_ranks(ranks)
        kill_actors(meeting_points)
        remove_placements(placements)
        raise
    return StartedRanks(ranks, placements, meeting_points)


class RankStartError(RuntimeError):
    """A rank raised while it started (loading the model, joining its pool)."""


def start_error(e: BaseException) -> str:
    """What went wrong in a rank that failed to start, without the Ray traceback around it:
    the last `SomeError: message` line of the remote traceback, else the first line."""
    text = str(e).strip()
    for line in reversed(text.splitlines()):
        name, sep, message = line.partition(": ")
        name = name.rpartition(".")[2]  # safetensors_rust.SafetensorError: ...
        if sep and name.isidentifier() and name[:1].isupper() and name.endswith(_ERROR_ENDINGS):
            return f"{name}: {message}"
    return text.splitlines()[0] if text else type(e).__name__


_ERROR_ENDINGS = ("Error", "Exception", "Exit", "Interrupt")


def wait_ranks_ready(
    ranks: list[Any], timeout_s: float, progress: Callable[[float], None] | None = None
) -> None:
    """Block until every rank's model is loaded; `progress(elapsed_s)` is called every ~5 s.
    Raises TimeoutError, or the rank's own error if it failed to start."""
    refs = [r.ready.remote() for r in ranks]
    start = time.monotonic()
    while True:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=5.0)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                raise RankStartError(
                    f"engine rank {refs.index(ref)} failed to start: {start_error(e)}"
                ) from e
        if not pending:
            return
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            raise TimeoutError(f"{len(pending)} rank(s) not ready after {timeout_s:.0f} s")
        if progress is not None:
            progress(elapsed)


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
    ranks: list[Any]
    owns_ranks: bool = True
    placements: list[PoolPlacement] = field(default_factory=list)
    helpers: list[Any] = field(default_factory=list)  # other actors it started (rendezvous)
    grpc_port: int | None = None

    @property
    def grpc_address(self) -> str | None:
        if self.grpc_port is None:
            return None
        host = self.url.split("//", 1)[1].rsplit(":", 1)[0]
        return f"{host}:{self.grpc_port}"

    def drain(self, timeout_s: float, stop_now: threading.Event | None = None) -> int:
        """Refuse new requests (503) and wait up to `timeout_s` (or until `stop_now` is set)
        for the ones in flight to end; returns how many are still in flight."""
        self.router.draining = True
        stop_now = stop_now or threading.Event()
        deadline = time.monotonic() + timeout_s
        while self.router.num_in_flight and time.monotonic() < deadline:
            if stop_now.wait(0.1):
                break
        return self.router.num_in_flight

    def stop(self) -> None:
        self.http.stop()
        if self.owns_ranks:
            shutdown_ranks(self.ranks)
            kill_actors(self.helpers)
            remove_placements(self.placements)


def shutdown_ranks(ranks: list[Any], timeout_s: float = 15.0) -> None:
    """Stop each rank's loop, then kill its actor (freeing its resources in the cluster)."""
    refs = [r.shutdown.remote() for r in ranks]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    kill_actors(ranks)


def kill_actors(actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception as e:  # already gone
            logger.debug("ray.kill of an actor failed: %s", e)


def launch(
    config: ServeConfig,
    model_dir: Path | None = None,
    ranks: list[Any] | None = None,
    progress: Callable[[float], None] | None = None,
) -> LocalServer:
    """Start ranks (unless given), wait for them, and serve HTTP on `config.host:config.port`
    (port 0: a free one) from a background thread. `ray.init` must have run."""
    model_dir = model_dir or resolve_model_dir(config)
    owns_ranks = ranks is None
    placements: list[PoolPlacement] = []
    helpers: list[Any] = []
    if ranks is None:
        ranks, placements, helpers = start_ranks(model_dir, config)
    try:
        wait_ranks_ready(ranks, config.ready_timeout_s, progress)
        infos = ray.get([r.ready.remote() for r in ranks])
        eplb = start_eplb(ranks, infos, model_dir, config)
        if eplb is not None:
            helpers.append(eplb)
        router = Router(
            ranks,
            Tokenizer.from_dir(model_dir),
            model_name=config.model_name(model_dir),
            stream_silence_s=config.stream_silence_s,
            request_timeout_s=config.request_timeout_s,
            max_queued_requests=config.max_queued_requests,
        )
        app = create_app(router, config, eplb=eplb)
        http = ServerThread(
            app, config.host, config.port, config.log_level, config.access_log, config.tls
        )
        http.start()
        deadline = time.monotonic() + 30
        grpc = app.state.grpc_server
        while time.monotonic() < deadline and not (
            router.is_ready and (grpc is None or grpc.serving)
        ):
            time.sleep(0.01)  # the router's own ready() calls return at once now (and the
            # gRPC health service follows it within 0.25 s)
    except BaseException:
        if owns_ranks:
            shutdown_ranks(ranks)
            kill_actors(helpers)
            remove_placements(placements)
        raise
    grpc_port = app.state.grpc_server.port if app.state.grpc_server is not None else None
    return LocalServer(
        http.url, model_dir, router, http, ranks, owns_ranks, placements, helpers, grpc_port
    )
