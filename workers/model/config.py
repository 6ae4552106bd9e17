"""`ModelConfig`: the one place a Hugging Face `config.json` becomes our model description."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def softmax_mscale(self) -> float:
        """Extra factor on the softmax scale (DeepSeek YaRN: mscale(factor, mscale_all_dim)²)."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        m = yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class QuantConfig:
    method: str  # only "fp8" for now
    weight_block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    # MoE
    n_routed_experts: int | None = None
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # v3: noaux_tc; v2: greedy | group_limited_greedy
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; pdserve serves "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"n_routed_experts ({self.n_routed_experts}) must divide by n_group "
                    f"({self.n_group})"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in [1, n_group], got {self.topk_group}")
            if self.scoring_func not in ("sigmoid", "softmax"):
                raise ValueError(f"scoring_func {self.scoring_func!r} is not supported")
            if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
                raise ValueError(f"topk_method {self.topk_method!r} is not supported")
            experts_per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and self.n_group > 1 and experts_per_group < 2:
                raise ValueError("noaux_tc group scores need at least 2 experts per group")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached token per layer: the latent c_kv plus the rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: --model must be a Hugging Face checkpoint dir"
            )
        with open(path) as f:
            return cls.from_hf(json.load(f))

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; pdserve serves "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        is_v2 = model_type == "deepseek_v2"
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        quant = None
        qc = hf.get("quantization_config")
        if qc:
            if qc.get("quant_method") != "fp8":
                raise ValueError(
                    f"quantization method {qc.get('quant_method')!r} is not supported (only fp8)"
                )
            block = qc.get("weight_block_size") or [128, 128]
            quant = QuantConfig(method="fp8", weight_block_size=(int(block[0]), int(block[1])))
        n_routed = hf.get("n_routed_experts")
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            kv_lora_rank=hf["kv_lora_rank"],
            q_lora_rank=hf.get("q_lora_rank"),
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            rope=_rope_from_hf(hf),
            # V2 checkpoints rotate interleaved pairs (complex multiplication); so does V3 by default.
            rope_interleave=True if is_v2 else bool(hf.get("rope_interleave", True)),
            n_routed_experts=n_routed,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 1,
            moe_intermediate_size=hf.get("moe_intermediate_size") or 0,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            moe_layer_freq=hf.get("moe_layer_freq", 1),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            topk_method=hf.get("topk_method") or ("greedy" if is_v2 else "noaux_tc"),
            scoring_func=hf.get("scoring_func") or ("softmax" if is_v2 else "sigmoid"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", not is_v2)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quant=quant,
        )


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # Original DeepSeek configs say `rope_theta` + `rope_scaling`; transformers 5 writes
    # `rope_parameters` holding both.
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    max_pos = hf.get("max_position_embeddings", 4096)
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / orig
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )
