"""Disaggregated serving end to end: a prefill rank and a decode rank (separate Ray actor
processes) linked by real NIXL agents, behind the router and HTTP front end."""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from typing import Any

import httpx
import pytest
import torch

from tests.checkpoints import make_checkpoint

pytest.importorskip("workers.transfer")
pytestmark = pytest.mark.timeout(300)


def _greedy(n: int) -> dict[str, Any]:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}


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


def _wait_all_pages_free(url: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        ranks = httpx.get(f"{url}/v1/stats").json()["ranks"]
        if all(r["stats"]["num_pages_used"] == 0 for r in ranks):
            return ranks
        assert time.monotonic() < deadline, f"KV pages still held: {ranks}"
        time.sleep(0.2)


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
