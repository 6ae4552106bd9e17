"""Decode steps through `DecodeGraphs`' static buffers (padded buckets, staging, scratch KV)
against the plain eager engine: eagerly on CPU, captured and replayed on CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.test_parity import _prompts, _rel_err
from workers.engine.config import EngineConfig
from workers.engine.cuda_graph import DecodeGraphs, batch_buckets
from workers.engine.engine import Engine
from workers.engine.kv_cache import pages_needed
from workers.engine.messages import GenerateRequest, SamplingParams

pytestmark = pytest.mark.timeout(300)

NUM_NEW = 6


def _run(engine: Engine, prompts: list[list[int]]):
    for i, p in enumerate(prompts):
        # Different lengths: the batch shrinks as requests finish, crossing buckets.
        greedy = SamplingParams(max_new_tokens=NUM_NEW + i, temperature=0.0, ignore_eos=True)
        engine.add(GenerateRequest(f"r{i}", p, greedy))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    logits: dict[str, list[torch.Tensor]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work:
        for d in engine.step():
            tokens[d.rid] += d.token_ids
            logits[d.rid].append(engine.last_logits[d.rid].cpu().clone())
    assert engine.kv.allocator.num_free == engine.kv.num_pages
    return tokens, logits


def _engine(path, device: str, graph_max_batch: int, **kwargs) -> Engine:
    config = EngineConfig(
        page_size=4, chunked_prefill_size=24, kv_capacity_tokens=512, device=device,
        cuda_graph_max_batch=graph_max_batch, **kwargs,
    )  # fmt: skip
    return Engine(path, config, progress=False)


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    sizes = batch_buckets(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256
    for small, big in zip(sizes, sizes[1:], strict=False):
        assert big <= max(2 * small, small + 32)  # bounded padding waste


@pytest.mark.parametrize("max_batch", [8, 3])
def test_static_buffer_decode_matches_eager_on_cpu(tmp_path_factory, max_batch: int) -> None:
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("graphs"))
    prompts = _prompts(256)
    eager = _engine(ckpt.path, "cpu", 0)
    ref_tokens, ref_logits = _run(eager, prompts)

    engine = _engine(ckpt.path, "cpu", 0)
    graphs = DecodeGraphs(
        engine.model, engine.kv, max_batch,
        pages_needed(engine.max_context_len, engine.kv.page_size), engine.expert_load,
        capture=False,
    )  # fmt: skip
    engine.graphs = graphs
    runs = []
    real_run = graphs.run
    graphs.run = lambda *a: runs.append(len(a[0])) or real_run(*a)  # type: ignore[method-assign]
    tokens, logits = _run(engine, prompts)

    assert runs, "no decode step went through the static buffers"
    assert max(runs) <= max_batch
    assert tokens == ref_tokens
    for rid, steps in ref_logits.items():
        for ref, ours in zip(steps, logits[rid], strict=True):
            assert _rel_err(ours, ref) < 1e-5
    # Padding rows counted no expert load and wrote no request's KV.
    assert torch.equal(engine.take_expert_load(), eager.take_expert_load())
    scratch = engine.kv.scratch_slot
    torch.testing.assert_close(engine.kv.data[:, :scratch], eager.kv.data[:, :scratch])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_match_eager_on_cuda(tmp_path_factory) -> None:
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("graphs_cuda"))
    prompts = _prompts(256)
    ref_tokens, ref_logits = _run(_engine(ckpt.path, "cuda", 0), prompts)
    engine = _engine(ckpt.path, "cuda", 8)
    assert engine.graphs is not None and set(engine.graphs.graphs) == {1, 2, 4, 8}
    tokens, logits = _run(engine, prompts)
    assert tokens == ref_tokens
    for rid, steps in ref_logits.items():
        for ref, ours in zip(steps, logits[rid], strict=True):
            assert _rel_err(ours, ref) < 1e-4
