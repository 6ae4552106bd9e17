"""The CPU prefill attention (`workers.model.mla.causal_attention`) against a per-query loop."""

from __future__ import annotations

import math

import pytest
import torch

from workers.model.mla import causal_attention


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Each query on its own, in float64: query i of n sits at L - n + i and sees keys 0.. that."""
    num_q, ctx_len = q.shape[1], k.shape[1]
    out = torch.empty(q.shape[0], num_q, v.shape[-1], dtype=torch.float64)
    for i in range(num_q):
        visible = ctx_len - num_q + i + 1
        scores = q[:, i : i + 1].double() @ k[:, :visible].double().transpose(1, 2) * scale
        out[:, i] = (scores.softmax(-1) @ v[:, :visible].double())[:, 0]
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_q", "ctx_len"),
    # Past CAUSAL_BLOCK (64) queries go in blocks: a partial last block, a cached prefix.
    [(1, 1), (7, 7), (64, 64), (5, 23), (1, 40), (65, 65), (200, 200), (150, 330)],
)
def test_causal_attention_matches_per_query_reference(num_q, ctx_len, dtype):
    g = torch.Generator().manual_seed(num_q * 100 + ctx_len)
    heads, dim, v_dim = 3, 24, 16  # v narrower than q/k, as in MLA
    q = torch.randn(heads, num_q, dim, generator=g).to(dtype)
    k = torch.randn(heads, ctx_len, dim, generator=g).to(dtype)
    v = torch.randn(heads, ctx_len, v_dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(dim)
    out = causal_attention(q, k, v, scale)
    assert out.shape == (heads, num_q, v_dim) and out.dtype == dtype
    ref = _reference(q, k, v, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < tol
