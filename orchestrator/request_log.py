"""`pdserve serve --log-requests`: one JSON line per ended request on standard error, for
finding a slow or failed request after the fact (`rid` is the id the client got back).

A line holds the request's id, front end (`api`: the HTTP route, or `grpc`), client address,
token counts (prompt, of which cached, output), how it ended (`finish`: stop, length, abort,
timeout, error, or `gone` when the client left before the end), the error if any, and its
time to first token and end-to-end latency in milliseconds. Prompts and outputs are never
logged."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

logger = logging.getLogger("pdserve.requests")


def enable() -> None:
    """Print the request log (once per process, however often called)."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s request %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_request(
    rid: str,
    api: str,
    client: str,
    finish: str,
    ttft_s: float | None,
    e2e_s: float,
    num_prompt_tokens: int | None = None,
    num_cached_tokens: int | None = None,
    num_output_tokens: int | None = None,
    error: str | None = None,
) -> None:
    record: dict[str, Any] = {
        "rid": rid,
        "api": api,
        "client": client,
        "prompt_tokens": num_prompt_tokens,
        "cached_tokens": num_cached_tokens,
        "output_tokens": num_output_tokens,
        "finish": finish,
        "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 2),
        "e2e_ms": round(e2e_s * 1000, 2),
    }
    if error:
        record["error"] = error
    logger.info(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
