"""Matching a new placement onto an old one so that as many slots as possible keep their expert.
All functions are batched over a leading dimension B (layers, or layers × nodes)."""

from __future__ import annotations

import numpy as np


def multiset_overlap(new: np.ndarray, old: np.ndarray, num_experts: int) -> np.ndarray:
    """overlap[b, i, j] = experts part i of `new` and part j of `old` hold in common, counted
    with multiplicity. new, old: [B, n, k] expert ids -> [B, n, n] float."""
    batch, num_parts, _ = new.shape
    new_cnt, old_cnt = (counts(x, num_experts) for x in (new, old))  # [B, n, E]
    overlap = np.zeros((batch, num_parts, num_parts))
    # min(a, b) = sum over t >= 1 of [a >= t][b >= t]
    for t in range(1, int(min(new_cnt.max(initial=0), old_cnt.max(initial=0))) + 1):
        a = (new_cnt >= t).astype(np.float32)
        b = (old_cnt >= t).astype(np.float32)
        overlap += a @ b.transpose(0, 2, 1)
    return overlap


def counts(parts: np.ndarray, num_experts: int) -> np.ndarray:
    """[B, n, k] expert ids -> [B, n, num_experts] copies of each expert in each part."""
    batch, num_parts, _ = parts.shape
    offset = (np.arange(batch * num_parts) * num_experts).reshape(batch, num_parts, 1)
    flat = np.bincount((parts + offset).ravel(), minlength=batch * num_parts * num_experts)
    return flat.reshape(batch, num_parts, num_experts)


def max_overlap_assignment(overlap: np.ndarray) -> np.ndarray:
    """A one-to-one assignment of new parts to old positions with a large total overlap: greedy
    by largest overlap, then pairwise exchanges while they gain. [B, n, n] -> [B, n] positions."""
    batch, n, _ = overlap.shape
    rows = np.arange(batch)
    assignment = np.full((batch, n), -1, dtype=np.int64)
    free = overlap.astype(np.float64).copy()
    for _ in range(n):
        i, j = np.divmod(free.reshape(batch, -1).argmax(axis=1), n)
        assignment[rows, i] = j
        free[rows, i, :] = -np.inf
        free[rows, :, j] = -np.inf
    for _ in range(n * n):
        # taken[b, i, j]: overlap of new part i at the position now given to part j
        taken = np.take_along_axis(
            overlap, np.broadcast_to(assignment[:, None, :], overlap.shape), 2
        )
        current = np.diagonal(taken, axis1=1, axis2=2)
        gain = taken + taken.transpose(0, 2, 1) - current[:, :, None] - current[:, None, :]
        best = gain.reshape(batch, -1).argmax(axis=1)
        improve = gain.reshape(batch, -1)[rows, best] > 1e-9
        if not improve.any():
            break
        b = rows[improve]
        i, j = np.divmod(best[improve], n)
        assignment[b, i], assignment[b, j] = assignment[b, j], assignment[b, i].copy()
    return assignment


def match_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Order each row of `new` so that every expert sits in a slot that held it in `old` when it
    can (the k-th copy of an expert in new takes the k-th copy's slot in old); the rest fill the
    other slots in order. new, old: [G, k] -> [G, k]."""
    num_rows, width = new.shape
    key_new = new * width + occurrence(new)
    key_old = old * width + occurrence(old)
    same = key_new[:, :, None] == key_old[:, None, :]  # [G, k new, k old]
    out = np.full_like(new, -1)
    g, i, s = np.nonzero(same)
    out[g, s] = new[g, i]
    unmatched_new, unmatched_old = ~same.any(axis=2), ~same.any(axis=1)
    rank_new = np.cumsum(unmatched_new, axis=1) - 1
    rank_old = np.cumsum(unmatched_old, axis=1) - 1
    slot_of_rank = np.zeros_like(new)
    go, so = np.nonzero(unmatched_old)
    slot_of_rank[go, rank_old[go, so]] = so
    gn, in_ = np.nonzero(unmatched_new)
    out[gn, slot_of_rank[gn, rank_new[gn, in_]]] = new[gn, in_]
    return out


def occurrence(x: np.ndarray) -> np.ndarray:
    """occurrence[g, i]: how many times x[g, i] appears in x[g, :i]."""
    same = x[:, :, None] == x[:, None, :]
    return np.tril(same, k=-1).sum(axis=2)
