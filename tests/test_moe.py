"""Routed experts: every grouped-GEMM backend against a per-token plain-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.model.moe import RoutedExperts, Routing, grouped_gemm_backends

pytestmark = pytest.mark.timeout(60)


def _reference(x, w13, w2, routing: Routing) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.topk_ids.shape[1]):
            e = int(routing.topk_ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += routing.topk_weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("backend", grouped_gemm_backends())
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_grouped_gemm_backends_match_reference(backend, num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    num_experts, hidden, inter, top_k = 8, 48, 40, 3
    experts = RoutedExperts(num_experts, hidden, inter)
    experts.w13.data = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.1
    experts.w2.data = torch.randn(num_experts, hidden, inter, generator=g) * 0.1
    experts.backend = backend
    x = torch.randn(num_tokens, hidden, generator=g)
    # Distinct experts per token, some experts left without tokens.
    ids = torch.stack([torch.randperm(num_experts - 2, generator=g)[:top_k] for _ in x])
    routing = Routing(ids, torch.rand(num_tokens, top_k, generator=g))
    ref = _reference(x, experts.w13, experts.w2, routing)
    torch.testing.assert_close(experts(x, routing), ref, rtol=1e-5, atol=1e-5)


def test_backends_list_always_has_the_portable_loop():
    assert grouped_gemm_backends()[-1] == "loop"
