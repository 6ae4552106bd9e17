"""Fused MoE for the routed experts (DeepSeekMoE): two Triton grouped GEMMs over a sorted-token
layout, with no host synchronization (capturable in a CUDA graph).

Layout contract
---------------
* `x: [T, hidden]`, `topk_ids: [T, top_k]` (expert slot ids; entries outside `[0, E)`, e.g.
  -1, are skipped), `topk_weights: [T, top_k]` float32.
* `w13: [E, 2 * I, hidden]` — rows `0..I-1` are the gate projection, `I..2I-1` the up
  projection; `w2: [E, hidden, I]`. Both are in `x`'s dtype, or `torch.float8_e4m3fn` with fp32
  block scales `w13_scale: [E, ceil(2I / bn), ceil(hidden / bk)]`,
  `w2_scale: [E, ceil(hidden / bn), ceil(I / bk)]` for `block_shape = (bn, bk)` (DeepSeek-V3's
  checkpoints: (128, 128)); the dequantized weight is the fp8 value times its block's scale.
  The fp8 path is weight-only (w8a16): the activations stay in `x`'s dtype.
* A *flattened id* is `token * top_k + k`, the index into `topk_ids.reshape(-1)`.
* `align_tokens` lists the flattened ids grouped by expert (ascending expert, and ascending id
  within an expert), each expert's group padded to a multiple of `BLOCK_M` with the sentinel
  `T * top_k`, so that every `BLOCK_M` rows of `sorted_ids` belong to one expert
  (`block_expert`). The buffers have the static size `max_rows`, the worst case over all
  routings; the blocks past `num_rows_padded` have expert -1 and their programs exit at once.
* Kernel 1 (gate/up + SiLU-and-mul): for each aligned row `r` with flattened id `i`, it
  gathers `x[i // top_k]` and writes `silu(x W_gate[e]^T) * (x W_up[e]^T)` to row `i` of the
  intermediate `[T * top_k, I]` (in `x`'s dtype). The intermediate is indexed by flattened
  id, not by aligned row, so its size does not depend on `E * BLOCK_M` padding; rows of
  skipped (negative-id) entries are never written nor read.
* Kernel 2 (down): for each aligned row it gathers intermediate row `i`, multiplies by
  `w2[e]^T` and by the routing weight `topk_weights.reshape(-1)[i]`, and writes row `i` of a
  zero-initialized `[T * top_k, hidden]`; torch then sums over `top_k` (no atomics).
* All accumulation is in float32. On the Triton interpreter (`UPCAST`), dot operands are cast
  to float32 because the interpreter's `tl.dot` misreads bf16/fp16.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from workers.kernels import INTERPRET
from workers.model.fp8 import dequantize_block_fp8

FP8 = torch.float8_e4m3fn


class AlignedTokens(NamedTuple):
    """The sorted-token layout of a routing (see the module docstring).

    `sorted_ids: [max_rows]` int32 flattened ids grouped by expert, padded with `T * top_k`;
    `block_expert: [max_rows // block_m]` int32 (-1 past the end);
    `num_rows_padded: [1]` int32, the number of used rows (a multiple of `block_m`).
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_rows_padded: torch.Tensor


