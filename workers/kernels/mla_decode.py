"""Paged MLA decode attention in the absorbed form, split-KV ("flash decoding").

Contract (`mla_decode`):

    q           [B, H, kv_lora_rank + rope_dim]  W_UK-absorbed latent query ; rotated q_pe
    kv_cache    [num_slots, kv_lora_rank + rope_dim]  one layer's latent cache (c_kv ; k_pe)
    block_table [B, max_pages] int32  page ids of each request (entries past its length unused)
    seq_lens    [B] int32  context length of each request in tokens (0 for padding rows)
    returns     [B, H, kv_lora_rank] in q's dtype

    out[b, h] = softmax_j(scale * q[b, h] . kv_cache[slot_j]) @ kv_cache[slot_j, :kv_lora_rank]

over the `seq_lens[b]` tokens j of request b, `slot_j = block_table[b, j // page_size] *
page_size + j % page_size` (the layout of `workers.engine.kv_cache.KVCache`). A row with
`seq_lens[b] == 0` gives zeros. The latent doubles as key (with k_pe) and value, which is what
lets decode read the cache directly; `W_UV` is applied by the caller afterwards.

Two launches, no host synchronization (lengths are read on the device only, so the call can be
captured in a CUDA graph and replayed with new `seq_lens` / `block_table` contents):

1. `_mla_decode_split_kernel`, grid `(B, cdiv(H, BLOCK_H), num_splits)`. Each program takes
   BLOCK_H heads of one request and one contiguous chunk of its context: the context is cut
   into `num_splits` chunks of `cdiv(seq_len, num_splits * BLOCK_N) * BLOCK_N` tokens (whole
   tiles, so only a request's last tile is ragged; trailing chunks may be empty). It walks its
   chunk BLOCK_N tokens at a time: slots are gathered per token through the block table, the
   latent tile `[BLOCK_N, kv_lora_rank]` and rope tile `[BLOCK_N, rope_dim]` are loaded once,
   scores `q_latent @ latent^T + q_pe @ rope^T` accumulate in fp32, an online softmax keeps the
   running max / sum, and `acc[BLOCK_H, kv_lora_rank] += p @ latent`. It writes the normalized
   partial output and its log-sum-exp (base 2, of the scaled scores) into fp32 scratch. Empty
   chunks write nothing.
2. `_mla_decode_combine_kernel`, grid `(B, H)`: merges the non-empty chunks of each row by their
   log-sum-exp (it recomputes which chunks are non-empty from `seq_lens`, so it never reads the
   scratch an empty chunk left unwritten) and writes the output in q's dtype.

Tiles (defaults, for H100 at DeepSeek V2-Lite / V3 shapes: kv_lora_rank 512, rope_dim 64,
H 16 or 128): BLOCK_H 16 (the smallest MMA M; V3's 128 heads take 8 head blocks, which re-read
the same KV tiles through L2), BLOCK_N 32 (a bf16 latent tile is 32 KiB of shared memory per
stage), num_warps 4, num_stages 2 -- the configuration the SGLang / vLLM Triton MLA decode
kernels settled on. Compiled ahead of time for sm_90 (Triton 3.9, bf16, 512/64) this uses
~59 KiB of shared memory and 255 registers per thread without spills; BLOCK_N 64 at 4 warps
spills, at 8 warps it does not (untimed: no GPU was at hand when this was written).
`tl.arange` needs powers of two, so the latent and rope widths are padded to the next power of
two (at least 16, the MMA K minimum) and masked; 512 and 64 need no padding.

`num_splits=None` picks the split count from the shapes alone (see `default_num_splits`): enough
programs for about two waves over the GPU's SMs, at most one split per BLOCK_N tile of the
largest possible context `block_table.shape[1] * page_size`.

`mla_decode_reference` is the same contract as a plain torch loop (fp32 softmax), for tests.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from workers.kernels import INTERPRET

BLOCK_H = 16
BLOCK_N = 32
NUM_WARPS = 4
NUM_STAGES = 2
WAVES = 2  # target programs per SM when picking num_splits
MAX_SPLITS = 64
_DEFAULT_SMS = 132  # H100 SXM; used where there is no CUDA device (the interpreter)


@triton.jit
def _mla_decode_split_kernel(
    q_ptr,  # [B, H, KV_LORA + ROPE]
    kv_ptr,  # [num_slots, KV_LORA + ROPE]
    block_table_ptr,  # [B, max_pages]
    seq_lens_ptr,  # [B]
    part_ptr,  # [B, H, num_splits, KV_LORA] fp32 scratch: normalized partial outputs
    lse_ptr,  # [B, H, num_splits] fp32 scratch: log2-sum-exp2 of the scaled scores
    num_heads,
    num_splits,
    page_size,
    scale_log2,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kv,
    stride_bt,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    KV_LORA: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next power of two >= KV_LORA
    BLOCK_R: tl.constexpr,  # next power of two >= ROPE
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,  # dot operands in fp32 (the interpreter's bf16/fp16 tl.dot is wrong)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs on a GPU (no TF32), else "tf32"
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + pid_b).to(tl.int32)
    chunk = tl.cdiv(seq_len, num_splits * BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    if end > start:
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = tl.arange(0, BLOCK_N)
        mask_h = offs_h < num_heads
        mask_c = offs_c < KV_LORA
        mask_r = offs_r < ROPE

        q_row = q_ptr + pid_b * stride_qb + offs_h[:, None] * stride_qh
        q_lat = tl.load(q_row + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        q_pe = tl.load(
            q_row + KV_LORA + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0
        )
        if UPCAST:
            q_lat = q_lat.to(tl.float32)
            q_pe = q_pe.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)

        bt_row = block_table_ptr + pid_b * stride_bt
        for tok0 in range(start, end, BLOCK_N):
            toks = tok0 + offs_n
            mask_n = toks < end
            page = tl.load(bt_row + toks // page_size, mask=mask_n, other=0).to(tl.int64)
            slot = page * page_size + toks % page_size
            kv_row = kv_ptr + slot[:, None] * stride_kv
            lat = tl.load(
                kv_row + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0
            )
            pe = tl.load(
                kv_row + KV_LORA + offs_r[None, :],
                mask=mask_n[:, None] & mask_r[None, :],
                other=0.0,
            )
            if UPCAST:
                lat = lat.to(tl.float32)
                pe = pe.to(tl.float32)
            else:
                lat = lat.to(q_lat.dtype)
                pe = pe.to(q_lat.dtype)

            qk = tl.dot(q_lat, tl.trans(lat), input_precision=DOT_PRECISION)
            qk = tl.dot(q_pe, tl.trans(pe), acc=qk, input_precision=DOT_PRECISION)
            qk = tl.where(mask_n[None, :], qk * scale_log2, float("-inf"))

            # Every tile holds at least one valid token, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(lat.dtype), lat, acc=acc, input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        part = part_ptr + pid_b * stride_pb + offs_h[:, None] * stride_ph + split * stride_ps
        tl.store(part + offs_c[None, :], out, mask=mask_h[:, None] & mask_c[None, :])
        lse = m_i + tl.log2(l_i)
        tl.store(lse_ptr + pid_b * stride_lb + offs_h * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _mla_decode_combine_kernel(
    part_ptr,  # [B, H, num_splits, KV_LORA] fp32
    lse_ptr,  # [B, H, num_splits] fp32
    seq_lens_ptr,  # [B]
    out_ptr,  # [B, H, KV_LORA]
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    KV_LORA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)

    seq_len = tl.load(seq_lens_ptr + pid_b).to(tl.int32)
    chunk = tl.cdiv(seq_len, num_splits * BLOCK_N) * BLOCK_N
    live = tl.cdiv(seq_len, tl.maximum(chunk, 1))  # the chunks the split kernel wrote

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < KV_LORA
    part = part_ptr + pid_b * stride_pb + pid_h * stride_ph
    lse_row = lse_ptr + pid_b * stride_lb + pid_h * stride_lh

    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, live):
        lse = tl.load(lse_row + s)
        vals = tl.load(part + s * stride_ps + offs_c, mask=mask_c, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + w * vals
        denom = denom * alpha + w
        m = m_new

    out = tl.where(denom > 0, acc / tl.maximum(denom, 1e-30), 0.0)
    dst = out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_c
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask_c)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def default_num_splits(
    batch: int,
    num_heads: int,
    max_context: int,
    num_sms: int,
    block_h: int = BLOCK_H,
    block_n: int = BLOCK_N,
) -> int:
    """Split count from shapes only: `cdiv(WAVES * num_sms, batch * cdiv(num_heads, block_h))`
    (so a short batch still puts about two programs on every SM), at most
    `cdiv(max_context, block_n)` (one tile per split) and MAX_SPLITS, at least 1."""
    head_blocks = max(batch * triton.cdiv(num_heads, block_h), 1)
    splits = triton.cdiv(WAVES * num_sms, head_blocks)
    return max(1, min(splits, triton.cdiv(max(max_context, 1), block_n), MAX_SPLITS))


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    kv_lora_rank: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Paged absorbed-MLA decode attention (see the module docstring for the contract).

    q: [B, H, kv_lora_rank + rope_dim]; kv_cache: [num_slots, kv_lora_rank + rope_dim];
    block_table: [B, max_pages] int; seq_lens: [B] int (on q's device). Returns
    [B, H, kv_lora_rank] in q's dtype. No host synchronization: `num_splits=None` is derived from
    the shapes (`block_table.shape[1] * page_size` stands for the longest context)."""
    batch, num_heads, qk_dim = q.shape
    rope_dim = qk_dim - kv_lora_rank
    if rope_dim < 0 or kv_cache.shape[-1] != qk_dim:
        raise ValueError(
            f"q width {qk_dim} and cache width {kv_cache.shape[-1]} must both be "
            f"kv_lora_rank ({kv_lora_rank}) + rope_dim"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last dimension must be contiguous")
    out = torch.empty(batch, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    if batch == 0 or num_heads == 0:
        return out
    q = q.contiguous()
    if num_splits is None:
        num_splits = default_num_splits(
            batch, num_heads, block_table.shape[1] * page_size, _num_sms(q.device)
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    part = torch.empty(
        batch, num_heads, num_splits, kv_lora_rank, dtype=torch.float32, device=q.device
    )
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_c = _pow2_at_least_16(kv_lora_rank)
    block_r = _pow2_at_least_16(max(rope_dim, 1))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    grid = (batch, triton.cdiv(num_heads, BLOCK_H), num_splits)
    _mla_decode_split_kernel[grid](
        q,
        kv_cache,
        block_table,
        seq_lens,
        part,
        lse,
        num_heads,
        num_splits,
        page_size,
        scale * 1.4426950408889634,  # log2(e)
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        block_table.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        KV_LORA=kv_lora_rank,
        ROPE=rope_dim,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        UPCAST=INTERPRET,
        DOT_PRECISION=precision,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    _mla_decode_combine_kernel[(batch, num_heads)](
        part,
        lse,
        seq_lens,
        out,
        num_splits,
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        KV_LORA=kv_lora_rank,
        BLOCK_C=block_c,
        BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    return out


def mla_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    kv_lora_rank: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """`mla_decode` as a plain torch loop over requests (fp32 scores and softmax); for tests.
    Synchronizes with the host (reads seq_lens); `num_splits` is accepted and ignored.

    q: [B, H, kv_lora_rank + rope_dim] -> [B, H, kv_lora_rank] in q's dtype."""
    del num_splits
    batch, num_heads, _ = q.shape
    out = torch.zeros(batch, num_heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    lens = seq_lens.tolist()
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        pages = block_table[b, : -(-n // page_size)].long()
        offsets = torch.arange(page_size, device=pages.device)
        slots = (pages[:, None] * page_size + offsets[None, :]).flatten()[:n]
        kv = kv_cache.index_select(0, slots.to(kv_cache.device)).float()  # [n, kv_lora + rope]
        scores = scale * (q[b].float() @ kv.T)  # [H, n]
        out[b] = torch.softmax(scores, dim=-1) @ kv[:, :kv_lora_rank]
    return out.to(q.dtype)
