"""One decoder layer of the DeepSeek-V3/V2 model: MLA attention, then a dense MLP or a MoE
(expert-parallel with `ep`), each behind an RMSNorm and a residual."""

from __future__ import annotations

import torch
from torch import nn

from workers.ep.moe import EPContext, EPMoE
from workers.kernels.cpu import blocks as cpu_blocks
from workers.model.batch import AttentionMetadata
from workers.model.config import ModelConfig
from workers.model.layers import MLP, RMSNorm
from workers.model.mla import MLAttention
from workers.model.moe import MoE
from workers.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ep: EPContext | None = None):
        super().__init__()
        self.self_attn = MLAttention(cfg)
        self.mlp: MoE | EPMoE | MLP
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg, layer_idx) if ep is None else EPMoE(cfg, layer_idx, ep)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        meta: AttentionMetadata,
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        x = self.attention(x, meta, rope, cos_sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def attention(
        self,
        x: torch.Tensor,
        meta: AttentionMetadata,
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """The residual stream after the attention block."""
        return x + self.self_attn(self.input_layernorm(x), meta, rope, cos_sin, kv_cache)

    def cpu_blocks(self) -> cpu_blocks.DecoderLayerBlocks | None:
        """The layer as C blocks (for `DecodeLayers`), when each of its parts runs in C
        (after `DeepseekForCausalLM.place`'s `use_cpu_*` calls); else None."""
        ffn: cpu_blocks.DenseFFN | cpu_blocks.MoEFFN
        if isinstance(self.mlp, MoE) and self.mlp.cpu_kernel:
            ffn = self.mlp.cpu_ffn()
        elif isinstance(self.mlp, MLP) and self.mlp.cpu_weights is not None:
            ffn = cpu_blocks.DenseFFN(*self.mlp.cpu_weights)
        else:
            return None
        attn = self.self_attn.cpu_block
        if attn is None:
            return None
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        return cpu_blocks.DecoderLayerBlocks(
            attn, norm1.weight.data, norm1.eps, norm2.weight.data, norm2.eps, ffn
        )