def max_aligned_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """The static size of `sorted_ids`: every expert may add up to `block_m - 1` pad rows."""
    worst = num_rows + num_experts * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedTokens:
    """Group the flattened ids of `topk_ids: [T, top_k]` (int32/int64) by expert, each expert's
    group padded to a multiple of `block_m` with the sentinel `T * top_k`.

    Ids outside `[0, num_experts)` (e.g. -1) are dropped. Returns `AlignedTokens` with
    `sorted_ids: [max_rows]`, `block_expert: [max_rows // block_m]`, `num_rows_padded: [1]`
    (all int32, on `topk_ids`' device), `max_rows = max_aligned_rows(T * top_k, E, block_m)`.
    Torch ops only, no host synchronization and no data-dependent shapes.
    """
    if num_experts < 1 or block_m < 1:
        raise ValueError("need num_experts >= 1 and block_m >= 1")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    max_rows = max_aligned_rows(n, num_experts, block_m)
    valid = (flat >= 0) & (flat < num_experts)
    keys = torch.where(valid, flat, torch.full_like(flat, num_experts))  # invalid sort last

    order = torch.sort(keys, stable=True).indices  # [n], flattened ids grouped by expert
    sorted_keys = keys[order]
    # torch.bincount syncs on CUDA (it sizes its output from the max); scatter_add does not.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts

    # The j-th sorted entry (expert e) goes to row padded_start[e] + (j - start[e]); the
    # invalid entries go to a dump row max_rows that is cut off afterwards.
    e_safe = sorted_keys.clamp(max=num_experts - 1)
    j = torch.arange(n, device=device)
    row = padded_start[e_safe] + (j - start[e_safe])
    row = torch.where(sorted_keys < num_experts, row, torch.full_like(row, max_rows))
    buf = torch.full((max_rows + 1,), n, dtype=torch.int32, device=device)
    buf.scatter_(0, row, order.to(torch.int32))
    sorted_ids = buf[:max_rows]

    # Block b starts at row b * block_m; its expert is the first one whose padded group ends
    # after that row (empty experts end where the previous one ends, so they are skipped).
    block_start = torch.arange(0, max_rows, block_m, device=device, dtype=torch.int64)
    expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(expert < num_experts, expert, torch.full_like(expert, -1))
    num_rows_padded = padded_end[-1:]
    return AlignedTokens(sorted_ids, block_expert.to(torch.int32), num_rows_padded.to(torch.int32))


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _block_pids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M consecutive M blocks (mostly one expert) sweep the same
    N tile together, so that the expert's weight tile is reused from L2."""
    pid = tl.program_id(0)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_rows_padded_ptr,
    num_valid,  # T * top_k: sorted ids >= this are padding
    top_k,
    N,  # I
    K,  # hidden
    num_pid_m,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_om,
    stride_on,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    USE_FP8: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[i, n] = silu(x[i // top_k] . w[e, n]) * (x[i // top_k] . w[e, N + n])."""
    pid_m, pid_n = _block_pids(num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    row_ok = ids < num_valid
    tokens = (ids // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # [BLOCK_K, BLOCK_N] tiles of w[e]^T for the gate rows n and the up rows N + n.
    wg_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    wu_ptrs = wg_ptrs + N * stride_wn
    if USE_FP8:
        sg_ptrs = scale_ptr + expert * stride_se + (offs_n // GROUP_N) * stride_sn
        su_ptrs = scale_ptr + expert * stride_se + ((offs_n + N) // GROUP_N) * stride_sn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kt * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        else:
            bg = bg.to(a.dtype)
            bu = bu.to(a.dtype)
        if USE_FP8:
            # BLOCK_K divides GROUP_K, so the whole K tile has one scale per column; fp8 values
            # are exact in bf16/fp16, so scaling the fp32 partial product loses nothing.
            k_blk = (kt * BLOCK_K) // GROUP_K
            sg = tl.load(sg_ptrs + k_blk * stride_sk, mask=n_ok, other=0.0)
            su = tl.load(su_ptrs + k_blk * stride_sk, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, bg, input_precision=DOT_PRECISION) * sg[None, :]
            acc_u += tl.dot(a, bu, input_precision=DOT_PRECISION) * su[None, :]
        else:
            acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk

    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = out_ptr + ids.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    topk_weights_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_rows_padded_ptr,
    num_valid,
    N,  # hidden
    K,  # I
    num_pid_m,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_om,
    stride_on,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    USE_FP8: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[i, n] = topk_weights[i] * (a[i] . w[e, n])."""
    pid_m, pid_n = _block_pids(num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    row_ok = ids < num_valid
    rows = ids.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    if USE_FP8:
        s_ptrs = scale_ptr + expert * stride_se + (offs_n // GROUP_N) * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        if USE_FP8:
            s = tl.load(s_ptrs + ((kt * BLOCK_K) // GROUP_K) * stride_sk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b, input_precision=DOT_PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    weight = tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host side


def default_config(
    num_rows: int, num_experts: int, *, fp8: bool, block_shape: tuple[int, int] = (128, 128)
) -> dict[str, int]:
    """Tile config for `num_rows = T * top_k` routed rows (H100-oriented defaults).

    Few rows per expert (decode) → `BLOCK_M` 16 so little of each block is padding; many
    (prefill) → 64. For fp8 weights `BLOCK_K` divides the scale block `bk`, so each K tile has
    a single scale per output column.
    """
    rows_per_expert = num_rows / max(num_experts, 1)
    if rows_per_expert <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4}
        cfg["num_stages"] = 4
    elif rows_per_expert <= 48:
        cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4}
        cfg["num_stages"] = 4
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8}
        cfg["num_stages"] = 3
    if fp8:
        bk = block_shape[1]
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], bk & -bk)  # the largest power of two dividing bk
    return cfg


def _check_scale(
    w: torch.Tensor, scale: torch.Tensor | None, block_shape: tuple[int, int], name: str
) -> torch.Tensor:
    if scale is None:
        raise ValueError(f"fp8 {name} needs {name}_scale")
    num_experts, n, k = w.shape
    want = (num_experts, triton.cdiv(n, block_shape[0]), triton.cdiv(k, block_shape[1]))
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}_scale has shape {tuple(scale.shape)}, expected {want}")
    return scale.float()


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] = (128, 128),
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Routed-expert MoE: `[T, hidden]` in `x`'s dtype,
    `out[t] = sum_k topk_weights[t, k] * (silu(x[t] Wg[e]^T) * (x[t] Wu[e]^T)) W2[e]^T` with
    `e = topk_ids[t, k]` (entries outside `[0, E)` skipped).

    `x: [T, hidden]` (bf16/fp16/fp32); `w13: [E, 2I, hidden]` (gate rows, then up rows);
    `w2: [E, hidden, I]`; `topk_ids: [T, top_k]` int; `topk_weights: [T, top_k]`. The weights
    are in `x`'s dtype or `torch.float8_e4m3fn` with `w13_scale: [E, ceil(2I/bn),
    ceil(hidden/bk)]`, `w2_scale: [E, ceil(hidden/bn), ceil(I/bk)]` fp32 for
    `block_shape = (bn, bk)`. `config` overrides keys of `default_config` (BLOCK_M, BLOCK_N,
    BLOCK_K, GROUP_M, num_warps, num_stages). No host synchronization.
    """
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or topk_ids.dim() != 2:
        raise ValueError("expected x [T, hidden], w13 [E, 2I, hidden], w2 [E, hidden, I]")
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if w13.shape != (num_experts, 2 * inter, hidden) or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"bad expert weight shapes {tuple(w13.shape)}, {tuple(w2.shape)}")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError("topk_ids and topk_weights must both be [T, top_k]")
    use_fp8 = w13.dtype == FP8
    if (w2.dtype == FP8) != use_fp8 or (not use_fp8 and w13.dtype != x.dtype):
        raise ValueError("w13 and w2 must both be fp8, or both in x's dtype")

    num_rows = num_tokens * top_k
    if num_rows == 0 or num_experts == 0:
        return torch.zeros_like(x)
    cfg = default_config(num_rows, num_experts, fp8=use_fp8, block_shape=block_shape)
    cfg.update(config or {})
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if use_fp8:
        s13 = _check_scale(w13, w13_scale, block_shape, "w13")
        s2 = _check_scale(w2, w2_scale, block_shape, "w2")
        if block_shape[1] % block_k:
            raise ValueError(f"BLOCK_K {block_k} must divide the scale block {block_shape[1]}")
    else:
        s13 = s2 = torch.empty(1, 1, 1, dtype=torch.float32, device=x.device)

    aligned = align_tokens(topk_ids, num_experts, block_m)
    num_pid_m = aligned.block_expert.numel()
    weights = topk_weights.reshape(-1).to(torch.float32)
    inter_out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    down_out = torch.zeros(num_rows, hidden, dtype=x.dtype, device=x.device)
    common: dict[str, Any] = {
        "GROUP_N": block_shape[0],
        "GROUP_K": block_shape[1],
        "USE_FP8": use_fp8,
        "UPCAST": INTERPRET,
        "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "GROUP_M": cfg["GROUP_M"],
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }

    grid1 = (num_pid_m * triton.cdiv(inter, block_n),)
    _gate_up_silu_kernel[grid1](
        x,
        w13,
        s13,
        inter_out,
        aligned.sorted_ids,
        aligned.block_expert,
        aligned.num_rows_padded,
        num_rows,
        top_k,
        inter,
        hidden,
        num_pid_m,
        x.stride(0),
        x.stride(1),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        s13.stride(0),
        s13.stride(1),
        s13.stride(2),
        inter_out.stride(0),
        inter_out.stride(1),
        **common,
    )
    grid2 = (num_pid_m * triton.cdiv(hidden, block_n),)
    _down_kernel[grid2](
        inter_out,
        w2,
        s2,
        down_out,
        weights,
        aligned.sorted_ids,
        aligned.block_expert,
        aligned.num_rows_padded,
        num_rows,
        hidden,
        inter,
        num_pid_m,
        inter_out.stride(0),
        inter_out.stride(1),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        s2.stride(0),
        s2.stride(1),
        s2.stride(2),
        down_out.stride(0),
        down_out.stride(1),
        **common,
    )
    return down_out.view(num_tokens, top_k, hidden).sum(1)


# --------------------------------------------------------------------------------------------
# Reference


def fused_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] = (128, 128),
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Plain-torch `fused_moe` (same arguments; `config` is ignored): fp8 weights dequantized
    with their block scales, then one float32 GEMM pair per expert. Syncs with the host."""
    del config
    if w13.dtype == FP8:
        assert w13_scale is not None and w2_scale is not None
        w13_f = dequantize_block_fp8(w13, w13_scale, block_shape)
        w2_f = dequantize_block_fp8(w2, w2_scale, block_shape)
    else:
        w13_f, w2_f = w13.float(), w2.float()
    num_experts = w13.shape[0]
    inter = w13.shape[1] // 2
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in range(num_experts):
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        xe = xf[tokens]
        gate = xe @ w13_f[e, :inter].T
        up = xe @ w13_f[e, inter:].T
        y = (F.silu(gate) * up) @ w2_f[e].T
        out.index_add_(0, tokens, y * topk_weights[tokens, slots].float()[:, None])
    return out.to(x.dtype)
