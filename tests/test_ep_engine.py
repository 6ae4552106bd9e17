"""Expert-parallel pools of 1, 2 and 4 ranks (real processes, gloo): greedy tokens identical to
the single-rank engine and to `transformers`, prefill logits within tolerance, for both
dispatch modes, with and without redundant experts, with and without two-batch overlap, and
with speculative decoding (n-gram guesses read as extra decode rows) in two of those settings.

Every rank owns its own requests (DP attention: prompt `i` goes to rank `i % world_size`) and
the ranks step in lockstep, a rank without work running an empty batch."""

from __future__ import annotations

import itertools
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.checkpoints import make_checkpoint
from tests.rank_processes import rank_processes
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams

CHECKPOINTS = ("v3_fp8", "v2_group_limited")
PROMPT_LENS = (3, 9, 17, 40, 5, 26, 11)
NUM_NEW = 12
# (dispatch mode, redundant experts, two-batch overlap, tokens guessed a step)
CONFIGS = [
    *((*c, 0) for c in itertools.product(("normal", "low_latency"), (0, 4), (False, True))),
    ("normal", 0, False, 4),
    ("low_latency", 4, True, 4),
]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _engine_config(**kw: Any) -> EngineConfig:
    # A KV cache of what the prompts need, not 10% of RAM per engine: four rank processes,
    # each briefly holding two engines, would otherwise take most of a 24 GiB machine.
    base: dict[str, Any] = {"page_size": 4, "chunked_prefill_size": 24, "device": "cpu",
                            "kv_capacity_tokens": 4096}  # fmt: skip
    return EngineConfig(**{**base, **kw})


def _collect(engine: Engine, out: dict[str, Any], deltas: list[Any]) -> None:
    for d in deltas:
        tokens, first_logits = out.setdefault(d.rid, ([], None))
        if first_logits is None:
            first_logits = engine.last_logits[d.rid].clone()
        out[d.rid] = (tokens + d.token_ids, first_logits)


def _run_single(model_dir: Path) -> dict[str, Any]:
    engine = Engine(model_dir, _engine_config(), progress=False)
    sp = SamplingParams(max_new_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts()):
        engine.add(GenerateRequest(f"r{i}", p, sp))
    out: dict[str, Any] = {}
    while engine.has_work:
        _collect(engine, out, engine.step())
    return out


def _rank_main(rank: int, world: int, store_path: str, model_dirs: list[str], queue: Any) -> None:
    from workers.ep.group import PoolGroup
    from workers.ep.setup import build_ep_context
    from workers.model.config import ModelConfig

    try:
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        group = PoolGroup(rank, world, dist.group.WORLD, dist.group.WORLD)  # type: ignore[arg-type]
        sp = SamplingParams(max_new_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        for model_dir, (mode, redundant, tbo, guess) in itertools.product(model_dirs, CONFIGS):
            config = _engine_config(
                deepep_mode=mode, num_redundant_experts=redundant, enable_two_batch_overlap=tbo,
                speculative_ngram=guess, speculative_ngram_min=1,
            )  # fmt: skip
            ctx = build_ep_context(
                ModelConfig.from_dir(Path(model_dir)), config, "colocated", rank, world, None
            )
            engine = Engine(model_dir, config, progress=False, ep=ctx)
            for i, p in enumerate(_prompts()):
                if i % world == rank:
                    engine.add(GenerateRequest(f"r{i}", p, sp))
            out: dict[str, Any] = {}
            num_steps = 0
            while group.any_has_work(engine.has_work):
                _collect(engine, out, engine.step(run_empty=True))
                num_steps += 1
            assert engine.kv.allocator.num_free == engine.kv.num_pages
            # Plain lists: a tensor would cross as a file descriptor that the parent fetches
            # from this process, which may have exited by then.
            load = engine.take_expert_load().tolist()
            out = {rid: (tokens, logits.tolist()) for rid, (tokens, logits) in out.items()}
            key = (mode, redundant, tbo, guess)
            queue.put(
                (rank, model_dir, key, out, num_steps, load, engine.stats().num_spec_draft_tokens)
            )
        queue.put((rank, None, None, None, None, None, 0))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc(), None, None, None, 0))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any], dict[str, list[int]]]]:
    """Per checkpoint: its dir, the single-rank engine's output, and transformers' greedy."""
    transformers = pytest.importorskip("transformers")
    refs = {}
    for name in CHECKPOINTS:
        ckpt = make_checkpoint(name, tmp_path_factory.mktemp(name))
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.hf_path, dtype=torch.float32)
        hf_tokens = {}
        for i, p in enumerate(_prompts()):
            with torch.no_grad():
                hf_tokens[f"r{i}"] = hf.generate(
                    torch.tensor([p]), max_new_tokens=NUM_NEW, do_sample=False,
                    eos_token_id=None, pad_token_id=0,
                )[0, len(p) :].tolist()  # fmt: skip
        refs[name] = (ckpt.path, _run_single(ckpt.path), hf_tokens)
    return refs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_ep_pool_matches_single_rank_and_transformers(world, references, tmp_path):
    model_dirs = [str(references[name][0]) for name in CHECKPOINTS]
    store = str(tmp_path / "store")
    results: dict[tuple[str, tuple[Any, ...]], dict[str, Any]] = {}
    loads: dict[tuple[str, tuple[Any, ...]], torch.Tensor] = {}
    steps: dict[tuple[str, tuple[Any, ...]], set[int]] = {}
    num_guessed: dict[tuple[str, tuple[Any, ...]], int] = {}
    done = 0
    with rank_processes(_rank_main, world, world, store, model_dirs) as queue:
        while done < world:
            rank, model_dir, config, out, num_steps, load, guessed = queue.get(timeout=500)
            if model_dir == "error":
                pytest.fail(f"rank {rank} failed:\n{config}")
            if model_dir is None:
                done += 1
                continue
            key = (model_dir, config)
            results.setdefault(key, {}).update(out)
            steps.setdefault(key, set()).add(num_steps)
            loads[key] = loads.get(key, 0) + torch.tensor(load)
            num_guessed[key] = num_guessed.get(key, 0) + guessed
    by_dir = {str(path): (name, single, hf) for name, (path, single, hf) in references.items()}
    assert len(results) == len(CHECKPOINTS) * len(CONFIGS)
    for (model_dir, config), out in results.items():
        name, single, hf = by_dir[model_dir]
        assert sorted(out) == sorted(single), (name, config)
        assert len(steps[(model_dir, config)]) == 1, "ranks did not step in lockstep"
        for rid, (tokens, first_logits) in out.items():
            assert tokens == single[rid][0], (name, config, rid, "differs from one rank")
            assert tokens == hf[rid], (name, config, rid, "differs from transformers")
            ref = single[rid][1]
            err = float((torch.tensor(first_logits) - ref).abs().max() / ref.abs().max())
            assert err < 1e-4, (name, config, rid, err)
        # The recorded load counts every routed (token, k) pair of every MoE layer once.
        load = loads[(model_dir, config)]
        num_tokens = sum(len(p) + NUM_NEW - 1 for p in _prompts())
        moe_layers = load.sum(dim=1) > 0
        assert bool(moe_layers.any())
        top_k = 2
        if config[3]:  # guessing: rows whose guesses missed were routed too
            assert num_guessed[(model_dir, config)] > 0, "no guess was read: nothing checked"
            assert min(load.sum(dim=1)[moe_layers].tolist()) >= num_tokens * top_k
            continue
        assert set(load.sum(dim=1)[moe_layers].tolist()) == {num_tokens * top_k}
