"""`ModelConfig`: the one place a Hugging Face `config.json` becomes our model description."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
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
    # Multi-token-prediction modules after the main layers (DeepSeek-V3: 1, checkpoint layer
    # `num_hidden_layers`), loaded only for speculative decoding (`workers.model.mtp`).
    num_nextn_predict_layers: int = 0

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

    def mtp_missing(self, tensor_names: Iterable[str]) -> str | None:
        """Why a checkpoint with this config and these tensors has no multi-token-prediction
        module to serve (None: it has one)."""
        if self.num_nextn_predict_layers < 1:
            return "num_nextn_predict_layers is 0 in its config.json"
        prefix = f"model.layers.{self.num_hidden_layers}."
        if not any(name.startswith(prefix) for name in tensor_names):
            return (
                f"its config.json says num_nextn_predict_layers {self.num_nextn_predict_layers}"
                f", but no tensor {prefix}* is in its checkpoint"
            )
        return None

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """The model of checkpoint dir `model_dir`; a `config.json` that is not a JSON object
        describing a supported model is a ValueError naming the file and the key."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: --model must be a Hugging Face checkpoint dir"
            )
        return cls.from_hf(read_json(path), source=str(path))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """The model `hf` (a parsed `config.json`) describes; a key of the wrong type or range,
        or a model pdserve does not serve, is a ValueError beginning with `source`."""
        try:
            return cls._from_hf(hf)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        if not isinstance(hf, dict):
            raise ValueError(f"expected a JSON object of keys, got {type(hf).__name__}")
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; pdserve serves "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in hf]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        is_v2 = model_type == "deepseek_v2"
        eos = _given(hf, "eos_token_id", [])
        eos_ids = tuple(
            _int(f"eos_token_id[{i}]", e, minimum=0)
            for i, e in enumerate(eos if isinstance(eos, list) else [eos])
        )
        bos = hf.get("bos_token_id")
        n_routed = _int("n_routed_experts", _given(hf, "n_routed_experts", 0), minimum=0) or None
        num_experts_per_tok = _int("num_experts_per_tok", _given(hf, "num_experts_per_tok", 1))
        if n_routed and num_experts_per_tok > n_routed:
            raise ValueError(
                f"num_experts_per_tok ({num_experts_per_tok}) must be <= n_routed_experts "
                f"({n_routed})"
            )
        q_lora_rank = hf.get("q_lora_rank")
        return cls(
            model_type=model_type,
            vocab_size=_int("vocab_size", hf["vocab_size"]),
            hidden_size=_int("hidden_size", hf["hidden_size"]),
            intermediate_size=_int("intermediate_size", hf["intermediate_size"]),
            num_hidden_layers=_int("num_hidden_layers", hf["num_hidden_layers"]),
            num_attention_heads=_int("num_attention_heads", hf["num_attention_heads"]),
            kv_lora_rank=_int("kv_lora_rank", hf["kv_lora_rank"]),
            q_lora_rank=None if q_lora_rank is None else _int("q_lora_rank", q_lora_rank),
            qk_nope_head_dim=_int("qk_nope_head_dim", hf["qk_nope_head_dim"]),
            qk_rope_head_dim=_int("qk_rope_head_dim", hf["qk_rope_head_dim"]),
            v_head_dim=_int("v_head_dim", hf["v_head_dim"]),
            max_position_embeddings=_max_positions(hf),
            rms_norm_eps=_number("rms_norm_eps", _given(hf, "rms_norm_eps", 1e-6)),
            hidden_act=hf.get("hidden_act", "silu"),
            attention_bias=_bool("attention_bias", _given(hf, "attention_bias", False)),
            mlp_bias=_bool("mlp_bias", _given(hf, "mlp_bias", False)),
            rope=_rope_from_hf(hf),
            # V2 checkpoints rotate interleaved pairs (complex multiplication); so does V3 by default.
            rope_interleave=is_v2 or _bool("rope_interleave", _given(hf, "rope_interleave", True)),
            n_routed_experts=n_routed,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=_int(
                "moe_intermediate_size",
                _given(hf, "moe_intermediate_size", 0),
                minimum=1 if n_routed else 0,
            ),
            n_shared_experts=_int("n_shared_experts", _given(hf, "n_shared_experts", 0), minimum=0),
            first_k_dense_replace=_int(
                "first_k_dense_replace", _given(hf, "first_k_dense_replace", 0), minimum=0
            ),
            moe_layer_freq=_int("moe_layer_freq", _given(hf, "moe_layer_freq", 1)),
            n_group=_int("n_group", _given(hf, "n_group", 1)),
            topk_group=_int("topk_group", _given(hf, "topk_group", 1)),
            topk_method=hf.get("topk_method") or ("greedy" if is_v2 else "noaux_tc"),
            scoring_func=hf.get("scoring_func") or ("softmax" if is_v2 else "sigmoid"),
            norm_topk_prob=_bool("norm_topk_prob", _given(hf, "norm_topk_prob", not is_v2)),
            routed_scaling_factor=_number(
                "routed_scaling_factor", _given(hf, "routed_scaling_factor", 1.0)
            ),
            tie_word_embeddings=_bool(
                "tie_word_embeddings", _given(hf, "tie_word_embeddings", False)
            ),
            bos_token_id=None if bos is None else _int("bos_token_id", bos, minimum=0),
            eos_token_ids=eos_ids,
            quant=_quant_from_hf(hf),
            num_nextn_predict_layers=_int(
                "num_nextn_predict_layers", _given(hf, "num_nextn_predict_layers", 0), minimum=0
            ),
        )


