"""A step's token budget (`engine.step_token_budget`): `--chunked-prefill-size`, within what an
expert-parallel dispatcher takes per call — DeepEP's low-latency buffers hold
`--low-latency-capacity` tokens per rank and call, and a call over it would fail on one rank
while its peers wait inside the kernel. The scheduler keeps every row of a step within the
budget: decodes, their guesses and prompt chunks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine, step_token_budget
from workers.engine.messages import GenerateRequest, SamplingParams

pytestmark = pytest.mark.timeout(120)


def _ep(limit: int | None) -> Any:
    return SimpleNamespace(dispatcher=SimpleNamespace(max_tokens_per_call=limit))


def test_the_budget_is_the_chunk_size_within_the_dispatchers_limit():
    config = EngineConfig(chunked_prefill_size=2048, device="cpu")
    assert step_token_budget(config, None) == 2048
    assert step_token_budget(config, _ep(None)) == 2048  # torch: overflow goes in rounds
    assert step_token_budget(config, _ep(128)) == 128  # DeepEP low-latency
    assert step_token_budget(config, _ep(4096)) == 2048


def test_every_row_of_a_step_is_within_the_budget_guesses_and_chunks_too(tiny_model_dir):
    """A rank limited to 8 rows a step, with n-gram guesses and prompts longer than that:
    no step computes more (what a DeepEP low-latency call then carries), and the tokens are
    those of an engine without the limit."""
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    # Repeating prompts: the n-gram lookup guesses, so decodes carry extra rows.
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 7, [12, 13] * 6]

    def run(budget: int | None) -> tuple[dict[str, list[int]], list[int], int]:
        config = EngineConfig(page_size=4, kv_capacity_tokens=1024, device="cpu",
                              speculative_ngram=4, chunked_prefill_size=64)  # fmt: skip
        engine = Engine(tiny_model_dir, config, progress=False)
        if budget is not None:
            engine.scheduler.token_budget = step_token_budget(config, _ep(budget))
        rows: list[int] = []
        guessed = 0
        schedule = engine.scheduler.schedule

        def counted() -> Any:
            nonlocal guessed
            batch = schedule()
            guesses = sum(len(seq.draft) for seq in batch.decodes)
            rows.append(batch.num_tokens + guesses)
            guessed += guesses
            return batch

        engine.scheduler.schedule = counted  # type: ignore[method-assign]
        for i, prompt in enumerate(prompts):
            engine.add(GenerateRequest(f"r{i}", prompt, sampling))
        out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        while engine.has_work:
            for d in engine.step():
                out[d.rid] += d.token_ids
        return out, rows, guessed

    limited, rows, guessed = run(8)
    unlimited, free_rows, _ = run(None)
    assert max(rows) <= 8 < max(free_rows), (rows, free_rows)
    assert guessed > 0  # guesses rode along within the budget
    assert limited == unlimited


def test_decode_rows_over_the_budget_take_turns(tiny_model_dir):
    """Eight requests decode on a rank whose steps take four rows: each gets a token at least
    every other step, and the tokens are those of an engine without the limit. (Found by an
    audit: the first four took every step until they ended; the others got nothing.)"""
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5 + i, 9, 3] for i in range(8)]

    def run(budget: int | None) -> tuple[dict[str, list[int]], int]:
        config = EngineConfig(page_size=4, kv_capacity_tokens=1024, device="cpu",
                              chunked_prefill_size=64)  # fmt: skip
        engine = Engine(tiny_model_dir, config, progress=False)
        for i, prompt in enumerate(prompts):
            engine.add(GenerateRequest(f"r{i}", prompt, sampling))
        out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        for d in engine.step():  # every prompt in one step
            out[d.rid] += d.token_ids
        if budget is not None:
            engine.scheduler.token_budget = step_token_budget(config, _ep(budget))
        waited = dict.fromkeys(out, 0)  # steps since each request's last token
        longest = 0
        while engine.has_work:
            got = set()
            for d in engine.step():
                out[d.rid] += d.token_ids
                got.add(d.rid)
            for rid in waited:
                waited[rid] = 0 if rid in got or len(out[rid]) == 12 else waited[rid] + 1
                longest = max(longest, waited[rid])
        return out, longest

    unlimited, _ = run(None)
    limited, longest = run(4)
    assert limited == unlimited
    assert longest <= 1, longest
