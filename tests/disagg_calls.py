"""Calls on a disaggregated test server, shared by `test_disagg` and `test_disagg_faults`:
greedy sampling params, one plain `/generate` call (blocking or async), and waiting until
every rank's KV pages are free."""

from __future__ import annotations

import time
from typing import Any

import httpx


def _greedy(n: int) -> dict[str, Any]:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}


def _wait_all_pages_free(url: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        ranks = httpx.get(f"{url}/v1/stats").json()["ranks"]
        if all(r["stats"]["num_pages_used"] == 0 for r in ranks):
            return ranks
        assert time.monotonic() < deadline, f"KV pages still held: {ranks}"
        time.sleep(0.2)


def _generate(url: str, prompt: list[int], n: int, timeout_s: float = 60) -> httpx.Response:
    body = {"input_ids": prompt, "sampling_params": _greedy(n)}
    return httpx.post(f"{url}/generate", json=body, timeout=timeout_s)


def _greedy_outputs(url: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The greedy output ids of `prompts`, run together in one batch `/generate` call (one at
    a time would take minutes on an expert-parallel pool: a step per token each)."""
    body = {"input_ids": prompts, "sampling_params": _greedy(n)}
    r = httpx.post(f"{url}/generate", json=body, timeout=240)
    assert r.status_code == 200, r.text
    return [out["output_ids"] for out in r.json()]


async def _generate_async(
    client: httpx.AsyncClient, url: str, prompt: list[int], n: int
) -> tuple[int, str]:
    """A greedy `/generate` call of `n` tokens: its status and body."""
    body = {"input_ids": prompt, "sampling_params": _greedy(n)}
    r = await client.post(f"{url}/generate", json=body)
    return r.status_code, r.text


def _metric(url: str, name: str, verify: Any = True, **labels: str) -> float:
    """One sample of the server's `/metrics` (the sum over the samples matching `labels`);
    `verify`: httpx's (an SSL context trusting an https server's certificate)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30, verify=verify).text
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    assert values, f"no sample {name} {labels} in /metrics"
    return sum(values)
