"""`pdserve serve --log-requests`: one JSON line per ended request on standard error, for
finding a slow or failed request after the fact (`rid` is the id the client got back).

A line holds the request's id, front end (`api`: the HTTP route, or `grpc`), client address,
token counts (prompt, of which cached, output), how it ended (`finish`: stop, length, abort,
timeout, error, `gone` when the client left before the end, `refused` or `unavailable` for one
not taken: a rank refused it, or none could take it), the error if any, and its
time to first token and end-to-end latency in milliseconds. Prompts and outputs are never
logged."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
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


@dataclass
class EndedRequest:
    """One request (choice) as it ended, what its log line and its span say. Times on
    `time.perf_counter`'s clock."""

    rid: str
    api: str  # the HTTP route, or "grpc"
    client: str
    # stop, length, abort, timeout, error; gone (the client left); refused (a rank refused it:
    # a 400) or unavailable (no rank could take it: a 503), both before it started.
    finish: str
    arrival_s: float
    end_s: float
    first_token_s: float | None = None
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    num_output_tokens: int | None = None
    error: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


def log_request(req: EndedRequest) -> None:
    record: dict[str, Any] = {
        "rid": req.rid,
        "api": req.api,
        "client": req.client,
        "prompt_tokens": req.num_prompt_tokens,
        "cached_tokens": req.num_cached_tokens,
        "output_tokens": req.num_output_tokens,
        "finish": req.finish,
        "ttft_ms": None if req.ttft_s is None else round(req.ttft_s * 1000, 2),
        "e2e_ms": round((req.end_s - req.arrival_s) * 1000, 2),
    }
    if req.error:
        record["error"] = req.error
    logger.info(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
