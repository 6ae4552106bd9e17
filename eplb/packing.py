"""Balanced packing of weighted items into packs of equal cardinality, batched over problems.

A packing is `pack_items: [P, num_packs, items_per_pack]`, the item index held by each place of
each pack, for P independent problems solved side by side (layers × nodes).
"""

from __future__ import annotations

import numpy as np

# A swap must lower the pair's maximum by more than this fraction of it to count as progress,
# so that rounding noise cannot make the refinement cycle.
_MIN_GAIN = 1e-12


def greedy_pack(weights: np.ndarray, num_packs: int) -> np.ndarray:
    """The reference packing: items by descending weight (ties by index), each onto the lightest
    pack that still has room (ties by pack index); one item per pack keeps items in order.

    weights: [P, n] float, n divisible by num_packs -> pack_items: [P, num_packs, n // num_packs]
    """
    num_problems, num_items = weights.shape
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        return np.broadcast_to(np.arange(num_items), (num_problems, num_items))[..., None].copy()
    order = np.argsort(-weights, axis=1, kind="stable")
    rows = np.arange(num_problems)
    loads = np.zeros((num_problems, num_packs))
    counts = np.zeros((num_problems, num_packs), dtype=np.int64)
    pack_items = np.empty((num_problems, num_packs, items_per_pack), dtype=np.int64)
    for step in range(num_items):
        item = order[:, step]
        pack = np.where(counts < items_per_pack, loads, np.inf).argmin(axis=1)
        pack_items[rows, pack, counts[rows, pack]] = item
        loads[rows, pack] += weights[rows, item]
        counts[rows, pack] += 1
    return pack_items


def refine_packing(weights: np.ndarray, pack_items: np.ndarray, max_rounds: int) -> np.ndarray:
    """Pairwise-swap refinement: while it lowers the heaviest pack, swap one of its items with an
    item of another pack, choosing the swap that leaves the lower maximum of the two packs.

    Every accepted swap leaves both packs strictly lighter than the heaviest pack was, so no
    pack's load ever rises above the starting maximum: the result is never worse than the input.
    weights: [P, n]; pack_items: [P, m, k] -> refined pack_items: [P, m, k]
    """
    num_problems, num_packs, items_per_pack = pack_items.shape
    pack_items = pack_items.copy()
    if num_packs == 1 or items_per_pack == 0:
        return pack_items
    flat_items = pack_items.reshape(num_problems, -1)
    item_weights = np.take_along_axis(weights, flat_items, axis=1).reshape(pack_items.shape)
    active = np.arange(num_problems)
    for _ in range(max_rounds):
        if active.size == 0:
            break
        w = item_weights[active]  # [A, m, k]
        rows = np.arange(active.size)
        loads = w.sum(axis=2)
        heavy = loads.argmax(axis=1)
        heavy_load = loads[rows, heavy]
        # delta[a, i, p, j]: load moved off the heavy pack by swapping its item i with item j of p
        delta = w[rows, heavy][:, :, None, None] - w[:, None, :, :]
        pair_max = np.maximum(
            heavy_load[:, None, None, None] - delta, loads[:, None, :, None] + delta
        )
        pair_max[rows, :, heavy, :] = np.inf
        flat = pair_max.reshape(active.size, -1)
        best = flat.argmin(axis=1)
        gain = heavy_load - flat[rows, best]
        improved = gain > _MIN_GAIN * np.maximum(heavy_load, 1e-300)
        if not improved.any():
            break
        i, pack, j = np.unravel_index(best[improved], (items_per_pack, num_packs, items_per_pack))
        sel = active[improved]
        h = heavy[improved]
        for arr in (item_weights, pack_items):
            a, b = arr[sel, h, i].copy(), arr[sel, pack, j].copy()
            arr[sel, h, i], arr[sel, pack, j] = b, a
        active = sel
    return pack_items
