"""Whole blocks of a decode step as single C calls (layer.c): one layer's attention block,
the dense and MoE feed-forward blocks, and every decoder layer of a decode batch at once.

Each object is built when the model is placed, from the weight tensors in the kernels'
layouts; it holds those tensors (the C side keeps pointers to them) and checks their shapes
once, so that a call checks only what changes per step (the batch's tensors).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from workers.kernels.cpu import _check_f32_cpu, _lib, _raise_for


class _MLAWeights(ctypes.Structure):
    """`struct pds_mla_weights` of layer.c."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in
          ("hidden", "q_lora", "heads", "nope", "rope", "v", "kv_lora", "max_positions")),
        *((name, ctypes.c_void_p) for name in
          ("w_a_t", "q_norm", "w_qb_t", "kv_norm", "w_kvb", "w_o_t", "cos", "sin")),
        ("q_norm_eps", ctypes.c_float), ("kv_norm_eps", ctypes.c_float),
        ("scale", ctypes.c_float), ("interleave", ctypes.c_int32),
    ]  # fmt: skip


def _dense_f32(**tensors: torch.Tensor) -> None:
    _check_f32_cpu(**tensors)
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


class _DecodeIndices(NamedTuple):
    positions: torch.Tensor  # [B] int64
    out_slots: torch.Tensor  # [B] int64
    block_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32


def _decode_indices(
    num_tokens: int,
    positions: torch.Tensor,
    out_slots: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
) -> _DecodeIndices:
    """A decode batch's indices in the kernels' dtypes, contiguous, one row per token."""
    positions = positions.to(torch.int64).contiguous()
    out_slots = out_slots.to(torch.int64).contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if not (positions.shape == out_slots.shape == seq_lens.shape == (num_tokens,)) or (
        block_table.shape[0] != num_tokens
    ):
        raise ValueError("positions, out_slots, seq_lens and block_table must have B rows")
    return _DecodeIndices(positions, out_slots, block_table, seq_lens)


