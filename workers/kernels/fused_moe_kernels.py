"""The two Triton programs of the fused MoE, over the sorted-token layout of `moe_align`:
`_gate_up_silu_kernel` (kernel 1, gate/up GEMM + SiLU-and-mul) and `_down_kernel` (kernel 2,
down GEMM times the routing weight). `workers.kernels.fused_moe` states their contract and
launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
