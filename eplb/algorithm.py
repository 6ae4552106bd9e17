"""Expert-parallel load balancer: where each physical expert slot lives, from per-expert loads.

Slot p lives on GPU `p // (num_replicas // num_gpus)`; GPU g lives on node
`g // (num_gpus // num_nodes)`. The hierarchical policy packs expert groups onto nodes, replicates
experts within each node and packs each node's replicas onto its GPUs; the global policy is the
same with one group and one node. Packing starts from the reference's greedy (deepseek-ai/EPLB)
and is refined by pairwise swaps; of the candidate plans the best per layer is kept, the
reference-style plan among them, so the result is never less balanced than the reference's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from eplb.packing import greedy_pack, refine_packing


class EplbPlan(NamedTuple):
    phy2log: torch.Tensor  # [layers, num_replicas] int64, the logical expert of each slot
    log2phy: torch.Tensor  # [layers, num_logical, max_replicas] int64, slots ascending, -1 pad
    logcnt: torch.Tensor  # [layers, num_logical] int64, number of replicas of each expert


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> EplbPlan:
    """Plan expert replicas and their slots for every layer.

    weight: [layers, num_logical] load of each logical expert (e.g. token counts), any real dtype.
    num_replicas: physical slots per layer, a multiple of num_gpus and at least num_logical.
    num_groups: expert groups (num_logical divisible by it); the hierarchical policy applies when
        num_groups is a multiple of num_nodes, the global one otherwise.
    num_nodes: server nodes; num_gpus: GPUs in all, a multiple of num_nodes.
    """
    w = check_weight(weight)
    check_layout(w.shape[1], num_replicas, num_groups, num_nodes, num_gpus)
    groups, nodes = policy_shape(num_groups, num_nodes)
    phy2log = plan_phy2log(w, num_replicas, groups, nodes, num_gpus)
    return plan_of(torch.from_numpy(phy2log), w.shape[1])


def plan_of(phy2log: torch.Tensor, num_logical: int) -> EplbPlan:
    logcnt = logcnt_of(phy2log.numpy(), num_logical)
    return EplbPlan(phy2log, log2phy_of(phy2log, num_logical), torch.from_numpy(logcnt))


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Mean over max of per-GPU load, [layers] float64 (1.0 is perfect); a replica carries
    weight[expert] / logcnt[expert]."""
    w = check_weight(weight)
    return torch.from_numpy(balancedness_np(w, phy2log.cpu().numpy(), num_gpus))


