"""Random reference checkpoints made with `transformers`, for parity tests.

Each config turns on a different mix of DeepSeek features; `v3_fp8` is stored FP8
block-quantized, with a dequantized twin for `transformers` to load as the reference.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn

_YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
    "rope_theta": 10000.0,
}
_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "max_position_embeddings": 1024,
    "initializer_range": 0.1,  # well-separated logits: greedy ties are unlikely
    "bos_token_id": 0,
    "eos_token_id": 1,
}

PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    "v3_qlora_groups": {
        "model_type": "deepseek_v3",
        "q_lora_rank": 24,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 2,
        "rope_parameters": _YARN,
        "rope_interleave": True,
    },
    "v3_noqlora_nonorm": {
        "model_type": "deepseek_v3",
        "q_lora_rank": None,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.5,
        "first_k_dense_replace": 1,
        "rope_interleave": False,
    },
    "v2_greedy": {  # V2 in transformers always scores experts with softmax
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1,
        "n_shared_experts": 2,
    },
    "v2_group_limited": {
        "model_type": "deepseek_v2",
        "q_lora_rank": 24,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.0,
        "first_k_dense_replace": 2,
        "rope_parameters": _YARN,
    },
    "v3_fp8": {  # v3_qlora_groups with dims that do not divide the 128x128 FP8 block
        "model_type": "deepseek_v3",
        "hidden_size": 160,
        "intermediate_size": 200,
        "moe_intermediate_size": 72,
        "q_lora_rank": 24,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 2,
        "rope_parameters": _YARN,
        "rope_interleave": True,
    },
    "v3_fp8_b16": {  # FP8 with 16x16 blocks that divide every dim: kept in FP8 where possible
        "model_type": "deepseek_v3",
        "q_lora_rank": 32,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.0,
        "first_k_dense_replace": 1,
        "rope_parameters": _YARN,
    },
}

# The block shape of each checkpoint stored in FP8.
FP8_BLOCKS: dict[str, tuple[int, int]] = {"v3_fp8": (128, 128), "v3_fp8_b16": (16, 16)}

# Linear weights stored in FP8 in DeepSeek-V3 releases (not embeddings, norms, router, lm_head).
_FP8_SUFFIXES = (
    "q_proj.weight",
    "q_a_proj.weight",
    "q_b_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


@dataclass(frozen=True)
class RefCheckpoint:
    path: Path  # what pdserve loads
    hf_path: Path  # what transformers loads as the reference (== path unless quantized)
    name: str


def quantize_fp8_blockwise(
    w: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(float8_e4m3fn weight, float32 scale_inv [ceil(out/b0), ceil(in/b1)])`, scale per block
    = block amax / 448, so `w ≈ fp8.float() * scale_inv` broadcast over each block."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // block[0]), -(-in_dim // block[1])
    padded = torch.zeros(rows * block[0], cols * block[1])
    padded[:out_dim, :in_dim] = w.float()
    blocks = padded.view(rows, block[0], cols, block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block[0], cols * block[1])[:out_dim, :in_dim].contiguous(), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


def _build_hf(name: str, seed: int) -> Any:
    import transformers

    kwargs = {**_COMMON, **PARITY_CONFIGS[name]}
    model_type = kwargs.pop("model_type")
    config_cls: Any
    model_cls: Any
    if model_type == "deepseek_v3":
        config_cls, model_cls = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    else:
        config_cls, model_cls = transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for module_name, buf in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.2)
    return model


def make_checkpoint(name: str, root: Path, seed: int = 0) -> RefCheckpoint:
    """Write checkpoint `name` of PARITY_CONFIGS to `root/name` (and the FP8 twin to
    `root/name-hf`) unless already there, and describe it. Deterministic given `seed`."""
    root = Path(root)
    path = root / name
    if name not in FP8_BLOCKS:
        if not (path / "config.json").is_file():
            _build_hf(name, seed).save_pretrained(path)
        return RefCheckpoint(path, path, name)

    hf_path = root / f"{name}-hf"
    if (path / "config.json").is_file() and (hf_path / "config.json").is_file():
        return RefCheckpoint(path, hf_path, name)
    block = FP8_BLOCKS[name]
    # Round-trip through save_pretrained so that key names are exactly what transformers writes.
    with tempfile.TemporaryDirectory() as tmp:
        _build_hf(name, seed).save_pretrained(tmp)
        tensors = load_file(Path(tmp) / "model.safetensors")
        with open(Path(tmp) / "config.json") as f:
            config = json.load(f)
    quantized: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}
    for key, w in tensors.items():
        if key.endswith(_FP8_SUFFIXES) and w.dim() == 2:
            q, scale = quantize_fp8_blockwise(w, block)
            quantized[key], quantized[key + "_scale_inv"] = q, scale
            twin[key] = _dequantize(q, scale, block)
        else:
            quantized[key] = twin[key] = w

    hf_path.mkdir(parents=True, exist_ok=True)
    save_file(twin, hf_path / "model.safetensors", metadata={"format": "pt"})
    with open(hf_path / "config.json", "w") as f:
        json.dump(config, f, indent=2)

    path.mkdir(parents=True, exist_ok=True)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    keys = sorted(quantized)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map: dict[str, str] = {}
    for shard, shard_keys in shards.items():
        save_file({k: quantized[k] for k in shard_keys}, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, shard))
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    return RefCheckpoint(path, hf_path, name)


def agreeing_mtp_checkpoint(tiny_dir: Path, root: Path) -> Path:
    """A one-layer model, made from the built-in tiny checkpoint at `tiny_dir`, whose MTP
    module's guesses are its own next choices: where the MTP path's cost and gain show.

    Its layer's attention output is zeroed, so each choice depends on the current token
    only; its embedding rows have RMS 1, so the MTP module's `enorm` leaves them as they are;
    its `eh_proj` passes the embedding through (the hidden-state half is zero), and its
    decoder layer is a copy of the main one. For the row of token `i` the module thus
    computes exactly what the main model computes for token `i + 1`: the token after it."""
    path = Path(root) / "agreeing-mtp"
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True)
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=1)
    tiny = load_file(tiny_dir / "model.safetensors")
    moe_layer = "model.layers.1."  # the tiny model's first MoE layer
    layer = {k[len(moe_layer) :]: v for k, v in tiny.items() if k.startswith(moe_layer)}
    layer["self_attn.o_proj.weight"] = torch.zeros_like(layer["self_attn.o_proj.weight"])
    embed = tiny["model.embed_tokens.weight"]
    embed = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True))
    hidden = embed.shape[1]
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": tiny["lm_head.weight"]}
    weights["model.norm.weight"] = tiny["model.norm.weight"]
    for index in (0, 1):
        weights.update({f"model.layers.{index}.{k}": v.clone() for k, v in layer.items()})
    mtp = "model.layers.1."
    weights[mtp + "enorm.weight"] = torch.ones(hidden)
    weights[mtp + "hnorm.weight"] = torch.ones(hidden)
    weights[mtp + "eh_proj.weight"] = torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), 1)
    weights[mtp + "shared_head.norm.weight"] = torch.ones(hidden)
    weights[mtp + "embed_tokens.weight"] = embed.clone()
    weights[mtp + "shared_head.head.weight"] = tiny["lm_head.weight"].clone()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):  # fmt: skip
        (path / name).write_bytes((tiny_dir / name).read_bytes())
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
