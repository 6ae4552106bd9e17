"""The MTP module in an expert-parallel pool (2 real processes, gloo): its MoE is one more
collective of every step, run by a rank with nothing to do as well. The tokens are the
single-rank engine's without guesses, and every guess the single-rank engine's with the
module (one a step, or two: the module's pass, then one more over its own guesses), in both
dispatch modes, with redundant experts and two-batch overlap."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.rank_processes import rank_processes
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams

PROMPT_LENS = (3, 9, 17, 40, 5)
NUM_NEW = 12
WORLD = 2
# (dispatch mode, redundant experts, two-batch overlap, tokens guessed a step)
CONFIGS = [("normal", 0, False, 1), ("low_latency", 4, True, 2)]
GREEDY = SamplingParams(max_new_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _config(**kw: Any) -> EngineConfig:
    base: dict[str, Any] = {"page_size": 4, "chunked_prefill_size": 24, "device": "cpu",
                            "kv_capacity_tokens": 4096}  # fmt: skip
    return EngineConfig(**{**base, **kw})


def _run(engine: Engine, group: Any = None) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Tokens by request, each request's guess after each step by its token count, and the
    steps taken (with `group`, a pool's: in lockstep, empty batches included)."""
    tokens: dict[str, list[int]] = {}
    guesses: dict[str, dict[int, int]] = {}
    num_steps = 0
    while group.any_has_work(engine.has_work) if group is not None else engine.has_work:
        deltas = engine.step(run_empty=group is not None)
        num_steps += 1
        for d in deltas:
            tokens.setdefault(d.rid, []).extend(d.token_ids)
        for rid, seq in engine.requests.items():
            if seq.mtp_draft:
                guesses.setdefault(rid, {})[seq.num_tokens] = list(seq.mtp_draft)
    return tokens, guesses, num_steps


def _single(model_dir: Path, mtp: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    engine = Engine(model_dir, _config(speculative_mtp=mtp), progress=False)
    for i, p in enumerate(_prompts()):
        engine.add(GenerateRequest(f"r{i}", p, GREEDY))
    return _run(engine)


def _rank_main(rank: int, store_path: str, model_dir: str, queue: Any) -> None:
    from workers.ep.group import PoolGroup
    from workers.ep.setup import build_ep_context
    from workers.model.config import ModelConfig

    try:
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
        group = PoolGroup(rank, WORLD, dist.group.WORLD, dist.group.WORLD)  # type: ignore[arg-type]
        for mode, redundant, tbo, num_guesses in CONFIGS:
            config = _config(
                deepep_mode=mode, num_redundant_experts=redundant, enable_two_batch_overlap=tbo,
                speculative_mtp=num_guesses,
            )  # fmt: skip
            ctx = build_ep_context(
                ModelConfig.from_dir(Path(model_dir)), config, "colocated", rank, WORLD, None
            )
            engine = Engine(model_dir, config, progress=False, ep=ctx)
            for i, p in enumerate(_prompts()):
                if i % WORLD == rank:
                    engine.add(GenerateRequest(f"r{i}", p, GREEDY))
            tokens, guesses, num_steps = _run(engine, group)
            assert engine.kv.allocator.num_free == engine.kv.num_pages
            drafted = engine.stats().num_spec_draft_tokens
            key = (mode, redundant, tbo, num_guesses)
            queue.put((rank, key, tokens, guesses, num_steps, drafted))
        queue.put((rank, None, None, None, None, None))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc(), None, None, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_an_expert_parallel_pool_guesses_with_the_mtp_module(tiny_model_dir, tmp_path):
    plain, _, _ = _single(tiny_model_dir, mtp=0)
    single_guesses = {k: _single(tiny_model_dir, mtp=k)[1] for k in {c[3] for c in CONFIGS}}
    tokens: dict[Any, dict[str, list[int]]] = {}
    guesses: dict[Any, dict[str, dict[int, int]]] = {}
    steps: dict[Any, set[int]] = {}
    drafted: dict[Any, int] = {}
    done = 0
    store = str(tmp_path / "store")
    with rank_processes(_rank_main, WORLD, store, str(tiny_model_dir)) as queue:
        while done < WORLD:
            rank, key, out, got, num_steps, num_drafted = queue.get(timeout=500)
            if key == "error":
                pytest.fail(f"rank {rank} failed:\n{out}")
            if key is None:
                done += 1
                continue
            tokens.setdefault(key, {}).update(out)
            guesses.setdefault(key, {}).update(got)
            steps.setdefault(key, set()).add(num_steps)
            drafted[key] = drafted.get(key, 0) + num_drafted
    assert set(tokens) == set(CONFIGS)
    for key in CONFIGS:
        assert tokens[key] == plain, key
        assert len(steps[key]) == 1, f"{key}: the ranks did not step in lockstep"
        assert drafted[key] > 0, key
        single = single_guesses[key[3]]
        assert set(guesses[key]) == set(single)
        for rid, by_len in guesses[key].items():
            # (a step that keeps a guess skips a length; both engines keep the same ones)
            assert by_len == single[rid], (key, rid)
