"""What an `EngineWorker` sets up in its own process before its loop starts: normal priority and
the thread count (`setup_process`); in an expert-parallel pool, the pool's group and the rank's
EP context (`join_pool`), before the engine loads; on a disaggregated rank, the KV handoff over a
transfer engine (`open_handoff`); the `RankInfo` it reports (`rank_info`). And, once it serves,
how often an idle pool rank joins the pool's per-step agreement (`group_poll_s`; the agreement
is `workers.ep.group.PoolGroup.agree`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from typing import NamedTuple

import ray
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.handoff import KVHandoff
from workers.engine.rank_reports import RankInfo
from workers.ep.group import PoolGroup, PoolMember, free_port, init_pool_group
from workers.ep.moe import EPContext
from workers.ep.placement import ExpertPlacement
from workers.ep.setup import build_ep_context
from workers.model.config import ModelConfig


def setup_process(config: EngineConfig) -> None:
    """Normal priority for the rank's threads (`normal_priority`); torch's intra-op threads:
    `config.num_threads`, else `OMP_NUM_THREADS` (Ray's allotment), else torch's default."""
    normal_priority()
    threads = config.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def normal_priority() -> None:
    """Ray starts workers at niceness 15, below the router and the rest of the machine; a rank
    is on every request's critical path — its loop, the threads that take the router's calls
    and the KV transfer thread alike (a starved transfer thread alone added ~100 ms to time to
    first token under load) — so all its threads take normal priority back, where the process
    may (root or CAP_SYS_NICE). Niceness is per thread on Linux; threads started later inherit
    it from their creator."""
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(task), 0)


class PoolFormationError(RuntimeError):
    """The pool's ranks did not all meet (one died while meeting): worth a restart, unlike
    an error of the model or of the configuration."""


class PoolJoin(NamedTuple):
    group: PoolGroup  # the pool's process groups (this process's, set once)
    ep: EPContext  # for the rank's engine


def join_pool(
    model_dir: str,
    config: EngineConfig,
    role: str,
    pool: PoolMember,
    device: torch.device,
    initial_phy2log: list[list[int]] | None = None,
) -> PoolJoin:
    """Meet the pool's other ranks (through its `Rendezvous`; rank 0 picks the address) and
    build this rank's EP context over the pool's data group: with the placement
    `initial_phy2log` (`[layers, slots]`) if given, else the default one."""
    host = ray.util.get_node_ip_address()
    address = (host, free_port()) if pool.rank == 0 else None
    try:
        join = pool.rendezvous.join.remote(pool.rank, address)
        master_addr, master_port = ray.get(join, timeout=config.pool_formation_timeout_s)
        group = init_pool_group(
            pool.rank, pool.world_size, master_addr, master_port, device,
            store_timeout_s=config.pool_formation_timeout_s,
        )  # fmt: skip
    except Exception as e:
        raise PoolFormationError(
            f"rank {pool.rank} of {pool.world_size} could not form its expert-parallel pool: "
            f"{type(e).__name__}: {e}"
        ) from e
    model_config = ModelConfig.from_dir(model_dir)
    placement = None
    if initial_phy2log is not None:
        phy2log = torch.tensor(initial_phy2log, dtype=torch.int64)
        placement = ExpertPlacement.from_phy2log(
            phy2log, pool.world_size, model_config.n_routed_experts
        )
    ep = build_ep_context(
        model_config, config, role, pool.rank, pool.world_size, group.data, placement
    )
    return PoolJoin(group, ep)


def open_handoff(role: str, engine: Engine, backend: str, timeout_s: float) -> KVHandoff:
    """A prefill, decode (or migrating colocated) rank's KV handoff, over a new transfer engine of `backend` (e.g.
    "nixl") that registers the engine's KV pages; `timeout_s`: per transfer."""
    from workers.transfer import create_transfer_engine

    transfer = create_transfer_engine(
        backend, f"pdserve-{role}-{uuid.uuid4().hex[:8]}", engine.kv.data, engine.kv.page_size,
        poke_host=ray.util.get_node_ip_address(),
    )  # fmt: skip
    handoff = KVHandoff(role, transfer, timeout_s)
    handoff.bind(engine)
    return handoff


def rank_info(
    engine: Engine, role: str, instance: int, pool: PoolMember | None, migrates: bool = False
) -> RankInfo:
    """What the rank reports once ready: the engine's info, placed (node, pool, process);
    `migrates`: it hands requests off and takes them with their KV (a transfer engine)."""
    return dataclasses.replace(
        engine.info(),
        role=role,
        node=ray.util.get_node_ip_address(),
        node_id=ray.get_runtime_context().get_node_id(),
        instance=instance,
        pool_rank=pool.rank if pool is not None else 0,
        pool_size=pool.world_size if pool is not None else 1,
        pid=os.getpid(),
        migrates=migrates,
    )


# How often an idle rank of an expert-parallel pool joins the pool's agreement: every 2 ms
# while the pool stepped within the last second, every 20 ms within the last 5 s, then every
# 250 ms (an idle pool then costs its ranks almost nothing). Work that reaches one rank of a
# sleeping pool is not held for that long: the router calls `wake` on the pool's other ranks
# with the first request after a quiet spell.
GROUP_POLL_BUSY_S = 0.002
GROUP_POLL_IDLE_S = 0.02
GROUP_POLL_ASLEEP_S = 0.25
GROUP_IDLE_AFTER_S = 1.0
GROUP_ASLEEP_AFTER_S = 5.0


def group_poll_s(idle_s: float) -> float:
    """How long an idle pool rank waits before joining the next agreement, after `idle_s`
    seconds since the pool last stepped."""
    if idle_s < GROUP_IDLE_AFTER_S:
        return GROUP_POLL_BUSY_S
    return GROUP_POLL_IDLE_S if idle_s < GROUP_ASLEEP_AFTER_S else GROUP_POLL_ASLEEP_S
