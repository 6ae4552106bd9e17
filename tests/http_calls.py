"""Calls on a test server over HTTP, shared by the `test_http_*` modules: a client, the
ranks' stats (and waiting until all are idle), reading an SSE stream, greedy sampling
params, and a request long enough to be cut short."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx


def _client(url: str, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout)


def _ranks(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/v1/stats", timeout=30).json()["ranks"])


def _rank(url: str) -> dict[str, Any]:
    """The rank that generates: the decode rank (disaggregated) or the colocated one."""
    ranks = [r for r in _ranks(url) if r["info"]["role"] in ("decode", "colocated")]
    assert len(ranks) == 1
    return ranks[0]


def _wait_idle(url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll until no request runs or waits on any rank and every KV page is free; the
    generating rank's stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [r["stats"] for r in _ranks(url)]
        if all(
            st["num_running"] == 0
            and st["num_waiting"] == 0
            and st["num_pages_free"] == st["num_pages_total"]
            for st in stats
        ):
            return _rank(url)["stats"]
        assert time.monotonic() < deadline, f"the ranks did not go idle: {stats}"
        time.sleep(0.05)


def _sse(resp: httpx.Response) -> list[Any]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _greedy(max_new: int, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True, **extra}


def _long_body(info: dict[str, Any], stream: bool) -> tuple[dict[str, Any], int]:
    max_new = min(info["max_context_len"], info["kv_capacity_tokens"]) - 8
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": _greedy(max_new), "stream": stream}
    return body, max_new
