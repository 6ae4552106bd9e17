"""DeepSeek-V3's multi-token-prediction (MTP) module, served as a draft model.

Trained next to the main model, the module predicts the token after next: for the row at
position `i` it reads the main model's final hidden state `h_i` and the embedding of token
`i + 1`, and through one decoder layer of its own (with its own latent KV cache) gives logits
for token `i + 2`:

    x = eh_proj([enorm(embed(t[i+1])), hnorm(h[i])])
    logits = lm_head(shared_head.norm(decoder_layer(x)))

The embedding and the output head are the main model's (DeepSeek-V3 shares them; the
checkpoint's copies under the module's layer are not loaded). The module reads the same
batch layout as the main forward it follows — same positions, KV slots and block tables,
its KV in one more layer of the cache — with each row's token replaced by the token after it
(`workers.engine.mtp_draft`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.ep.moe import EPContext
from workers.ep.placement import ExpertPlacement
from workers.kernels.cpu import blocks as cpu_blocks
from workers.model.batch import AttentionMetadata
from workers.model.config import ModelConfig
from workers.model.decoder_layer import DecoderLayer
from workers.model.layers import Linear, RMSNorm
from workers.model.rope import RotaryEmbedding


class SharedHead(nn.Module):
    """The module's final norm (its head is the main model's `lm_head`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(nn.Module):
    """Checkpoint layer `num_hidden_layers` (`model.layers.61` in DeepSeek-V3), its parameter
    names those of the checkpoint after the layer prefix (its decoder layer's under `block.`).
    With `ep` its MoE is expert-parallel like the main layers' (`mtp_ep_context`)."""

    def __init__(self, cfg: ModelConfig, ep: EPContext | None = None):
        super().__init__()
        self.layer_idx = cfg.num_hidden_layers
        self.block = DecoderLayer(
            cfg, self.layer_idx, None if ep is None else mtp_ep_context(cfg, ep)
        )
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)
        # Decode-only batches through the decoder layer as one C call (`use_cpu_layer`).
        self.cpu_layer: cpu_blocks.DecodeLayers | None = None

    def use_cpu_layer(self) -> None:
        blocks = self.block.cpu_blocks()
        self.cpu_layer = None if blocks is None else cpu_blocks.DecodeLayers([blocks])

    def forward(
        self,
        next_ids: torch.Tensor,  # [T] the token after each row's
        hidden: torch.Tensor,  # [T, hidden] the main model's final (normed) hidden states
        meta: AttentionMetadata,  # the main forward's
        embed: nn.Embedding,
        lm_head: torch.Tensor,  # [vocab, hidden]
        rope: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [1, num_slots, kv_lora + rope] the module's layer of the cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[S, vocab]` (float32) of the token after next, for `meta.logits_indices`,
        and those rows' final (normed) hidden states `[S, hidden]`: what the module reads
        as `hidden` to guess on from its own guess."""
        x = torch.cat((self.enorm(embed(next_ids)), self.hnorm(hidden)), dim=-1)
        x = self.eh_proj(x)
        if self.cpu_layer is not None and not meta.prefills and kv_cache.dtype == torch.float32:
            x = self.cpu_layer(
                x, meta.positions, meta.out_slots, kv_cache, meta.block_table, meta.seq_lens,
                meta.page_size, None,
            )  # fmt: skip
        else:
            x = self.block(x, meta, rope, rope.lookup(meta.positions), kv_cache[0])
        x = self.shared_head.norm(x[meta.logits_indices])
        return F.linear(x, lm_head).float(), x


def mtp_ep_context(cfg: ModelConfig, ep: EPContext) -> EPContext:
    """The MTP module's share of an expert-parallel pool: the main layers' dispatcher (its
    all-to-all is one more collective of every step, in lockstep like theirs) and a placement
    of its own — the default one, with as many slots a rank as the main layers have — that no
    rebalance moves and no load count records (EPLB balances the main layers)."""
    main = ep.placement
    placement = ExpertPlacement.default(
        cfg.num_hidden_layers + 1, main.num_logical, main.num_physical - main.num_logical,
        main.num_ranks,
    )  # fmt: skip
    return EPContext(ep.rank, ep.world_size, placement, ep.dispatcher)
