"""The DeepSeek-V3/V2 decoder over a flattened batch of tokens and a paged latent KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workers.ep.moe import EPContext, EPMoE
from workers.kernels import triton_available
from workers.kernels.cpu import blocks as cpu_blocks
from workers.model.batch import AttentionMetadata, PromptScores
from workers.model.config import ModelConfig
from workers.model.decoder_layer import DecoderLayer
from workers.model.layers import MLP, RMSNorm, empty_param
from workers.model.mla import MLAttention
from workers.model.moe import ExpertLoad, Gate, MoE, RoutedExperts, grouped_gemm_backends
from workers.model.mtp import MTPLayer
from workers.model.rope import RotaryEmbedding

SCORE_CHUNK = 256  # rows per LM-head call when scoring a prompt


class _Body(nn.Module):
    """Holds the `model.*` weights under the checkpoint's names."""

    def __init__(self, cfg: ModelConfig, ep: EPContext | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ep) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """Parameter names match Hugging Face checkpoints except routed experts, which are stacked
    (`mlp.experts.w13`, `mlp.experts.w2`); see `workers.model.loader`. With `ep` (a rank of an
    expert-parallel pool) each MoE layer holds only the rank's expert slots, and every forward
    is a collective over the pool."""

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int | None = None,
        ep: EPContext | None = None,
        mtp: bool = False,
    ):
        super().__init__()
        self.config = cfg
        self.ep = ep
        self.model = _Body(cfg, ep)
        self.lm_head = empty_param(cfg.vocab_size, cfg.hidden_size)
        # The multi-token-prediction module, a draft model for speculative decoding (`mtp`:
        # load it; a checkpoint with `num_nextn_predict_layers` >= 1 holds it).
        self.mtp = MTPLayer(cfg, ep) if mtp else None
        self.rope = RotaryEmbedding(
            cfg.rope,
            cfg.qk_rope_head_dim,
            max_positions or cfg.max_position_embeddings,
            cfg.rope_interleave,
        )
        # Decode-only batches through every layer in one C call (`use_cpu_layers`), built for
        # the expert weights whose data pointers are `_cpu_layers_key`.
        self.cpu_layers: cpu_blocks.DecodeLayers | None = None
        self._cpu_layers_key: tuple[int, ...] = ()
        self._experts: list[RoutedExperts] | None = None
        self._load: ExpertLoad | None = None

    def place(self, device: torch.device, dtype: torch.dtype) -> DeepseekForCausalLM:
        """Move weights to `device`/`dtype`; router weights and biases stay float32."""
        self.to(device=device)
        for name, p in self.named_parameters():
            keep_fp32 = name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")
            if not keep_fp32 and p.dtype != torch.float8_e4m3fn:
                p.data = p.data.to(dtype)
        self.rope.to(device, torch.float32)
        backend = grouped_gemm_backends(device, dtype)[0]
        # float32 on a CPU where workers.kernels.cpu builds: its C kernels for all four parts.
        use_c = backend == "cpu"
        attention = "triton" if device.type == "cuda" and triton_available() else "torch"
        attention = "cpu" if use_c else attention
        for module in self.modules():
            if isinstance(module, RoutedExperts):
                module.backend = "triton" if module.is_fp8 else backend
                if use_c and not module.is_fp8:
                    module.transpose_storage()
            elif isinstance(module, MLAttention | MLP):
                module.fuse(transposed=use_c)  # the C blocks read the fused weights transposed
            if isinstance(module, MLAttention):
                module.decode_backend = attention
            elif isinstance(module, RMSNorm | Gate):
                module.backend = "cpu" if use_c else "torch"
        self.cpu_layers = None
        if use_c:  # whole blocks as one C call each (decode-only batches for attention)
            for module in self.modules():
                if isinstance(module, MLAttention):
                    module.use_cpu_block(self.rope)
                elif isinstance(module, MoE):
                    module.use_cpu_kernel()
                elif isinstance(module, DecoderLayer) and isinstance(module.mlp, MLP):
                    module.mlp.use_cpu_kernel()
            self.use_cpu_layers()
            if self.mtp is not None:
                self.mtp.use_cpu_layer()
        return self

    def use_cpu_layers(self) -> None:
        """Run decode-only batches through all the layers as one `DecodeLayers` call when
        every block of every layer runs in C (after `place`'s `use_cpu_*` calls)."""
        self.cpu_layers = None
        layers = []
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            blocks = layer.cpu_blocks()
            if blocks is None:
                return
            layers.append(blocks)
        self.cpu_layers = cpu_blocks.DecodeLayers(layers)
        self._cpu_layers_key = self._expert_pointers()

    def _expert_pointers(self) -> tuple[int, ...]:
        if self._experts is None:  # found once: a step must not walk every module
            self._experts = [m for m in self.modules() if isinstance(m, RoutedExperts)]
        return tuple(p.data_ptr() for m in self._experts for p in (m.w13, m.w2))

    def _decode_layers(
        self, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> cpu_blocks.DecodeLayers | None:
        """`cpu_layers` where this batch can take it: decode only, a float32 cache, expert
        load counted over every row; rebuilt when the expert weights were replaced."""
        if self.cpu_layers is None or meta.prefills or kv_cache.dtype != torch.float32:
            return None
        if self._load is not None and self._load.valid_rows is not None:
            return None  # a padded static batch: the per-op path counts only its real rows
        if self._expert_pointers() != self._cpu_layers_key:
            self.use_cpu_layers()
            if self.mtp is not None:
                self.mtp.use_cpu_layer()
        return self.cpu_layers

    def record_expert_load(self, load: ExpertLoad | None) -> None:
        """Count routed tokens per (layer, logical expert) into `load` (None: stop)."""
        self._load = load
        if self.ep is not None:
            self.ep.load = load
        for module in self.model.modules():  # (not the MTP module's: no layer of the count)
            if isinstance(module, MoE):
                module.load = load

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [num_layers, num_slots, kv_lora + rope]
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits `[S, vocab]` (float32) for the rows `meta.logits_indices`. `after_layer(i)`
        is called once layer `i` has written its KV of the batch (on CUDA: once that work is
        queued on the current stream)."""
        x = self.model.embed_tokens(input_ids)
        layers = self._decode_layers(meta, kv_cache)
        if layers is not None:
            load = None if self._load is None else self._load.counts
            main_kv = kv_cache[: len(self.model.layers)]  # (without the MTP module's layer)
            x = layers(
                x, meta.positions, meta.out_slots, main_kv, meta.block_table, meta.seq_lens,
                meta.page_size, load,
            )  # fmt: skip
            if after_layer is not None:  # (decode rows only: written all at once)
                for i in range(len(self.model.layers)):
                    after_layer(i)
            return self._logits(x, meta)
        cos_sin = self.rope.lookup(meta.positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, meta, self.rope, cos_sin, kv_cache[i])
            if after_layer is not None:
                after_layer(i)
        return self._logits(x, meta)

    def forward_two(
        self,
        batches: tuple[
            tuple[torch.Tensor, AttentionMetadata], tuple[torch.Tensor, AttentionMetadata]
        ],
        kv_cache: torch.Tensor,
        after_layer: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-batch overlap: the logits of two micro-batches `(input_ids, meta)`, computed
        together so that one's expert all-to-all is in flight while the other computes:

            attention A → dispatch A → attention B → dispatch B →
            experts A → combine A → experts B → combine B → (A, B) += MoE outputs

        Layers without expert parallelism run the micro-batches one after the other.
        `after_layer(i)`: as in `forward`, once layer `i` is done for both."""
        (ids_a, meta_a), (ids_b, meta_b) = batches
        xa, xb = self.model.embed_tokens(ids_a), self.model.embed_tokens(ids_b)
        cs_a, cs_b = self.rope.lookup(meta_a.positions), self.rope.lookup(meta_b.positions)
        for i, layer in enumerate(self.model.layers):
            assert isinstance(layer, DecoderLayer)
            if not isinstance(layer.mlp, EPMoE):
                xa = layer(xa, meta_a, self.rope, cs_a, kv_cache[i])
                xb = layer(xb, meta_b, self.rope, cs_b, kv_cache[i])
            else:
                moe, norm = layer.mlp, layer.post_attention_layernorm
                xa = layer.attention(xa, meta_a, self.rope, cs_a, kv_cache[i])
                stage_a = moe.dispatch(norm(xa))
                xb = layer.attention(xb, meta_b, self.rope, cs_b, kv_cache[i])
                stage_b = moe.dispatch(norm(xb))
                stage_a = moe.run_experts(stage_a)
                stage_b = moe.run_experts(stage_b)
                xa = xa + moe.finish(stage_a)
                xb = xb + moe.finish(stage_b)
            if after_layer is not None:
                after_layer(i)
        return self._logits(xa, meta_a), self._logits(xb, meta_b)

    def _logits(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.score_rows is not None:
            meta.scores = self._score(x, meta)
        if self.mtp is not None:  # every row's final hidden state: what the MTP module reads
            meta.hidden = self.model.norm(x)
            x = meta.hidden[meta.logits_indices]
        else:  # DP LM head: each rank computes the logits of its own requests' last tokens only
            x = self.model.norm(x[meta.logits_indices])
        return F.linear(x, self.lm_head).float()

    def draft(
        self,
        next_ids: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, hidden]
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP module over `meta`'s rows, `next_ids` being each row's next token and
        `hidden` its final hidden state (after a forward over the batch: `meta.hidden`; after
        the module: its own): logits `[S, vocab]` of the token after next and the module's
        hidden states at `meta.logits_indices`. Writes the module's KV (the cache's last
        layer) at the rows' slots."""
        assert self.mtp is not None, "a model built with its MTP module"
        return self.mtp(
            next_ids, hidden, meta, self.model.embed_tokens, self.lm_head, self.rope,
            kv_cache[self.mtp.layer_idx : self.mtp.layer_idx + 1],
        )  # fmt: skip

    def _score(self, x: torch.Tensor, meta: AttentionMetadata) -> PromptScores:
        """Prompt scoring: the log-probability of each `score_targets` token after its row,
        and the top `score_top`; the LM head runs over `SCORE_CHUNK` rows at a time, so that
        a long prompt never holds all its logits at once."""
        assert meta.score_rows is not None and meta.score_targets is not None
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, meta.score_rows.shape[0], SCORE_CHUNK):
            rows = meta.score_rows[start : start + SCORE_CHUNK]
            logits = F.linear(self.model.norm(x[rows]), self.lm_head).float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = meta.score_targets[start : start + SCORE_CHUNK, None]
            top = torch.topk(logp, meta.score_top, dim=-1)
            parts.append((logp.gather(1, targets)[:, 0], top.values, top.indices))
        return PromptScores(*(torch.cat(p) for p in zip(*parts, strict=True)))