def _quant_from_hf(hf: dict[str, Any]) -> QuantConfig | None:
    qc = hf.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {qc!r}")
    if qc.get("quant_method") != "fp8":
        raise ValueError(
            f"quantization method {qc.get('quant_method')!r} is not supported (only fp8)"
        )
    block = _given(qc, "weight_block_size", [128, 128])
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(
            f"quantization_config.weight_block_size must be a pair of positive integers "
            f"[rows, columns], got {block!r}"
        )
    return QuantConfig(method="fp8", weight_block_size=(block[0], block[1]))


def _max_positions(hf: dict[str, Any]) -> int:
    return _int("max_position_embeddings", _given(hf, "max_position_embeddings", 4096))


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # Original DeepSeek configs say `rope_theta` + `rope_scaling`; transformers 5 writes
    # `rope_parameters` holding both.
    params: dict[str, Any] = {}
    where: dict[str, str] = {}  # key of params -> the section that gave it, for messages
    for section in ("rope_scaling", "rope_parameters"):
        given = _given(hf, section, {})
        if not isinstance(given, dict):
            raise ValueError(f"{section} must be a JSON object or null, got {given!r}")
        params.update(given)
        where.update(dict.fromkeys(given, section))

    def name(key: str) -> str:
        return f"{where[key]}.{key}" if key in where else key

    def number(key: str, default: float) -> float:
        return _number(name(key), _given(params, key, default))

    def optional_number(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else _number(name(key), value, zero_ok=True)

    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = number("rope_theta", _given(hf, "rope_theta", 10000.0))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    max_pos = _max_positions(hf)
    key = "original_max_position_embeddings"
    orig = _int(name(key), _given(params, key, max_pos))
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=number("factor", max_pos / orig),
        original_max_position_embeddings=orig,
        beta_fast=number("beta_fast", 32.0),
        beta_slow=number("beta_slow", 1.0),
        mscale=optional_number("mscale"),
        mscale_all_dim=optional_number("mscale_all_dim"),
        attention_factor=optional_number("attention_factor"),
        truncate=_bool(name("truncate"), _given(params, "truncate", True)),
    )


def read_json(path: Path) -> Any:
    """A JSON file's value; ValueError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ---- config.json values, checked (the messages name the key) ------------------------------------


def _given(hf: dict[str, Any], key: str, default: Any) -> Any:
    """`hf[key]`, or `default` where the key is absent or null."""
    value = hf.get(key)
    return default if value is None else value


def _int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def _number(name: str, value: Any, zero_ok: bool = False) -> float:
    """A finite number > 0 (>= 0 with `zero_ok`); JSON's NaN and Infinity are refused."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and (value > 0 or (zero_ok and value == 0))):
        what = "a finite number >= 0" if zero_ok else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value
