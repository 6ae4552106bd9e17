"""Models with random weights built straight on the device: benchmarks at real shapes without
a checkpoint (a 15.7 B-parameter V2-Lite would take minutes to write and read back).

Each preset is a Hugging Face `config.json` dict, so `transformers` builds the same
architecture for comparison (`transformers.DeepseekV2Config(**preset)`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers.ep.moe import EPContext
from workers.kernels import kernels_usable
from workers.model.config import ModelConfig
from workers.model.fp8 import quantize_block_fp8
from workers.model.layers import RMSNorm
from workers.model.model import DeepseekForCausalLM
from workers.model.moe import RoutedExperts

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V2-Lite's shapes (15.7 B parameters); plain RoPE, so that every transformers
    # version builds it alike.
    "v2-lite": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "max_position_embeddings": 16384,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
}


def preset_config(name: str, num_layers: int | None = None) -> dict[str, Any]:
    """A copy of preset `name`'s HF config, with `num_layers` layers if given."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    hf = dict(PRESETS[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        hf["num_hidden_layers"] = num_layers
    return hf


@torch.no_grad()
def random_model(
    hf_config: dict[str, Any],
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    max_positions: int | None = None,
    fp8_experts: bool = False,
    ep: EPContext | None = None,
) -> DeepseekForCausalLM:
    """`DeepseekForCausalLM` of `hf_config` with weights ~ N(0, initializer_range) (norms 1,
    biases 0), made tensor by tensor on `device` in `dtype`: peak memory is the model's size.
    Router weights stay float32, as `place` keeps them. `fp8_experts`: routed experts held in
    FP8 with 128x128 block scales, as an FP8 checkpoint's are when kept (see `loader`). `ep`:
    a rank of an expert-parallel pool (its own expert slots only)."""
    device = torch.device(device)
    if fp8_experts and not kernels_usable(device):
        raise ValueError(
            "FP8 experts run in the Triton fused MoE kernel: they need a CUDA device "
            "with triton (or TRITON_INTERPRET=1)"
        )
    cfg = ModelConfig.from_hf(hf_config)
    std = float(hf_config.get("initializer_range", 0.02))
    # Parameters start as untouched float32 host tensors (virtual memory only), each replaced
    # by its device tensor before the next is made.
    model = DeepseekForCausalLM(cfg, max_positions, ep)
    gen = torch.Generator(device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{module_name}.{name}"
            keep_fp32 = full.endswith("mlp.gate.weight") or name == "e_score_correction_bias"
            tensor = torch.empty(
                param.shape, dtype=torch.float32 if keep_fp32 else dtype, device=device
            )
            if isinstance(module, RMSNorm):
                tensor.fill_(1.0)
            elif name in ("bias", "e_score_correction_bias"):
                tensor.zero_()
            else:
                tensor.normal_(0.0, std, generator=gen)
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        if fp8_experts and isinstance(module, RoutedExperts):
            w13, w2 = module.w13.data, module.w2.data
            module.hold_fp8((128, 128))
            module.w13.data, module.w13_scale = quantize_block_fp8(w13, (128, 128))
            module.w2.data, module.w2_scale = quantize_block_fp8(w2, (128, 128))
    return model.place(device, dtype)
