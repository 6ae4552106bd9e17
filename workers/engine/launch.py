"""Starting an engine rank from the driver: `start_engine_rank` (the `EngineWorker` actor and its
Ray options). What the rank then sets up in its own process is `workers.engine.rank_setup`."""

from __future__ import annotations

from typing import Any

import ray

from workers.engine.config import EngineConfig
from workers.engine.worker import EngineWorker
from workers.ep.group import PoolMember
from workers.model.hub import CheckpointSource


def start_engine_rank(
    model_dir: str,
    config: EngineConfig,
    name: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    role: str = "colocated",
    transfer_backend: str = "nixl",
    transfer_timeout_s: float = 30.0,
    allow_fault_injection: bool = False,
    instance: int = 0,
    scheduling_strategy: Any = None,
    pool: PoolMember | None = None,
    initial_phy2log: list[list[int]] | None = None,
    checkpoint: CheckpointSource | None = None,
    namespace: str | None = None,
    detached: bool = False,
    migration: bool = False,
) -> Any:
    """Start an `EngineWorker` actor of `role`; `ray.init` must have run. Returns its handle.
    `scheduling_strategy`: e.g. its pool's placement group bundle. `checkpoint`: where
    `model_dir` came from, for a rank on a machine that lacks that dir (it fetches a Hub
    repository itself). `namespace`, `detached`: a named actor that outlives the process that
    started it (a deployment, `orchestrator.deployment`). `migration`: a colocated rank opens
    a transfer engine too, to hand requests to another instance with their KV (decode ranks
    always have one)."""
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_concurrency": 16,  # requests, aborts, stats and EPLB phases at once
        # A rank that dies is started again by Ray (same handle); the router fails its
        # in-flight requests at once and sends new ones once the new rank is ready.
        "max_restarts": -1,
    }
    if name:
        options["name"] = name
    if namespace:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    actor_cls = ray.remote(EngineWorker)
    return actor_cls.options(**options).remote(
        model_dir,
        config,
        role,
        transfer_backend,
        transfer_timeout_s,
        allow_fault_injection,
        instance,
        pool,
        initial_phy2log,
        checkpoint,
        migration,
    )
