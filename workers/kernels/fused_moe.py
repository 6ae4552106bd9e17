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

Sorting lives in `moe_align`, the Triton programs in `fused_moe_kernels`; this module checks
the arguments, picks the tiles, launches the kernels, and holds the plain-torch reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton

from workers.kernels import INTERPRET
from workers.kernels.fused_moe_kernels import _down_kernel, _gate_up_silu_kernel
from workers.kernels.moe_align import align_tokens
from workers.model.fp8 import dequantize_block_fp8

FP8 = torch.float8_e4m3fn


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
