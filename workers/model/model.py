"""The DeepSeek-V3/V2 decoder over a flattened batch of tokens and a paged latent KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.batch import AttentionMetadata
from workers.model.config import ModelConfig
from workers.model.layers import MLP, RMSNorm, empty_param
from workers.model.mla import MLAttention
from workers.model.moe import MoE, RoutedExperts, grouped_gemm_backends
from workers.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(cfg)
        self.mlp: MoE | MLP
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg)
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
        x = x + self.self_attn(self.input_layernorm(x), meta, rope, cos_sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    """Holds the `model.*` weights under the checkpoint's names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """Parameter names match Hugging Face checkpoints except routed experts, which are stacked
    (`mlp.experts.w13`, `mlp.experts.w2`); see `workers.model.loader`."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = _Body(cfg)
        self.lm_head = empty_param(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(
            cfg.rope,
            cfg.qk_rope_head_dim,
            max_positions or cfg.max_position_embeddings,
            cfg.rope_interleave,
        )

    def place(self, device: torch.device, dtype: torch.dtype) -> DeepseekForCausalLM:
        """Move weights to `device`/`dtype`; router weights and biases stay float32."""
        self.to(device=device)
        for name, p in self.named_parameters():
            keep_fp32 = name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")
            if not keep_fp32:
                p.data = p.data.to(dtype)
        self.rope.to(device, torch.float32)
        backend = grouped_gemm_backends(device, dtype)[0]
        for module in self.modules():
            if isinstance(module, RoutedExperts):
                module.backend = backend
            elif isinstance(module, MLAttention | MLP):
                module.fuse()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [num_layers, num_slots, kv_lora + rope]
    ) -> torch.Tensor:
        """Logits `[S, vocab]` (float32) for the rows `meta.logits_indices`."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rope.lookup(meta.positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, meta, self.rope, cos_sin, kv_cache[i])
        x = self.model.norm(x[meta.logits_indices])
        return F.linear(x, self.lm_head).float()
