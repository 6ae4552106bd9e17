"""CUDA path of the engine (marked `gpu`; skipped where there is no CUDA device)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.test_parity import _prompts, _rel_err, _run_engine
from workers.model.moe import RoutedExperts, Routing, grouped_gemm_backends

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_engine_matches_cpu_engine_fp32(tmp_path_factory):
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("gpu"))
    prompts = _prompts(256)
    _, cpu_tokens, cpu_logits = _run_engine(ckpt.path, prompts, device="cpu")
    _, gpu_tokens, gpu_logits = _run_engine(ckpt.path, prompts, device="cuda")
    assert gpu_tokens == cpu_tokens
    for rid, steps in cpu_logits.items():
        for ref, ours in zip(steps, gpu_logits[rid], strict=True):
            assert _rel_err(ours, ref) < 1e-3


def test_cuda_engine_bf16_close_to_fp32(tmp_path_factory):
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("gpu_bf16"))
    prompts = _prompts(256)
    _, _, ref = _run_engine(ckpt.path, prompts, device="cuda")
    _, _, bf16 = _run_engine(ckpt.path, prompts, device="cuda", dtype="bfloat16")
    for rid in ref:  # the prefill logits, before greedy paths may diverge
        assert _rel_err(bf16[rid][0], ref[rid][0]) < 5e-2


@pytest.mark.parametrize(
    "backend",
    grouped_gemm_backends(torch.device("cuda"), torch.bfloat16)
    if torch.cuda.is_available()
    else ["loop"],
)
def test_cuda_grouped_gemm_bf16(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    e, h, i, top_k, n = 16, 256, 128, 4, 200
    experts = RoutedExperts(e, h, i).cuda()
    experts.w13.data = (torch.randn(e, 2 * i, h, generator=g, device="cuda") * 0.05).bfloat16()
    experts.w2.data = (torch.randn(e, h, i, generator=g, device="cuda") * 0.05).bfloat16()
    x = torch.randn(n, h, generator=g, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(e, device="cuda")[:top_k] for _ in range(n)])
    routing = Routing(ids, torch.rand(n, top_k, device="cuda"))
    experts.backend = "loop"
    ref = experts(x.float().bfloat16(), routing).float()
    experts.backend = backend
    out = experts(x, routing).float()
    assert float((out - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("swap", [4.0, 0.0], ids=["swap", "recompute"])
def test_cuda_preemption_swaps_kv_through_pinned_host_memory(tmp_path_factory, swap):
    """A KV cache too small for the batch on CUDA: preempted requests' KV goes to pinned host
    memory and back (or is recomputed); the tokens are those of a roomy run."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("gpu_swap"))
    prompts = _prompts(256)
    _, roomy, _ = _run_engine(ckpt.path, prompts, device="cuda")
    engine, tight, _ = _run_engine(
        ckpt.path, prompts, device="cuda", page_size=2, chunked_prefill_size=7,
        kv_capacity_tokens=80, kv_swap_space=swap, cuda_graph_max_batch=0,
    )  # fmt: skip
    assert tight == roomy and engine.scheduler.num_preemptions > 0
    assert engine.stats().num_swapped_out == (engine.scheduler.num_preemptions if swap else 0)


def test_cuda_prefix_cache_host_tier_round_trip(tmp_path_factory):
    """Pages the CUDA KV cache lets go come back from the host tier bit for bit."""
    from workers.engine.kv_cache import KVCache

    cache = KVCache(3, 4, 4, 8, torch.bfloat16, torch.device("cuda"), True, host_pages=4)
    pages = cache.allocator
    tokens = list(range(50, 63))
    owned = pages.allocate(4)
    cache.data.normal_()
    want = cache.data[:, : 4 * 4].clone()
    pages.publish(tokens, owned, 0, b"", 13)
    pages.free(owned)
    pages.free(pages.allocate(4))  # all reclaimed: to the host tier
    cache.data.zero_()
    found = pages.match(tokens, 12)
    assert len(found.pages) == 3 and pages.num_host_hit_tokens == 12
    for i, page in enumerate(found.pages):
        got = cache.data[:, page * 4 : (page + 1) * 4]
        assert torch.equal(got, want[:, owned[i] * 4 : (owned[i] + 1) * 4])
