"""Disaggregated serving end to end: a prefill rank and a decode rank (separate Ray actor
processes) linked by real NIXL agents, behind the router and HTTP front end. When all goes
well: the tokens match the colocated server's and transformers', pools of several instances
or expert-parallel ranks each get work, a stream interval sends fewer events with the same
tokens, and a crowd of mixed clients leaves no page or request behind. (A rank or a transfer
failing: `test_disagg_faults.py`.)"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import time
from typing import Any

import httpx
import pytest
import torch

from orchestrator.ranks import POOL_QUIET_S
from tests.checkpoints import make_checkpoint
from tests.disagg_calls import _generate, _greedy, _metric, _wait_all_pages_free

pytest.importorskip("workers.transfer")
pytestmark = pytest.mark.timeout(300)


async def _stream_all(url: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Every prompt at once, streaming; each request's final `output_ids`."""

    async def one(client: httpx.AsyncClient, p: list[int]) -> list[int]:
        body = {"input_ids": p, "sampling_params": _greedy(n), "stream": True}
        last: dict[str, Any] = {}
        async with client.stream("POST", f"{url}/generate", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    import json

                    last = json.loads(line[6:])
        assert "error" not in last, last
        return list(last["output_ids"])

    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(timeout=240, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, p) for p in prompts)))


async def _whole_all(
    url: str, prompts: list[list[int]], n: int, stop: list[str] | None = None
) -> list[list[int]]:
    """Every prompt at once as a plain (not streamed) call; each request's `output_ids`."""

    async def one(client: httpx.AsyncClient, p: list[int]) -> list[int]:
        sampling = {**_greedy(n), **({"stop": stop} if stop else {})}
        resp = await client.post(
            f"{url}/generate", json={"input_ids": p, "sampling_params": sampling}
        )
        assert resp.status_code == 200, resp.text
        return list(resp.json()["output_ids"])

    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(timeout=240, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, p) for p in prompts)))


def test_disaggregated_matches_colocated_with_64_concurrent_streams(launch_tiny, ray_session):
    rng = random.Random(3)
    vocab = 1024
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 120))] for _ in range(64)]
    disagg = launch_tiny()
    try:
        ranks = httpx.get(f"{disagg.url}/v1/stats").json()["ranks"]
        assert sorted(r["info"]["role"] for r in ranks) == ["decode", "prefill"]
        got = asyncio.run(_stream_all(disagg.url, prompts, 24))
        _wait_all_pages_free(disagg.url)
        # At most one add per side of each request (adds that arrive in the same event-loop
        # pass share a call; how many do depends on timing: see test_policy for the batching).
        assert disagg.router.ranks.num_add_calls <= 2 * 64, disagg.router.ranks.num_add_calls
        # Not streamed and no stop string: the same tokens, but the decode rank sends each
        # request's first token and then the rest at its end, not a delta per step.
        before = disagg.router.num_deltas
        whole = asyncio.run(_whole_all(disagg.url, prompts[:16], 24))
        assert whole == got[:16]
        assert disagg.router.num_deltas - before <= 2 * 16, disagg.router.num_deltas - before
        # A stop string needs the text as it grows: those still come step by step.
        before = disagg.router.num_deltas
        stopped = asyncio.run(_whole_all(disagg.url, prompts[:1], 24, stop=["\x00never"]))
        assert stopped == got[:1]
        assert disagg.router.num_deltas - before > 2, disagg.router.num_deltas - before
        _wait_all_pages_free(disagg.url)
        # Every request's KV crossed once: as many sends as receives, all ok, the same bytes.
        url, num = disagg.url, len(prompts) + 16 + 1
        for side in ("send", "receive"):
            assert _metric(url, "pdserve_kv_transfers_total", side=side, outcome="ok") == num
            assert _metric(url, "pdserve_kv_transfers_total", side=side, outcome="failed") == 0
            assert _metric(url, "pdserve_kv_transfer_seconds_total", side=side) > 0
        # Prompts whose targets came before their last prefill step went layer by layer (how
        # many depends on timing here: the decode rank's KV holds a third of the burst; see
        # the test below); the tokens are compared below.
        assert _metric(url, "pdserve_kv_transfers_written_ahead_total") <= num
        moved = _metric(url, "pdserve_kv_transfer_bytes_total", side="send")
        assert moved > 0 and moved == _metric(
            url, "pdserve_kv_transfer_bytes_total", side="receive"
        )
    finally:
        disagg.stop()
    colocated = launch_tiny(colocated=True)
    try:
        want = asyncio.run(_stream_all(colocated.url, prompts, 24))
    finally:
        colocated.stop()
    assert all(len(o) == 24 for o in got)
    mismatched = [i for i in range(len(prompts)) if got[i] != want[i]]
    assert not mismatched, f"requests {mismatched} differ between topologies"


