"""Random-weight models built on the device (the benchmarks' V2-Lite-shaped models)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import _COMMON
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams
from workers.model.fp8 import dequantize_block_fp8, quantize_block_fp8
from workers.model.moe import RoutedExperts
from workers.model.random_init import PRESETS, preset_config, random_model

pytestmark = pytest.mark.timeout(120)

SMALL = {**_COMMON, "model_type": "deepseek_v2", "first_k_dense_replace": 1}


def test_presets_are_complete_configs() -> None:
    hf = preset_config("v2-lite", num_layers=3)
    assert hf["num_hidden_layers"] == 3 and PRESETS["v2-lite"]["num_hidden_layers"] == 27
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("v9")
    with pytest.raises(ValueError, match="num_layers"):
        preset_config("v2-lite", num_layers=0)


def test_quantize_block_fp8_round_trip() -> None:
    w = torch.randn(3, 40, 72) * torch.logspace(-2, 1, 72)  # blocks of very different ranges
    q, scale = quantize_block_fp8(w, (16, 32))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 3, 3)
    back = torch.stack([dequantize_block_fp8(q[e], scale[e], (16, 32)) for e in range(3)])
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each block's amax.
    err = (back - w).abs().view(3, 40, 72)
    assert float(err.max()) <= float(w.abs().max()) * 2**-4


@pytest.mark.parametrize("fp8", [False, True])
def test_random_model_generates(fp8: bool) -> None:
    model = random_model(SMALL, "cpu", torch.float32, fp8_experts=fp8)
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(m.is_fp8 is fp8 for m in experts)
    engine = Engine(
        "random", EngineConfig(page_size=4, kv_capacity_tokens=256, device="cpu"),
        progress=False, model=model,
    )  # fmt: skip
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add(GenerateRequest("r", [5, 6, 7, 8], greedy))
    out: list[int] = []
    while engine.has_work:
        for delta in engine.step():
            out += delta.token_ids
    assert len(out) == 4 and all(0 <= t < SMALL["vocab_size"] for t in out)
