"""Multi-head latent attention over a paged latent KV cache.

The cache holds, per token and layer, only `c_kv` (after `kv_a_layernorm`, `kv_lora_rank` wide)
and the rotated `k_pe` (`qk_rope_head_dim` wide). Prefill spans expand the latent through
`kv_b_proj` into per-head keys and values; decode uses the absorbed form — `W_UK` folded into the
query and `W_UV` applied after attention — so it reads the latent cache directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import cpu as cpu_kernels
from workers.kernels.cpu import blocks as cpu_blocks
from workers.model.batch import AttentionMetadata
from workers.model.config import ModelConfig
from workers.model.layers import Linear, RMSNorm, fuse_linears
from workers.model.rope import RotaryEmbedding

RopeTables = tuple[torch.Tensor, torch.Tensor]


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj: Linear | None = Linear(cfg.hidden_size, self.num_heads * qk_dim)
        else:
            self.q_proj = None
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.num_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(self.num_heads * self.v_dim, cfg.hidden_size, cfg.attention_bias)
        self._qkv_a: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # Decode attention: "torch" (any device), "triton" (workers.kernels.mla_decode) or
        # "cpu" (workers.kernels.cpu, float32 CPU tensors).
        self.decode_backend = "torch"
        # A decode-only batch's whole block in one C call (`use_cpu_block`), else None.
        self.cpu_block: cpu_blocks.MLABlock | None = None

    def fuse(self, transposed: bool = False) -> None:
        """Run q_a_proj (or q_proj) and kv_a_proj_with_mqa, which both read the hidden state,
        as one GEMM from now on (call after the weights are in place)."""
        first = self.q_a_proj if self.q_proj is None else self.q_proj
        self._qkv_a = fuse_linears(first, self.kv_a_proj_with_mqa, transposed=transposed)

    def use_cpu_block(self, rope: RotaryEmbedding) -> None:
        """Run decode-only batches as one `workers.kernels.cpu.blocks.MLABlock` call (float32 CPU
        weights, no biases), after `fuse(transposed=True)`; the projections' weights are kept
        transposed for it, their parameters stay views. Batches with a prefill keep the torch
        path."""
        linears = [self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj]
        linears += [self.q_proj] if self.q_proj is not None else [self.q_a_proj, self.q_b_proj]
        if any(lin.bias is not None for lin in linears if lin is not None):
            return
        assert self._qkv_a is not None and self._qkv_a[0].t().is_contiguous(), (
            "fuse(transposed=True) first"
        )
        self.o_proj.store_transposed()
        q_norm = w_qb_t = None
        if self.q_proj is None:
            self.q_b_proj.store_transposed()
            q_norm, w_qb_t = self.q_a_layernorm.weight.data, self.q_b_proj.weight.t()
        self.cpu_block = cpu_blocks.MLABlock(
            heads=self.num_heads, nope=self.nope_dim, rope=self.rope_dim, v=self.v_dim,
            kv_lora=self.kv_lora_rank, w_a_t=self._qkv_a[0].t(), q_norm=q_norm, w_qb_t=w_qb_t,
            kv_norm=self.kv_a_layernorm.weight.data, w_kvb=self.kv_b_proj.weight.data,
            w_o_t=self.o_proj.weight.t(), cos=rope.cos, sin=rope.sin,
            q_norm_eps=self.q_a_layernorm.eps if self.q_proj is None else 0.0,
            kv_norm_eps=self.kv_a_layernorm.eps, scale=self.scale, interleave=rope.interleave,
        )  # fmt: skip

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`W_UK: [heads, nope, kv_lora]` and `W_UV: [heads, v, kv_lora]` views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        meta: AttentionMetadata,
        rope: RotaryEmbedding,
        cos_sin: RopeTables,  # rope.lookup(meta.positions)
        kv_cache: torch.Tensor,  # [num_slots, kv_lora + rope] of this layer
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.cpu_block is not None and not meta.prefills and kv_cache.dtype == x.dtype:
            return self.cpu_block(
                x, meta.positions, meta.out_slots, kv_cache, meta.block_table, meta.seq_lens,
                meta.page_size,
            )  # fmt: skip
        if self._qkv_a is not None:
            first = self.q_a_proj if self.q_proj is None else self.q_proj
            q_a, kv_a = F.linear(x, *self._qkv_a).split(
                [first.weight.shape[0], self.kv_lora_rank + self.rope_dim], dim=-1
            )
            q = q_a if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(q_a))
        elif self.q_proj is not None:
            q = self.q_proj(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            kv_a = self.kv_a_proj_with_mqa(x)
        q = q.view(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        # The queries' and the shared key's rope parts rotate together: one set of small ops
        # instead of two (a decode step is dominated by per-op overhead on CPU).
        pe = rope.rotate(torch.cat((q_pe, k_pe[:, None, :]), dim=1), *cos_sin)
        q_pe, k_pe = pe[:, : self.num_heads], pe[:, self.num_heads]
        kv_cache[meta.out_slots] = torch.cat((c_kv, k_pe), dim=-1).to(kv_cache.dtype)

        out = x.new_empty(num_tokens, self.num_heads, self.v_dim)
        nd = meta.num_decode
        if nd:
            out[:nd] = self._decode(q_nope[:nd], q_pe[:nd], meta, kv_cache)
        fresh: torch.Tensor | None = None  # kv_b_proj of every prefill row, when needed
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.num_tokens)
            if span.ctx_slots.shape[0] == span.num_tokens and kv_cache.dtype == x.dtype:
                # No cached prefix: the span's keys are its own rows, just computed (the
                # cache holds them bit for bit), expanded for every such span in one GEMM.
                if fresh is None:
                    fresh = self.kv_b_proj(c_kv[nd:])
                kv = fresh[span.start - nd : span.start - nd + span.num_tokens]
                span_k_pe = k_pe[rows]
            else:
                ctx = kv_cache.index_select(0, span.ctx_slots).to(x.dtype)
                ctx_c_kv, span_k_pe = ctx.split([self.kv_lora_rank, self.rope_dim], dim=-1)
                kv = self.kv_b_proj(ctx_c_kv)
            out[rows] = self._prefill(q_nope[rows], q_pe[rows], kv, span_k_pe)
        return self.o_proj(out.view(num_tokens, self.num_heads * self.v_dim))

    def _decode(
        self,
        q_nope: torch.Tensor,  # [B, heads, nope]
        q_pe: torch.Tensor,  # [B, heads, rope]
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        w_uk, w_uv = self.absorbed_weights()
        # Heads-first batched GEMMs on views (what einsum would do, less its own overhead).
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, heads, kv_lora]
        q_full = torch.cat((q_latent, q_pe), dim=-1)  # [B, heads, kv_lora + rope]
        args = (meta.block_table, meta.seq_lens, meta.page_size, self.kv_lora_rank, self.scale)
        if self.decode_backend == "triton":
            from workers.kernels.mla_decode import mla_decode

            out_latent = mla_decode(q_full, kv_cache, *args)  # [B, heads, kv_lora]
        elif self.decode_backend == "cpu" and kv_cache.dtype == torch.float32:
            out_latent = cpu_kernels.mla_decode(q_full, kv_cache, *args)
        else:
            if meta.paged_decode is None:  # the step's first layer
                meta.paged_decode = paged_decode_inputs(
                    meta.block_table, meta.seq_lens, meta.page_size, q_full.dtype
                )
            out_latent = paged_decode_torch(q_full, kv_cache, *args, inputs=meta.paged_decode)
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _prefill(
        self,
        q_nope: torch.Tensor,  # [n, heads, nope]
        q_pe: torch.Tensor,  # [n, heads, rope]
        kv: torch.Tensor,  # [L, heads * (nope + v)]: kv_b_proj of the context, span last
        k_pe: torch.Tensor,  # [L, rope]
    ) -> torch.Tensor:
        num_q, ctx_len = q_nope.shape[0], kv.shape[0]
        kv = kv.view(ctx_len, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
        if q.device.type == "cpu":
            # With v narrower than q/k, CPU SDPA falls back to its unfused math path, ~3x the
            # time of one baddbmm + softmax + bmm at these sizes.
            return causal_attention(q, k, v, self.scale).transpose(0, 1)
        mask = None
        if num_q != ctx_len:  # a cached prefix: query i sits at ctx_len - num_q + i
            mask = torch.ones(num_q, ctx_len, dtype=torch.bool, device=q.device)
            mask = mask.tril(ctx_len - num_q)
        # Without a prefix plain causal attention, which lets SDPA pick its fused kernels.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale
        )
        return out.transpose(0, 1)


CAUSAL_BLOCK = 64  # queries per block of `causal_attention`


def causal_attention(
    q: torch.Tensor,  # [heads, n, d]
    k: torch.Tensor,  # [heads, L, d], the n queries' own keys last
    v: torch.Tensor,  # [heads, L, dv]
    scale: float,
) -> torch.Tensor:
    """Attention of the last `n` of `L` positions to every position up to their own: query i
    sits at `L - n + i`. Softmax in float32. Returns `[heads, n, dv]`.

    More than `CAUSAL_BLOCK` queries go a block at a time, each against the keys up to its
    last query only: a long prompt's scores are then a staircase, not the whole square of
    which the causal mask throws half away (1024 queries: 53% of the work, and a block of
    scores at a time in memory; a prefill of 8 x 1024 tokens of the tiny model on one CPU
    thread went from 820 to 330 ms, blocks of 64 and 128 alike, 256 and 512 slower)."""
    num_q, ctx_len = q.shape[1], k.shape[1]
    if num_q > CAUSAL_BLOCK:
        out = q.new_empty(q.shape[0], num_q, v.shape[-1])
        before = ctx_len - num_q  # keys before the first query's own
        for start in range(0, num_q, CAUSAL_BLOCK):
            end = min(start + CAUSAL_BLOCK, num_q)
            visible = before + end
            out[:, start:end] = causal_attention(
                q[:, start:end], k[:, :visible], v[:, :visible], scale
            )
        return out
    bias = torch.full((num_q, ctx_len), float("-inf"), dtype=q.dtype, device=q.device)
    bias = bias.triu(ctx_len - num_q + 1)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(probs, v)


class PagedDecodeInputs(NamedTuple):
    """What the torch decode attention derives from a step's block table and lengths; built
    once per step (`AttentionMetadata.paged_decode`) and shared by every layer."""

    page_ids: torch.Tensor  # [B * max_pages] int64, the block table flattened
    bias: torch.Tensor  # [B, 1, max_pages * page_size]: 0 inside a context, -inf past it
    # [B] bool: padding rows (length 0), whose output is zeroed; None when there is none
    # (known on the host for CPU tensors; a device tensor is not asked, to avoid a sync).
    empty: torch.Tensor | None


def paged_decode_inputs(
    block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, dtype: torch.dtype
) -> PagedDecodeInputs:
    num_reqs, max_pages = block_table.shape
    positions = torch.arange(max_pages * page_size, device=block_table.device)
    valid = positions[None, :] < seq_lens[:, None]
    empty = seq_lens == 0
    valid[:, 0] |= empty  # an empty row attends to one junk slot (finite), then is zeroed
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    bias = bias.masked_fill(~valid, float("-inf"))[:, None, :]
    empty_rows = None if empty.device.type == "cpu" and not bool(empty.any()) else empty
    return PagedDecodeInputs(block_table.flatten().long(), bias, empty_rows)


def paged_decode_torch(
    q: torch.Tensor,  # [B, heads, kv_lora + rope] absorbed query
    kv_cache: torch.Tensor,  # [num_slots, kv_lora + rope], num_slots a multiple of page_size
    block_table: torch.Tensor,  # [B, max_pages] page ids, valid ids (0) past a context
    seq_lens: torch.Tensor,  # [B]
    page_size: int,
    kv_lora_rank: int,
    scale: float,
    inputs: PagedDecodeInputs | None = None,  # paged_decode_inputs(...) of these, if built
) -> torch.Tensor:
    """Absorbed-form decode attention in plain torch: every request's pages gathered whole
    into one padded `[B, max_pages * page_size, kv_dim]` batch (a page is one contiguous row
    of the cache viewed as `[pages, page_size * kv_dim]`: several times faster to gather than
    token slots), positions past its length masked by an additive bias folded into the score
    GEMM. Slots past a context must hold finite values (the engine's cache starts zeroed and
    only ever holds computed KV). Returns `[B, heads, kv_lora_rank]`; a request of length 0
    gets zeros."""
    num_reqs, max_pages = block_table.shape
    if not num_reqs:
        return q.new_zeros(0, q.shape[1], kv_lora_rank)
    if inputs is None:
        inputs = paged_decode_inputs(block_table, seq_lens, page_size, q.dtype)
    kv_dim = kv_cache.shape[-1]
    pages = kv_cache.view(-1, page_size * kv_dim).index_select(0, inputs.page_ids)
    latent = pages.view(num_reqs, max_pages * page_size, kv_dim).to(q.dtype)
    # scores = scale * q @ latent^T + bias, one GEMM: [B, heads, L]
    scores = torch.baddbmm(inputs.bias, q, latent.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs, latent[..., :kv_lora_rank])
    if inputs.empty is None:
        return out
    return out.masked_fill(inputs.empty[:, None, None], 0.0)
