"""Re-planning from the current placement: as balanced as planning from scratch (within a
tolerance) while moving fewer experts.

A move is a slot whose expert changes. Two candidates per layer, the one with fewer moves wins:
the scratch plan relabelled onto the old placement (nodes matched to nodes, GPUs within a node
to GPUs, experts kept in the slots that already hold them), and a repair of the old placement by
local search (swap two slots, or hand one replica of an expert to another expert) that stops
as soon as the layer is balanced enough.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.algorithm import (
    EplbPlan,
    balancedness_np,
    check_layout,
    check_weight,
    logcnt_of,
    plan_of,
    plan_phy2log,
    policy_shape,
)
from eplb.matching import match_slots, max_overlap_assignment, multiset_overlap


def num_moves(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor) -> int:
    """Slots, over all layers, whose expert differs between the two placements."""
    if old_phy2log.shape != new_phy2log.shape:
        raise ValueError(
            f"placements differ in shape: {tuple(old_phy2log.shape)} vs {tuple(new_phy2log.shape)}"
        )
    return int((old_phy2log.cpu() != new_phy2log.cpu()).sum())


def rebalance_experts_incremental(
    weight: torch.Tensor,
    old_phy2log: torch.Tensor,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    tolerance: float = 0.01,
) -> EplbPlan:
    """Plan like `rebalance_experts` (num_replicas = old_phy2log.shape[1]) but starting from
    `old_phy2log: [layers, num_replicas]`: each layer's balancedness is at least
    (1 - tolerance) x the scratch plan's, with as few slots changing expert as the search finds.
    """
    w = check_weight(weight)
    old = check_old_phy2log(old_phy2log, w.shape)
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1); got {tolerance}")
    num_layers, num_logical = w.shape
    num_replicas = old.shape[1]
    check_layout(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    groups, nodes = policy_shape(num_groups, num_nodes)

    scratch = plan_phy2log(w, num_replicas, groups, nodes, num_gpus)
    target = balancedness_np(w, scratch, num_gpus) * (1.0 - tolerance)
    best = relabel(scratch, old, nodes, num_gpus)
    best_moves = (best != old).sum(axis=1)
    scratch_moves = (scratch != old).sum(axis=1)
    use_scratch = scratch_moves < best_moves
    best[use_scratch], best_moves[use_scratch] = scratch[use_scratch], scratch_moves[use_scratch]

    repaired = repair(w, old, target, groups, nodes, num_gpus)
    ok = balancedness_np(w, repaired, num_gpus) >= target * (1.0 - 1e-12)
    better = ok & ((repaired != old).sum(axis=1) < best_moves)
    best[better] = repaired[better]
    return plan_of(torch.from_numpy(best), num_logical)


def check_old_phy2log(old_phy2log: torch.Tensor, weight_shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(old_phy2log, torch.Tensor) or old_phy2log.dim() != 2:
        raise ValueError("old_phy2log must be a [layers, num_replicas] tensor")
    if old_phy2log.dtype.is_floating_point or old_phy2log.dtype == torch.bool:
        raise ValueError(f"old_phy2log must hold integer expert ids; got {old_phy2log.dtype}")
    num_layers, num_logical = weight_shape
    if old_phy2log.shape[0] != num_layers:
        raise ValueError(f"old_phy2log has {old_phy2log.shape[0]} layers, weight {num_layers}")
    old = old_phy2log.cpu().numpy().astype(np.int64)
    if old.size and (old.min() < 0 or old.max() >= num_logical):
        raise ValueError(f"old_phy2log holds expert ids outside [0, {num_logical})")
    return old


def relabel(new: np.ndarray, old: np.ndarray, num_nodes: int, num_gpus: int) -> np.ndarray:
    """`new` with its nodes, its GPUs within each node and its slots within each GPU permuted
    to overlap `old` the most; every GPU keeps its load, so balancedness is unchanged."""
    num_layers, num_replicas = new.shape
    slots_per_gpu = num_replicas // num_gpus
    gpus_per_node = num_gpus // num_nodes
    num_experts = int(max(new.max(), old.max())) + 1
    old_nodes = old.reshape(num_layers, num_nodes, -1)
    new_nodes = new.reshape(num_layers, num_nodes, -1)
    if num_nodes > 1:
        overlap = multiset_overlap(new_nodes, old_nodes, num_experts)
        new_nodes = place(new_nodes, max_overlap_assignment(overlap))
    old_gpus = old.reshape(num_layers * num_nodes, gpus_per_node, slots_per_gpu)
    new_gpus = new_nodes.reshape(num_layers * num_nodes, gpus_per_node, slots_per_gpu)
    overlap = multiset_overlap(new_gpus, old_gpus, num_experts)
    new_gpus = place(new_gpus, max_overlap_assignment(overlap))
    slots = match_slots(new_gpus.reshape(-1, slots_per_gpu), old_gpus.reshape(-1, slots_per_gpu))
    return slots.reshape(num_layers, num_replicas)


def place(parts: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """parts: [B, n, ...]; part i of row b moves to position assignment[b, i]."""
    placed = np.empty_like(parts)
    placed[np.arange(len(parts))[:, None], assignment] = parts
    return placed


def repair(
    w: np.ndarray,
    old: np.ndarray,
    target: np.ndarray,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> np.ndarray:
    """Local search from `old` until each layer's balancedness reaches `target: [layers]`, node
    by node; layers whose old placement breaks the policy (a missing expert, a group spread over
    nodes) are returned unchanged, and so are nodes already light enough."""
    num_layers, num_logical = w.shape
    num_replicas = old.shape[1]
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    group_size = num_logical // num_groups
    result = old.copy()
    logcnt = logcnt_of(old, num_logical)
    node_of_slot = np.arange(num_replicas) // slots_per_node
    for layer in range(num_layers):
        if (logcnt[layer] == 0).any():
            continue
        group_nodes = np.zeros((num_groups, num_nodes), dtype=bool)
        group_nodes[old[layer] // group_size, node_of_slot] = True
        if (group_nodes.sum(axis=1) != 1).any():
            continue
        max_load = w[layer].sum() / num_gpus / max(target[layer], 1e-300) * (1.0 - 1e-9)
        for node in range(num_nodes):
            span = slice(node * slots_per_node, (node + 1) * slots_per_node)
            result[layer, span] = repair_node(w[layer], old[layer, span], gpus_per_node, max_load)
    return result


def repair_node(w: np.ndarray, slots: np.ndarray, num_gpus: int, max_load: float) -> np.ndarray:
    """Greedy local search on one node (its experts live nowhere else) lowering the load above
    `max_load` summed over its GPUs; each step takes the most excess off per slot changed."""
    experts, ids = np.unique(slots, return_inverse=True)
    we = w[experts]
    ids = ids.copy()
    slots_per_gpu = len(slots) // num_gpus
    gpu_of = np.arange(len(slots)) // slots_per_gpu

    def excess(loads: np.ndarray) -> np.ndarray:
        return np.maximum(loads - max_load, 0.0).sum(axis=-1)

    for _ in range(2 * len(slots)):
        cnt = np.bincount(ids, minlength=len(experts))
        slot_load = (we / cnt)[ids]
        loads = np.bincount(gpu_of, weights=slot_load, minlength=num_gpus)
        current = excess(loads)
        if current <= 0.0:
            break
        heavy = int(loads.argmax())
        on_heavy = np.flatnonzero(gpu_of == heavy)
        # swap slot a on the heavy GPU with slot b elsewhere: two moves
        moved = slot_load[on_heavy][:, None] - slot_load[None, :]  # [spg, S]
        other = loads[gpu_of][None, :]
        swap_gain = (
            np.maximum(loads[heavy] - max_load, 0.0)
            + np.maximum(other - max_load, 0.0)
            - np.maximum(loads[heavy] - moved - max_load, 0.0)
            - np.maximum(other + moved - max_load, 0.0)
        ) / 2.0
        swap_gain[(gpu_of[None, :] == heavy) | (ids[on_heavy][:, None] == ids[None, :])] = -np.inf
        # hand one slot to another expert: one move; either any slot to an expert on the heavy
        # GPU (splitting it further), or a slot on the heavy GPU to any expert
        all_slots, all_experts = np.arange(len(slots)), np.arange(len(experts))
        gains = []
        for src, dst in ((all_slots, ids[on_heavy]), (on_heavy, all_experts)):
            new_loads = retarget_loads(loads, we, cnt, ids, gpu_of, num_gpus, src, dst)
            gain = current - excess(new_loads)
            gain[(cnt[ids[src]] < 2)[:, None] | (ids[src][:, None] == dst[None, :])] = -np.inf
            gains.append((gain, src, dst))
        options = [(float(swap_gain.max()), "swap")] + [
            (float(g.max()), str(i)) for i, (g, _, _) in enumerate(gains)
        ]
        best_gain, kind = max(options)
        if not best_gain > 1e-12 * max_load:
            break
        if kind == "swap":
            a, b = np.unravel_index(int(swap_gain.argmax()), swap_gain.shape)
            a = on_heavy[a]
            ids[a], ids[b] = ids[b], ids[a]
        else:
            gain, src, dst = gains[int(kind)]
            s, f = np.unravel_index(int(gain.argmax()), gain.shape)
            ids[src[s]] = dst[f]
    return experts[ids]


def retarget_loads(
    loads: np.ndarray,
    we: np.ndarray,
    cnt: np.ndarray,
    ids: np.ndarray,
    gpu_of: np.ndarray,
    num_gpus: int,
    src: np.ndarray,
    dst: np.ndarray,
) -> np.ndarray:
    """GPU loads [len(src), len(dst), num_gpus] after slot src[i] switches to expert dst[j]."""
    held = np.zeros((len(we), num_gpus))
    np.add.at(held, (ids, gpu_of), 1.0)
    x = ids[src]
    fewer = we[x] / np.maximum(cnt[x] - 1, 1)
    more = we[dst] / (cnt[dst] + 1)
    on_src_gpu = gpu_of[src][:, None] == np.arange(num_gpus)[None, :]  # [S', G]
    d_src = held[x] * (fewer - we[x] / cnt[x])[:, None] - on_src_gpu * fewer[:, None]
    d_dst = held[dst] * (more - we[dst] / cnt[dst])[:, None]  # [F', G]
    return (
        loads + d_src[:, None, :] + d_dst[None, :, :] + on_src_gpu[:, None, :] * more[None, :, None]
    )
