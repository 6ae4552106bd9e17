"""FP8 expert GEMMs (DeepGEMM layouts): quantization, and both layouts against the plain
torch experts — with plain-torch stand-ins for the kernels on the CPU, and the real DeepGEMM
kernels where they import on a Hopper GPU."""

from __future__ import annotations

import pytest
import torch

from workers.ep.deep_gemm_experts import (
    DeepGemmExperts,
    deep_gemm_available,
    dequantize_rows,
    dequantize_weight_blocks,
    quantize_rows,
    quantize_weight_blocks,
    reference_kernels,
)
from workers.ep.dispatch import DispatchResult
from workers.ep.experts import run_local_experts

pytestmark = pytest.mark.timeout(60)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fp8_quantization_round_trips_within_fp8_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 200, 300, generator=g)  # edges not multiples of the 128 block
    q, scale = quantize_weight_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2, 3)
    assert _rel(dequantize_weight_blocks(q, scale), w) < 0.05
    x = torch.randn(7, 300, generator=g) * 10
    qx, sx = quantize_rows(x)
    assert sx.shape == (7, 3)
    assert _rel(dequantize_rows(qx, sx), x) < 0.05


def _weights(num_slots: int, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(num_slots, 2 * inter, hidden, generator=g) / hidden**0.5,
        torch.randn(num_slots, hidden, inter, generator=g) / inter**0.5,
    )


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_layouts_match_the_torch_experts(layout):
    num_slots, hidden, inter = 4, 256, 192
    w13, w2 = _weights(num_slots, hidden, inter)
    counts = torch.tensor([5, 0, 130, 3])
    g = torch.Generator().manual_seed(2)
    if layout == "contiguous":
        x = torch.randn(int(counts.sum()), hidden, generator=g)
    else:
        x = torch.randn(num_slots, 140, hidden, generator=g)
    result = DispatchResult(x, counts, layout, handle=None)
    ref = run_local_experts(result, w13, w2)
    ours = DeepGemmExperts(w13, w2, reference_kernels())(result)
    assert ours.shape == ref.shape
    if layout == "masked":  # padding rows are unspecified
        valid = torch.arange(x.shape[1])[None, :] < counts[:, None]
        ours, ref = ours[valid], ref[valid]
    assert _rel(ours, ref) < 0.08


@pytest.mark.gpu
@pytest.mark.skipif(not deep_gemm_available(), reason="needs deep_gemm and a Hopper GPU")
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_deep_gemm_kernels_match_the_reference_kernels(layout):
    num_slots, hidden, inter = 8, 2048, 1408
    w13, w2 = (w.cuda().bfloat16() for w in _weights(num_slots, hidden, inter))
    counts = torch.tensor([5, 0, 130, 3, 64, 1, 0, 300], device="cuda")
    if layout == "contiguous":
        x = torch.randn(int(counts.sum()), hidden, device="cuda", dtype=torch.bfloat16)
    else:
        x = torch.randn(num_slots, 320, hidden, device="cuda", dtype=torch.bfloat16)
    result = DispatchResult(x, counts, layout, handle=None)
    ours = DeepGemmExperts(w13, w2)(result)
    ref = DeepGemmExperts(w13, w2, reference_kernels(128))(result)
    if layout == "masked":
        valid = torch.arange(x.shape[1], device="cuda")[None, :] < counts[:, None]
        ours, ref = ours[valid], ref[valid]
    assert _rel(ours, ref) < 0.02