def log2phy_of(phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """[layers, num_logical, max_replicas] int64: each expert's slots ascending, -1 padded."""
    p2l = phy2log.cpu().numpy().astype(np.int64)
    if p2l.size and (p2l.min() < 0 or p2l.max() >= num_logical):
        raise ValueError(f"phy2log holds expert ids outside [0, {num_logical})")
    num_layers, num_slots = p2l.shape
    logcnt = logcnt_of(p2l, num_logical)
    max_cnt = max(int(logcnt.max(initial=0)), 1)
    slots = np.argsort(p2l, axis=1, kind="stable")  # slots grouped by expert, ascending within
    experts = np.take_along_axis(p2l, slots, axis=1)
    first = np.cumsum(logcnt, axis=1) - logcnt  # position of each expert's first slot in `slots`
    rank = np.arange(num_slots) - np.take_along_axis(first, experts, axis=1)
    log2phy = np.full((num_layers, num_logical, max_cnt), -1, dtype=np.int64)
    log2phy[np.arange(num_layers)[:, None], experts, rank] = slots
    return torch.from_numpy(log2phy)


def check_weight(weight: torch.Tensor) -> np.ndarray:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a [layers, num_logical_experts] tensor")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"weight must be real-valued; got {weight.dtype}")
    w = weight.detach().cpu().to(torch.float64).numpy()
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weight must be finite and non-negative")
    return w


def check_layout(
    num_logical: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    for name, value in [
        ("num_logical_experts", num_logical),
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if num_logical % num_groups:
        raise ValueError(f"{num_logical} experts do not split into {num_groups} equal groups")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if num_replicas < num_logical:
        raise ValueError(
            f"num_replicas={num_replicas} is fewer than the {num_logical} logical experts"
        )


def policy_shape(num_groups: int, num_nodes: int) -> tuple[int, int]:
    """(groups, nodes) the planner uses: the hierarchical layout, or one group on one node."""
    return (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)


# Replica-load floors tried, as fractions of the node's mean GPU load (0: the reference's
# replication). Splitting a hot expert into fewer, heavier replicas can leave GPUs free for the
# next-hottest experts, which matters because every GPU holds the same number of slots.
SPLIT_FLOORS = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)


def plan_phy2log(
    w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """The most balanced per layer of the candidate plans: [layers, replicas]. The first
    candidate is the reference's plan, so the result is never less balanced than it."""
    candidates = [(False, False, 0.0)]
    node_refinements = [False, True] if num_groups > num_nodes > 1 else [False]
    for refine_nodes in node_refinements:
        candidates += [(refine_nodes, True, floor) for floor in SPLIT_FLOORS]
    best, best_bal = None, None
    for refine_nodes, refine_gpus, floor in candidates:
        phy2log = plan_hierarchical(
            w, num_replicas, num_groups, num_nodes, num_gpus, refine_nodes, refine_gpus, floor
        )
        bal = balancedness_np(w, phy2log, num_gpus)
        if best is None or best_bal is None:
            best, best_bal = phy2log, bal
            continue
        better = bal > best_bal
        best[better], best_bal[better] = phy2log[better], bal[better]
    assert best is not None
    return best


def plan_hierarchical(
    w: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    refine_nodes: bool,
    refine_gpus: bool,
    split_floor: float,
) -> np.ndarray:
    """Groups -> nodes, replication within nodes, replicas -> GPUs: phy2log [layers, replicas]."""
    num_layers, num_logical = w.shape
    group_size = num_logical // num_groups
    log_per_node = num_logical // num_nodes
    phy_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    rounds = 4 * num_replicas

    group_load = w.reshape(num_layers, num_groups, group_size).sum(axis=2)
    node_groups = pack(group_load, num_nodes, rounds if refine_nodes else 0)
    # node_log: [layers * nodes, log_per_node], the logical experts each node serves
    node_log = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(
        -1, log_per_node
    )
    node_w = np.take_along_axis(w.repeat(num_nodes, axis=0), node_log, axis=1)

    limit = None
    if split_floor:
        limit = (node_w.sum(axis=1) / gpus_per_node * split_floor, gpus_per_node)
    phy2nlog, nlogcnt = replicate_experts(node_w, phy_per_node, limit)
    phy_load = np.take_along_axis(node_w / nlogcnt, phy2nlog, axis=1)
    gpu_phys = pack(phy_load, gpus_per_node, rounds if refine_gpus else 0)
    slot2nlog = np.take_along_axis(phy2nlog, gpu_phys.reshape(-1, phy_per_node), axis=1)
    return np.take_along_axis(node_log, slot2nlog, axis=1).reshape(num_layers, num_replicas)


def pack(weights: np.ndarray, num_packs: int, refine_rounds: int) -> np.ndarray:
    pack_items = greedy_pack(weights, num_packs)
    return refine_packing(weights, pack_items, refine_rounds) if refine_rounds else pack_items


def replicate_experts(
    w: np.ndarray, num_phy: int, split_limit: tuple[np.ndarray, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Give each extra replica to the expert with the highest load per replica (ties: lowest id),
    which minimises the largest replica load.

    With `split_limit = (min_replica_load [P], max_replicas)`, an expert is split only while its
    replicas stay at least that heavy and number at most max_replicas; the slots left over go
    to the heaviest experts not split yet, so that hot experts do not crowd a GPU twice.
    w: [P, n] -> (phy2log [P, num_phy], logcnt [P, n])."""
    num_rows, num_log = w.shape
    rows = np.arange(num_rows)
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    for slot in range(num_log, num_phy):
        key = w / logcnt
        if split_limit is not None:
            min_load, max_replicas = split_limit
            splittable = (w / (logcnt + 1) >= min_load[:, None]) & (logcnt < max_replicas)
            unsplit = logcnt == 1
            key = np.where(
                splittable.any(axis=1, keepdims=True),
                np.where(splittable, key, -1.0),
                np.where(unsplit.any(axis=1, keepdims=True), np.where(unsplit, key, -1.0), key),
            )
        expert = key.argmax(axis=1)
        phy2log[:, slot] = expert
        logcnt[rows, expert] += 1
    return phy2log, logcnt


def logcnt_of(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    num_layers = phy2log.shape[0]
    offset = (np.arange(num_layers) * num_logical)[:, None]
    counts = np.bincount((phy2log + offset).ravel(), minlength=num_layers * num_logical)
    return counts.reshape(num_layers, num_logical).astype(np.int64)


def gpu_loads(w: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """[layers, num_gpus] load of each GPU under the plan."""
    logcnt = logcnt_of(phy2log, w.shape[1])
    per_replica = w / np.maximum(logcnt, 1)
    return np.take_along_axis(per_replica, phy2log, axis=1).reshape(len(w), num_gpus, -1).sum(2)


def balancedness_np(w: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    loads = gpu_loads(w, phy2log, num_gpus)
    peak = loads.max(axis=1)
    return np.where(peak > 0, loads.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)