def test_a_prompt_in_chunks_goes_to_the_decode_rank_layer_by_layer(launch_tiny, tiny_server):
    """A prompt of several chunks: its decode pages are reserved while its first chunk
    computes, so its last chunk writes each layer's KV as it goes (over NIXL); its tokens
    are those of the shared server, which sends after the prefill in one chunk."""
    from tests.conftest import tiny_serve_config
    from workers.model.tiny import ensure_tiny_checkpoint

    engine = tiny_serve_config(ensure_tiny_checkpoint()).engine
    server = launch_tiny(engine=dataclasses.replace(engine, chunked_prefill_size=128))
    try:
        rng = random.Random(11)
        for n in (300, 700):
            prompt = [rng.randrange(3, 1000) for _ in range(n)]
            r = _generate(server.url, prompt, 8)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == _generate(tiny_server, prompt, 8).json()["output_ids"]
        _wait_all_pages_free(server.url)
        assert _metric(server.url, "pdserve_kv_transfers_total", side="send", outcome="ok") == 2
        assert _metric(server.url, "pdserve_kv_transfers_written_ahead_total") == 2
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["v3_fp8", "v2_group_limited"])
def test_disaggregated_matches_transformers(name, launch_tiny, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    ckpt = make_checkpoint(name, tmp_path_factory.mktemp(name))
    from orchestrator.launcher import launch
    from tests.conftest import tiny_serve_config
    from workers.model.tiny import ensure_tiny_checkpoint

    for f in ("tokenizer.json", "tokenizer_config.json"):  # the router needs a tokenizer
        shutil.copy(ensure_tiny_checkpoint() / f, ckpt.path / f)

    server = launch(tiny_serve_config(ckpt.path), model_dir=ckpt.path)
    try:
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (4, 19, 37)]
        got = asyncio.run(_stream_all(server.url, prompts, 16))
        _wait_all_pages_free(server.url)
    finally:
        server.stop()
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.hf_path).eval()
    for p, ours in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
            )[0, len(p) :].tolist()  # fmt: skip
        assert ours == ref


def test_pool_instances_run_in_their_own_placement_groups(launch_tiny):
    from ray.util import placement_group_table

    server = launch_tiny(prefill_instances=2, decode_instances=1)
    try:
        groups = [p.group.id.hex() for p in server.placements]
        assert [p.spec.name for p in server.placements] == ["prefill-0", "prefill-1", "decode-0"]
        assert all(placement_group_table()[g]["state"] == "CREATED" for g in groups)
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        pools = sorted((r["info"]["role"], r["info"]["instance"]) for r in ranks)
        assert pools == [("decode", 0), ("prefill", 0), ("prefill", 1)]
        rng = random.Random(5)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(20, 200))] for _ in range(8)]
        asyncio.run(_stream_all(server.url, prompts, 8))
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        prefill_steps = [r["stats"]["num_steps"] for r in ranks if r["info"]["role"] == "prefill"]
        assert all(n > 0 for n in prefill_steps), f"a prefill instance got no work: {ranks}"
    finally:
        server.stop()
    assert all(placement_group_table()[g]["state"] == "REMOVED" for g in groups)


def test_expert_parallel_pools_through_the_server(launch_tiny, tiny_server):
    """`--prefill-dp 2 --decode-dp 2`: each pool is one expert-parallel group of two ranks
    (redundant experts, two-batch overlap); the tokens match the single-rank server's."""
    from workers.engine.config import EngineConfig

    engine = EngineConfig(
        page_size=16, kv_capacity_tokens=2048, device="cpu",
        num_redundant_experts=4, enable_two_batch_overlap=True,
    )  # fmt: skip
    server = launch_tiny(prefill_dp=2, decode_dp=2, engine=engine)
    try:
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        pools = sorted((r["info"]["role"], r["info"]["pool_rank"], r["info"]["pool_size"])
                       for r in ranks)  # fmt: skip
        assert pools == [("decode", 0, 2), ("decode", 1, 2), ("prefill", 0, 2), ("prefill", 1, 2)]
        rng = random.Random(21)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(5, 150))] for _ in range(16)]
        ours = asyncio.run(_stream_all(server.url, prompts, 12))
        ref = asyncio.run(_stream_all(tiny_server, prompts, 12))
        assert ours == ref
        # The first requests into each pool after its quiet start woke the pool's other rank
        # (an asleep pool rank would join a step only every GROUP_POLL_ASLEEP_S); so does the
        # first request after another quiet spell.
        woken = server.router.ranks.num_pool_wakes
        assert woken >= 2
        time.sleep(POOL_QUIET_S + 0.2)
        assert asyncio.run(_stream_all(server.url, prompts[:1], 12)) == ref[:1]
        assert server.router.ranks.num_pool_wakes >= woken + 2
        ranks = _wait_all_pages_free(server.url)
        # Both ranks of each pool served requests (the router balances across DP ranks).
        assert all(r["stats"]["num_generated_tokens"] > 0 for r in ranks), ranks
        loads = [ray_get_load(h) for h in server.ranks]
        assert all(load is not None and int(load.sum()) > 0 for load in loads)
    finally:
        server.stop()


