"""A pool instance and starting its ranks: what each rank of the topology needs, starting and
stopping rank actors, and the saved expert placements they start from.

A pool instance is `--prefill-dp` / `--decode-dp` / `--dp` engine ranks in a placement group of
their own (`orchestrator.placement`), with a `Rendezvous` actor when they are several (expert
parallel); `orchestrator.pools.PoolSet` owns them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from orchestrator import deployment as dep
from orchestrator.config import ServeConfig
from orchestrator.placement import PoolPlacement, PoolSpec, remove_placements

logger = logging.getLogger(__name__)

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
    """`ray.init` will start a Ray of its own (`ServeConfig.starts_local_ray`)."""
    return config.starts_local_ray


# ---- ranks -----------------------------------------------------------------------------------


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
    ranks: list[Any],
    timeout_s: float,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Block until every rank's model is loaded; `progress(elapsed_s)` is called every ~5 s.
    Raises TimeoutError, or the rank's own error if it failed to start; RuntimeError once
    `cancelled()` turns true."""
    refs = [r.ready.remote() for r in ranks]
    start = time.monotonic()
    while True:
        wait_s = 5.0 if cancelled is None else 1.0
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        if pending and cancelled is not None and cancelled():
            raise RuntimeError("cancelled: the server is shutting down")
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


# ---- instances -------------------------------------------------------------------------------


@dataclass
class PoolInstance:
    """One pool instance and what it holds in the cluster."""

    spec: PoolSpec
    placement: PoolPlacement | None  # None while a scale-up waits for the cluster to place it
    ranks: list[Any] = field(default_factory=list)  # actor handles in pool rank order
    rendezvous: Any = None  # its pool group's meeting point, when it has several ranks
    indices: list[int] = field(default_factory=list)  # the router's indices of its ranks
    state: str = "starting"  # starting | serving | draining
    # Draining, and its drain timeout ended: the routers move what still runs there to other
    # instances (front routers read it in the deployment's record).
    moving: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def release(self) -> None:
        """Shut its ranks down and give back what it holds in the cluster (blocking)."""
        shutdown_ranks(self.ranks)
        kill_actors([self.rendezvous] if self.rendezvous is not None else [])
        remove_placements([self.placement] if self.placement is not None else [])


def start_ranks(
    instance: PoolInstance,
    model_dir: Path,
    config: ServeConfig,
    saved_placements: dict[str, list[list[int]]],
    stopped: Callable[[], bool],
) -> None:
    """Start the rank actors (and rendezvous) of a placed instance, not waiting for them;
    with `--deployment`, named and detached (`orchestrator.deployment`). `saved_placements`:
    `read_expert_placements`; RuntimeError once `stopped()` (the server stops meanwhile)."""
    from workers.engine.launch import start_engine_rank
    from workers.ep.group import PoolMember, Rendezvous

    spec, placement = instance.spec, instance.placement
    assert placement is not None
    named: dict[str, Any] = {}
    if config.deployment is not None:
        named = {"namespace": dep.NAMESPACE, "lifetime": "detached"}
    if spec.num_ranks > 1:
        options = dict(named)
        if config.deployment is not None:
            options["name"] = dep.rendezvous_name(config.deployment, spec.name)
        instance.rendezvous = (
            ray.remote(Rendezvous)
            .options(num_cpus=0, max_restarts=-1, **options)
            .remote(spec.num_ranks)
        )
    share = spec.bundle.get("GPU", 0.0)
    engine = dataclasses.replace(config.engine, gpu_memory_share=share or 1.0)
    for i in range(spec.num_ranks):
        if stopped():  # the server stopped while this instance started: it went too
            raise RuntimeError("the server is shutting down")
        member = PoolMember(i, spec.num_ranks, instance.rendezvous) if spec.num_ranks > 1 else None
        instance.ranks.append(
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
                pool=member,
                initial_phy2log=saved_placements.get(spec.name) if member else None,
                checkpoint=config.checkpoint,
                name=dep.rank_name(config.deployment, spec.name, i)
                if config.deployment is not None
                else None,
                namespace=named.get("namespace"),
                detached=bool(named),
                migration=config.colocated_migration,
            )
        )
