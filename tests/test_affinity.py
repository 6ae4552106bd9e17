"""Prefix affinity on a running server (`orchestrator.ranks.preferred_rank`): prompts that
begin alike go to the prefill rank and the decode rank their beginning prefers — not the
first ranks, which an idle server's picks would give them — so the second finds the beginning
in both ranks' prefix caches: computed once, its KV sent once."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from orchestrator.ranks import AFFINITY_TOKENS, preferred_rank, prefix_key, rank_seed

pytestmark = pytest.mark.timeout(240)


def _preferred(infos: list[Any], role: str, ids: list[int]) -> int | None:
    key = prefix_key(ids)
    assert key is not None
    seeds = {i: rank_seed(info) for i, info in enumerate(infos) if info.role == role}
    return preferred_rank(key, seeds)


def test_prompts_that_begin_alike_go_to_the_ranks_their_beginning_prefers(launch_tiny):
    server = launch_tiny(prefill_instances=2, decode_instances=2)
    try:
        infos = server.router.infos
        first = {role: min(i for i, info in enumerate(infos) if info.role == role)
                 for role in ("prefill", "decode")}  # fmt: skip
        rng = random.Random(11)
        for _ in range(200):  # a beginning that prefers neither first rank
            system = [rng.randrange(3, 1000) for _ in range(AFFINITY_TOKENS + 16)]
            want = {role: _preferred(infos, role, system + [5]) for role in first}
            if all(want[role] != first[role] for role in first):
                break
        else:
            raise AssertionError("no beginning preferred the other ranks")
        params = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        outs = [
            httpx.post(f"{server.url}/generate", timeout=60,
                       json={"input_ids": system + [tail], "sampling_params": params}).json()
            for tail in (5, 6)
        ]  # fmt: skip
        assert outs[1]["meta_info"]["cached_tokens"] >= AFFINITY_TOKENS, outs
        stats = {r["rank"]: r["stats"] for r in httpx.get(f"{server.url}/v1/stats").json()["ranks"]}
        for i, info in enumerate(infos):
            if info.role == "prefill":  # computed both prompts, the second from its cache
                hit = stats[i]["num_prefix_hit_tokens"]
                assert (hit >= AFFINITY_TOKENS) == (i == want["prefill"]), (i, stats)
            else:  # decoded both, the beginning's KV sent once
                made = stats[i]["num_generated_tokens"]
                assert (made > 0) == (i == want["decode"]), (i, stats)
                skipped = stats[i]["num_transfer_skipped_tokens"]
                assert (skipped >= AFFINITY_TOKENS) == (i == want["decode"]), (i, stats)
    finally:
        server.stop()