class MLABlock:
    """One layer's attention block for a decode batch as one call of `pds_mla_block_f32`
    (layer.c): from the normed hidden states to `o_proj`'s output, writing each token's latent
    KV to the cache on the way. Built once per layer when the model is placed; it holds the
    weight tensors it points to. Weights are float32, contiguous, in the kernel's layout:

    - `w_a_t: [hidden, qa + kv_lora + rope]`: the transposed q_a (or q) and kv_a projections,
      fused (qa = q_lora, or heads * (nope + rope) without q compression);
    - `q_norm: [q_lora]`, `w_qb_t: [q_lora, heads * (nope + rope)]`: None without q_lora;
    - `kv_norm: [kv_lora]`; `w_kvb: [heads * (nope + v), kv_lora]` (kv_b_proj as it is);
    - `w_o_t: [heads * v, hidden]`; `cos`, `sin`: the rope tables `[max_positions, rope / 2]`.
    """

    def __init__(
        self, *, heads: int, nope: int, rope: int, v: int, kv_lora: int,
        w_a_t: torch.Tensor, q_norm: torch.Tensor | None, w_qb_t: torch.Tensor | None,
        kv_norm: torch.Tensor, w_kvb: torch.Tensor, w_o_t: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, q_norm_eps: float, kv_norm_eps: float,
        scale: float, interleave: bool,
    ):  # fmt: skip
        _lib()
        hidden = w_o_t.shape[1]
        q_lora = 0 if w_qb_t is None else w_qb_t.shape[0]
        qa = q_lora or heads * (nope + rope)
        tensors = {"w_a_t": w_a_t, "kv_norm": kv_norm, "w_kvb": w_kvb, "w_o_t": w_o_t,
                   "cos": cos, "sin": sin}  # fmt: skip
        if (q_norm is None) != (w_qb_t is None):
            raise ValueError("q_norm and w_qb_t come together (q compression) or not at all")
        if q_norm is not None and w_qb_t is not None:
            tensors.update(q_norm=q_norm, w_qb_t=w_qb_t)
        _dense_f32(**tensors)
        expected = {
            "w_a_t": (hidden, qa + kv_lora + rope), "kv_norm": (kv_lora,),
            "w_kvb": (heads * (nope + v), kv_lora), "w_o_t": (heads * v, hidden),
            "cos": (cos.shape[0], rope // 2), "sin": (cos.shape[0], rope // 2),
        }  # fmt: skip
        if q_lora:
            expected.update(q_norm=(q_lora,), w_qb_t=(q_lora, heads * (nope + rope)))
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{name} is {tuple(tensors[name].shape)}, expected {shape}")
        self.hidden, self.dim = hidden, kv_lora + rope
        self._tensors = tensors  # what the struct points to stays alive with it
        ptr = {name: t.data_ptr() for name, t in tensors.items()}
        self._weights = _MLAWeights(
            hidden, q_lora, heads, nope, rope, v, kv_lora, cos.shape[0],
            ptr["w_a_t"], ptr.get("q_norm"), ptr.get("w_qb_t"), ptr["kv_norm"], ptr["w_kvb"],
            ptr["w_o_t"], ptr["cos"], ptr["sin"], q_norm_eps, kv_norm_eps, scale, int(interleave),
        )  # fmt: skip

    def __call__(
        self,
        x: torch.Tensor,  # [B, hidden] float32, normed
        positions: torch.Tensor,  # [B] int64
        out_slots: torch.Tensor,  # [B] int64 cache slot of each token's KV
        kv_cache: torch.Tensor,  # [num_slots, kv_lora + rope] float32, one layer, contiguous
        block_table: torch.Tensor,  # [B, max_pages] int32
        seq_lens: torch.Tensor,  # [B] int32, the new token included
        page_size: int,
    ) -> torch.Tensor:
        """`[B, hidden]`. Raises `ValueError` on a slot, page or position outside its table."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be float32 [B, {self.hidden}], got {x.dtype} {x.shape}")
        if kv_cache.dtype != torch.float32 or kv_cache.shape[-1] != self.dim:
            raise ValueError(f"kv_cache must be float32 [slots, {self.dim}]")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous (it is written in place)")
        x = x.contiguous()
        num_tokens = x.shape[0]
        positions, out_slots, block_table, seq_lens = _decode_indices(
            num_tokens, positions, out_slots, block_table, seq_lens
        )
        out = torch.empty_like(x)
        status = _lib().pds_mla_block_f32(
            ctypes.addressof(self._weights), x.data_ptr(), num_tokens, positions.data_ptr(),
            out_slots.data_ptr(), kv_cache.data_ptr(), kv_cache.shape[0],
            block_table.data_ptr(), block_table.shape[1], seq_lens.data_ptr(), page_size,
            out.data_ptr(),
        )  # fmt: skip
        _raise_for(status, "mla_block", "a slot, page or position is outside its table")
        return out


@dataclass(frozen=True)
class DenseFFN:
    """A dense SwiGLU block: `w13t: [hidden, 2 * inter]` (gate columns, then up), `w2t:
    [inter, hidden]`, float32, contiguous."""

    w13t: torch.Tensor
    w2t: torch.Tensor


@dataclass(frozen=True)
class MoEFFN:
    """A DeepSeek-V3 MoE block (`noaux_tc` routing), its tensors as `moe_block` takes them."""

    gate_t: torch.Tensor  # [hidden, E]
    bias: torch.Tensor  # [E] e_score_correction_bias
    num_groups: int
    topk_group: int
    top_k: int
    norm_topk_prob: bool
    scaling: float
    w13t: torch.Tensor  # [E, hidden, 2 * inter]
    w2t: torch.Tensor  # [E, inter, hidden]
    shared: tuple[torch.Tensor, torch.Tensor] | None  # the shared experts' (w13t, w2t)


@dataclass(frozen=True)
class DecoderLayerBlocks:
    """One decoder layer for `DecodeLayers`: `x += attention(attn_norm(x))`, then `x +=
    ffn(ffn_norm(x))`; the norms' weights are `[hidden]` float32."""

    attention: MLABlock
    attn_norm: torch.Tensor
    attn_eps: float
    ffn_norm: torch.Tensor
    ffn_eps: float
    ffn: DenseFFN | MoEFFN


class _Layer(ctypes.Structure):
    """`struct pds_layer` of layer.c."""

    _fields_ = [
        ("attn", ctypes.c_void_p), ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
        ("attn_eps", ctypes.c_float), ("ffn_eps", ctypes.c_float),
        ("gate_t", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in
          ("num_experts", "num_groups", "topk_group", "top_k")),
        ("norm_topk", ctypes.c_int32), ("scaling", ctypes.c_float),
        ("w13t", ctypes.c_void_p), ("w2t", ctypes.c_void_p), ("inter", ctypes.c_int64),
        ("shared13t", ctypes.c_void_p), ("shared2t", ctypes.c_void_p),
        ("shared_inter", ctypes.c_int64),
    ]  # fmt: skip


def _check_ffn(ffn: DenseFFN | MoEFFN, hidden: int) -> None:
    if isinstance(ffn, DenseFFN):
        _dense_f32(w13t=ffn.w13t, w2t=ffn.w2t)
        two_inter = ffn.w13t.shape[1]
        if ffn.w13t.shape != (hidden, two_inter) or ffn.w2t.shape != (two_inter // 2, hidden):
            raise ValueError(f"bad dense shapes: {tuple(ffn.w13t.shape)}, {tuple(ffn.w2t.shape)}")
        return
    _dense_f32(gate_t=ffn.gate_t, bias=ffn.bias, w13t=ffn.w13t, w2t=ffn.w2t)
    num_experts, two_inter = ffn.gate_t.shape[1], ffn.w13t.shape[2]
    if (
        ffn.gate_t.shape[0] != hidden or ffn.bias.shape != (num_experts,)
        or ffn.w13t.shape != (num_experts, hidden, two_inter)
        or ffn.w2t.shape != (num_experts, two_inter // 2, hidden)
        or num_experts % ffn.num_groups or not 0 < ffn.top_k <= num_experts
    ):  # fmt: skip
        raise ValueError(
            f"bad MoE shapes: gate_t {tuple(ffn.gate_t.shape)}, w13t {tuple(ffn.w13t.shape)}, "
            f"w2t {tuple(ffn.w2t.shape)}, {ffn.num_groups} groups, top-{ffn.top_k}"
        )
    if ffn.shared is not None:
        s13, s2 = ffn.shared
        _dense_f32(shared_w13t=s13, shared_w2t=s2)
        if s13.shape[0] != hidden or s2.shape != (s13.shape[1] // 2, hidden):
            raise ValueError(f"bad shared expert shapes: {tuple(s13.shape)}, {tuple(s2.shape)}")


def mlp(
    x: torch.Tensor,  # [T, hidden] float32 (rows may be strided)
    w13t: torch.Tensor,  # [hidden, 2 * inter] float32, contiguous (gate columns, then up)
    w2t: torch.Tensor,  # [inter, hidden] float32, contiguous
) -> torch.Tensor:
    """Dense SwiGLU `down(silu(gate(x)) * up(x))` over transposed weights: `[T, hidden]`."""
    lib = _lib()
    _check_f32_cpu(x=x)
    _dense_f32(w13t=w13t, w2t=w2t)
    hidden, two_inter = w13t.shape
    if x.dim() != 2 or x.shape[1] != hidden or w2t.shape != (two_inter // 2, hidden):
        raise ValueError(f"shapes do not match: x {x.shape}, w13t {w13t.shape}, w2t {w2t.shape}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    status = lib.pds_mlp_f32(
        x.data_ptr(), x.stride(0), x.shape[0], hidden, w13t.data_ptr(), w2t.data_ptr(),
        two_inter // 2, 0, out.data_ptr(),
    )  # fmt: skip
    _raise_for(status, "mlp", "")
    return out


def moe_block(
    x: torch.Tensor,  # [T, hidden] float32
    ffn: MoEFFN,
    load: torch.Tensor | None,  # [E] int64 CPU, contiguous: += routed picks per expert
) -> torch.Tensor:
    """A DeepSeek-V3 MoE layer in one call (layer.c): router GEMM, `noaux_tc` routing (as
    `route_noaux_tc`), routed experts (as `moe_experts`) plus the shared experts: `[T, hidden]`."""
    lib = _lib()
    _check_f32_cpu(x=x)
    hidden = ffn.gate_t.shape[0]
    _check_ffn(ffn, hidden)
    num_experts = ffn.gate_t.shape[1]
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [T, {hidden}], got {tuple(x.shape)}")
    if load is not None and (
        load.dtype != torch.int64 or load.shape != (num_experts,) or not load.is_contiguous()
        or load.device.type != "cpu"
    ):  # fmt: skip
        raise ValueError(f"load must be a contiguous int64 CPU tensor of {num_experts}")
    shared13, shared2 = ffn.shared if ffn.shared is not None else (None, None)
    x = x.contiguous()
    out = torch.empty_like(x)
    status = lib.pds_moe_block_f32(
        x.data_ptr(), x.shape[0], hidden, ffn.gate_t.data_ptr(), ffn.bias.data_ptr(),
        num_experts, ffn.num_groups, ffn.topk_group, ffn.top_k, int(ffn.norm_topk_prob),
        ffn.scaling, ffn.w13t.data_ptr(), ffn.w2t.data_ptr(), ffn.w2t.shape[1],
        None if shared13 is None else shared13.data_ptr(),
        None if shared2 is None else shared2.data_ptr(),
        0 if shared2 is None else shared2.shape[0],
        None if load is None else load.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    _raise_for(status, "moe_block", "")
    return out


class DecodeLayers:
    """Every decoder layer of a decode batch in one call of `pds_decode_layers_f32`: from the
    embeddings to the residual stream before the final norm, the same to the bit as the
    blocks called one by one (it makes the same C calls, minus a Python round trip, a norm
    call and a residual add per block). The expert weights are pointed to as they are at
    build: whoever replaces them builds a new one."""

    def __init__(self, layers: Sequence[DecoderLayerBlocks]):
        _lib()
        if not layers:
            raise ValueError("no layers")
        hidden = layers[0].attention.hidden
        self.hidden, self.dim = hidden, layers[0].attention.dim
        self.num_layers = len(layers)
        self.num_experts = 0  # of the MoE layers (the load counts' width), 0: none
        self._layers = tuple(layers)  # what the structs point to stays alive with them
        self._array = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            attn, ffn = layer.attention, layer.ffn
            if (attn.hidden, attn.dim) != (hidden, self.dim):
                raise ValueError(f"layer {i}: attention shapes differ from layer 0's")
            _dense_f32(attn_norm=layer.attn_norm, ffn_norm=layer.ffn_norm)
            if layer.attn_norm.shape != (hidden,) or layer.ffn_norm.shape != (hidden,):
                raise ValueError(f"layer {i}: norm weights must be [{hidden}]")
            _check_ffn(ffn, hidden)
            s = self._array[i]
            s.attn = ctypes.addressof(attn._weights)
            s.attn_norm, s.attn_eps = layer.attn_norm.data_ptr(), layer.attn_eps
            s.ffn_norm, s.ffn_eps = layer.ffn_norm.data_ptr(), layer.ffn_eps
            s.w13t, s.w2t = ffn.w13t.data_ptr(), ffn.w2t.data_ptr()
            s.inter = ffn.w2t.shape[-2]
            if isinstance(ffn, MoEFFN):
                num_experts = ffn.gate_t.shape[1]
                if self.num_experts not in (0, num_experts):
                    raise ValueError("the MoE layers differ in their number of experts")
                self.num_experts = num_experts
                s.gate_t, s.bias = ffn.gate_t.data_ptr(), ffn.bias.data_ptr()
                s.num_experts = num_experts
                s.num_groups, s.topk_group, s.top_k = ffn.num_groups, ffn.topk_group, ffn.top_k
                s.norm_topk, s.scaling = int(ffn.norm_topk_prob), ffn.scaling
                if ffn.shared is not None:
                    s.shared13t, s.shared2t = ffn.shared[0].data_ptr(), ffn.shared[1].data_ptr()
                    s.shared_inter = ffn.shared[1].shape[0]

    def __call__(
        self,
        x: torch.Tensor,  # [B, hidden] float32: the embeddings
        positions: torch.Tensor,  # [B] int64
        out_slots: torch.Tensor,  # [B] int64 cache slot of each token's KV
        kv_cache: torch.Tensor,  # [num_layers, num_slots, kv_lora + rope] float32, contiguous
        block_table: torch.Tensor,  # [B, max_pages] int32
        seq_lens: torch.Tensor,  # [B] int32, the new token included
        page_size: int,
        load: torch.Tensor | None = None,  # [num_layers, E] int64: += routed picks
    ) -> torch.Tensor:
        """The residual stream after the last layer, `[B, hidden]`. Raises `ValueError` on a
        slot, page or position outside its table (the cache may then be partly written)."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be float32 [B, {self.hidden}], got {x.dtype} {x.shape}")
        if (
            kv_cache.dtype != torch.float32 or kv_cache.dim() != 3
            or kv_cache.shape[0] != self.num_layers or kv_cache.shape[2] != self.dim
            or not kv_cache.is_contiguous()
        ):  # fmt: skip
            raise ValueError(
                f"kv_cache must be contiguous float32 [{self.num_layers}, slots, {self.dim}]"
            )
        if load is not None and (
            load.dtype != torch.int64 or load.shape != (self.num_layers, self.num_experts)
            or not load.is_contiguous() or load.device.type != "cpu"
        ):  # fmt: skip
            raise ValueError(
                f"load must be contiguous int64 [{self.num_layers}, {self.num_experts}]"
            )
        out = x.contiguous().clone()
        num_tokens = x.shape[0]
        positions, out_slots, block_table, seq_lens = _decode_indices(
            num_tokens, positions, out_slots, block_table, seq_lens
        )
        status = _lib().pds_decode_layers_f32(
            self._array, self.num_layers, out.data_ptr(), num_tokens, positions.data_ptr(),
            out_slots.data_ptr(), kv_cache.data_ptr(), kv_cache.shape[1],
            block_table.data_ptr(), block_table.shape[1], seq_lens.data_ptr(), page_size,
            None if load is None else load.data_ptr(),
        )  # fmt: skip
        _raise_for(status, "decode_layers", "a slot, page or position is outside its table")
        return out