def ray_get_load(handle: Any) -> Any:
    import ray

    return ray.get(handle.expert_load.remote(), timeout=30)


def test_stream_interval_sends_fewer_larger_events_with_the_same_tokens(launch_tiny):
    import json

    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=2048, device="cpu", stream_interval=4)
    server = launch_tiny(engine=engine)
    try:
        rng = random.Random(5)
        prompts = [[rng.randrange(1024) for _ in range(rng.randint(3, 40))] for _ in range(6)]
        n = 19

        async def stream(client: httpx.AsyncClient, p: list[int]) -> list[list[int]]:
            body = {"input_ids": p, "sampling_params": _greedy(n), "stream": True}
            events: list[list[int]] = []
            async with client.stream("POST", f"{server.url}/generate", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:])["output_ids"])
            return events

        async def run() -> list[list[list[int]]]:
            async with httpx.AsyncClient(timeout=120) as client:
                return list(await asyncio.gather(*(stream(client, p) for p in prompts)))

        for p, events in zip(prompts, asyncio.run(run()), strict=True):
            expected = _generate(server.url, p, n).json()["output_ids"]
            assert events[-1] == expected  # cumulative: the last event has every token
            sizes = [len(b) - len(a) for a, b in zip([[], *events], events, strict=False)]
            # The first token is not held for the interval: its event has 1 token, or 1 + 4k
            # when the router polled late and the next publishes merged into it (held, it
            # would have 4); then at least 4 new tokens an event, but the last.
            assert sizes[0] % 4 == 1 or len(sizes) == 1, sizes
            assert all(s >= 4 for s in sizes[1:-1]), sizes
            assert len(events) <= 2 + (n - 1) // 4, sizes
    finally:
        server.stop()


def test_mixed_clients_leave_no_page_or_request_behind(launch_tiny):
    """Many clients at once doing what clients do — stream to the end, hang up part way,
    stop on a token or a string, send bad input — against two prefill pairs with a stream
    interval: every request ends with its expected outcome, and afterwards no KV page is used
    and nothing is in flight on the router."""
    import json

    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=4096, device="cpu", stream_interval=3)
    server = launch_tiny(engine=engine, prefill_instances=2)
    try:
        rng = random.Random(17)
        url = f"{server.url}/generate"

        async def client(i: int, http: httpx.AsyncClient) -> tuple[str, str]:
            kind = ["full", "hang_up", "stop_token", "bad", "stop_string"][i % 5]
            prompt = [rng.randrange(2, 1024) for _ in range(rng.randint(1, 200))]
            n = rng.randint(1, 40)
            params: dict[str, Any] = _greedy(n)
            if kind == "bad":
                r = await http.post(url, json={"input_ids": [], "sampling_params": params})
                assert r.status_code == 400, r.text
                return kind, "refused"
            if kind == "stop_token":
                params["stop_token_ids"] = list(range(2, 1024, 2))  # about every other token
            if kind == "stop_string":
                # The router finds these in the text and aborts the request on its rank.
                params["stop"] = ["e", "a", "o"]
            body = {"input_ids": prompt, "sampling_params": params, "stream": True}
            got: dict[str, Any] = {}
            async with http.stream("POST", url, json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    got = json.loads(line[6:])
                    if kind == "hang_up" and len(got.get("output_ids", [])) >= 2:
                        return kind, "gone"  # leaving the block closes the connection
            assert "error" not in got, got
            finish = got["meta_info"]["finish_reason"]
            if kind in ("stop_token", "stop_string"):
                assert finish["type"] in ("stop", "length"), finish
            else:
                assert finish == {"type": "length", "length": n}, finish
                assert len(got["output_ids"]) == n
            return kind, finish["type"]

        async def run() -> list[tuple[str, str]]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=120, limits=limits) as http:
                return list(await asyncio.gather(*(client(i, http) for i in range(60))))

        outcomes = asyncio.run(run())
        kinds = {kind for kind, _ in outcomes}
        assert sorted(kinds) == ["bad", "full", "hang_up", "stop_string", "stop_token"]
        for kind in ("stop_string", "stop_token"):  # the stops did happen
            assert (kind, "stop") in outcomes, outcomes
        _wait_all_pages_free(server.url)
        deadline = time.monotonic() + 30
        while server.router.num_in_flight:
            assert time.monotonic() < deadline, "requests left in flight on the router"
            time.sleep(0.1)
        stats = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        assert all(r["stats"]["num_running"] == r["stats"]["num_waiting"] == 0 for r in stats)
        assert all(r["stats"]["num_in_transfer"] == 0 for r in stats), stats
        r = _generate(server.url, list(range(3, 50)), 8)
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 8, r.text
    finally:
        server.stop()
