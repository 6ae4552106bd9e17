"""Load generator: random-token prompts streamed through `/generate`, latency and throughput.

Each prompt is exactly `input_len` random token ids (sent as `input_ids`) and asks for exactly
`output_len` tokens (`ignore_eos`), so runs are comparable across models and servers. Use it as a
library (`asyncio.run(run_bench(BenchConfig(...)))`) or through `pdserve bench`; what a run
measured and how it is reported: `orchestrator.bench_results`.

TTFT: request sent → first token received. TPOT: (e2e − TTFT) / (output tokens − 1) per request.
With `stream=False` (`--no-stream`) each request is one plain JSON call, as an offline batch
client would send it: there is no first token to time, so only e2e latency and throughput.
With `shared_prefix_len` (`--shared-prefix-len`) every prompt begins with the same that many
random tokens (a system prompt) before its own `input_len`: what prefix caching serves.
With `constraint` (`--regex`, `--json-schema`) every output is held to it: what structured
output costs (throughput counts the tokens actually generated).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from orchestrator.auth import client_tls
from orchestrator.bench_openai import one_openai, prompt_texts
from orchestrator.bench_results import BenchResult, RequestResult, summarize
from orchestrator.cli.common import answer_error, cannot_reach

APIS = ("generate", "completions", "chat")


@dataclass(frozen=True)
class BenchConfig:
    url: str
    num_prompts: int
    input_len: int
    output_len: int
    concurrency: int
    seed: int = 0
    vocab_size: int | None = None  # default: asked from the server (`GET /v1/stats`)
    timeout_s: float = 600.0  # per request
    stream: bool = True  # False: plain JSON calls (no TTFT / TPOT)
    shared_prefix_len: int = 0  # tokens every prompt begins with, before its own input_len
    # Structured output for every request: (`regex` | `json_schema` | `ebnf`, its text). With
    # `ignore_eos` an output ends early only where the constraint allows nothing more.
    constraint: tuple[str, str] | None = None
    # Sampling of every request: greedy by default; a temperature (and top-p) measures what
    # drawing tokens costs (each request seeded from `seed`, so runs repeat).
    temperature: float = 0.0
    top_p: float = 1.0
    # The route: `generate` (SGLang's, the default), or the OpenAI routes `completions` (the
    # same token ids as the prompt) and `chat` (each prompt's text as one user message: its
    # token count is then what the chat template and tokenizer make of it, as reported).
    api: str = "generate"
    api_key: str | None = None  # the server's --api-key, sent as `Authorization: Bearer`
    ca_cert: str | None = None  # for an https:// URL: trust this CA (default: the system's)
    client_cert: str | None = None  # presented to a server that wants one (mutual TLS)
    client_key: str | None = None  # its key, when not in the client_cert file
    # More routers of the same deployment (`pdserve serve --front`): the requests go to
    # `url` and these in turn; the ranks' counts are read from `url`.
    more_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.shared_prefix_len < 0:
            raise ValueError("--shared-prefix-len must be >= 0")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")
        if self.api not in APIS:
            raise ValueError(f"--api must be one of {', '.join(APIS)}, got {self.api!r}")
        if self.api != "generate" and self.constraint is not None:
            raise ValueError("--regex / --json-schema go with --api generate")


async def generate_events(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """The events of a streamed `POST /generate` of `body` to the server at `url` (RuntimeError
    for an HTTP error or an error event); the stream closes when the caller stops early."""
    async with session.post(url + "/generate", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"/generate: HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"/generate: {event['error']}")
            yield event


def make_prompts(
    num_prompts: int, input_len: int, vocab_size: int, seed: int, shared_prefix_len: int = 0
) -> list[list[int]]:
    """The benchmark's prompts: uniform random token ids, reproducible from `seed`; each after
    the same `shared_prefix_len` ones."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab_size) for _ in range(shared_prefix_len)]
    return [
        shared + [rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)
    ]


async def server_vocab_size(session: aiohttp.ClientSession, url: str) -> int:
    """The smallest vocabulary of the server's ready ranks (`GET /v1/stats`); a RuntimeError
    whose message is one line for any answer that is not pdserve's."""
    async with session.get(f"{url}/v1/stats") as resp:
        body = await resp.read()
        vocab_sizes = _vocab_sizes(body) if resp.status == 200 else None
        if vocab_sizes is None:
            raise RuntimeError(refused(url, resp, body))
    if not vocab_sizes:
        raise RuntimeError(f"{url} has no ready rank")
    return min(vocab_sizes)


# `BenchResult` field: the `RankStats` count summed over the ranks.
SERVER_COUNTS = {
    "prefix_queried_tokens": "num_prefix_queried_tokens",
    "prefix_hit_tokens": "num_prefix_hit_tokens",
    "spec_draft_tokens": "num_spec_draft_tokens",
    "spec_accepted_tokens": "num_spec_accepted_tokens",
}


async def server_counts(
    session: aiohttp.ClientSession, url: str
) -> dict[tuple[int, int], dict[str, int]] | None:
    """`SERVER_COUNTS` of each of the server's ranks now, by (rank, process id): a rank
    restarted since is a new process whose counts began at 0. None when `/v1/stats` does
    not answer with them (the run goes on without)."""
    try:
        async with session.get(f"{url}/v1/stats") as resp:
            ranks = (await resp.json())["ranks"]
        return {
            (int(r["rank"]), int(r["info"]["pid"])): {
                k: int(r["stats"].get(f, 0)) for k, f in SERVER_COUNTS.items()
            }
            for r in ranks
            if r.get("stats") and r.get("info")
        }
    except (aiohttp.ClientError, ValueError, KeyError, TypeError, AttributeError):
        return None


def counts_during(
    before: dict[tuple[int, int], dict[str, int]], after: dict[tuple[int, int], dict[str, int]]
) -> dict[str, int]:
    """What the ranks counted between two `server_counts`, summed: each rank process's growth
    (a process new since `before` — restarted, or added — from 0)."""
    zeros = dict.fromkeys(SERVER_COUNTS, 0)
    return {
        k: sum(max(0, now[k] - before.get(rank, zeros)[k]) for rank, now in after.items())
        for k in SERVER_COUNTS
    }


def _vocab_sizes(stats: bytes) -> list[int] | None:
    """The vocabulary sizes of the ready ranks in a `/v1/stats` body; None for a body that is
    not pdserve's."""
    try:
        return [int(r["info"]["vocab_size"]) for r in json.loads(stats)["ranks"] if r.get("info")]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def refused(url: str, resp: aiohttp.ClientResponse, body: bytes) -> str:
    """One line for an answer that is not the one wanted (an HTML page is not quoted)."""
    status = f"{resp.status} {resp.reason or ''}".rstrip()
    return answer_error(url, status, resp.headers.get("Content-Type", ""), body)


def request_error(url: str, error: Exception) -> str:
    """One line for a request that failed on the way: a server that cannot be reached named by
    its URL (not by aiohttp's connection key, "ssl:default")."""
    if isinstance(error, aiohttp.ClientConnectorError):
        return cannot_reach(url, error)
    return f"{type(error).__name__}: {error}"


async def _one(
    session: aiohttp.ClientSession, cfg: BenchConfig, input_ids: list[int], index: int = 0
) -> RequestResult:
    sampling: dict[str, Any] = {
        "max_new_tokens": cfg.output_len, "temperature": cfg.temperature, "ignore_eos": True,
    }  # fmt: skip
    if cfg.temperature > 0:
        sampling.update(top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + index)
    payload = {"input_ids": input_ids, "sampling_params": sampling, "stream": cfg.stream}
    if cfg.constraint is not None:
        kind, spec = cfg.constraint
        payload["sampling_params"][kind] = spec  # type: ignore[index]
    if not cfg.stream:
        return await _one_whole(session, cfg, payload)
    start = time.perf_counter()
    ttft = 0.0
    tail = b""  # the stream's end: its last two events at most
    try:
        async with session.post(f"{cfg.url}/generate", json=payload) as resp:
            if resp.status != 200:
                return RequestResult(False, error=refused(cfg.url, resp, await resp.read()))
            # The client must spend little CPU beside the server it measures: it reads what
            # arrived in chunks (not line by line), notes when the first event came, and keeps
            # only the stream's tail, whose last event before [DONE] has the totals.
            async for chunk in resp.content.iter_any():
                if not ttft and b"data: " in chunk:
                    ttft = time.perf_counter() - start
                tail = _last_events(tail + chunk)
        event = _final_event(tail)
        if "error" in event:
            return RequestResult(False, error=str(event["error"].get("message")))
        num_tokens = int(event["meta_info"]["completion_tokens"])
    except (aiohttp.ClientError, ValueError, KeyError) as e:
        return RequestResult(False, error=request_error(cfg.url, e))
    return RequestResult(True, num_tokens, ttft, time.perf_counter() - start)


def _last_events(buf: bytes, keep: int = 2) -> bytes:
    """`buf` from the start of its `keep`-th last event (events begin a line with `data: `)."""
    cut = len(buf)
    for _ in range(keep):
        cut = buf.rfind(b"\ndata: ", 0, cut)
        if cut < 0:
            return buf
    return buf[cut + 1 :]


def _final_event(tail: bytes) -> dict[str, Any]:
    """The last JSON event of an SSE stream's tail ({} when there is none)."""
    for line in reversed(tail.split(b"\n")):
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            return dict(json.loads(line[len(b"data: ") :]))
    return {}


async def _one_whole(
    session: aiohttp.ClientSession, cfg: BenchConfig, payload: dict[str, object]
) -> RequestResult:
    start = time.perf_counter()
    try:
        async with session.post(f"{cfg.url}/generate", json=payload) as resp:
            body = await resp.read()
            if resp.status != 200:
                return RequestResult(False, error=refused(cfg.url, resp, body))
        num_tokens = int(json.loads(body)["meta_info"]["completion_tokens"])
    except (aiohttp.ClientError, ValueError, KeyError) as e:
        return RequestResult(False, error=request_error(cfg.url, e))
    return RequestResult(True, num_tokens, None, time.perf_counter() - start)


async def run_bench(cfg: BenchConfig) -> BenchResult:
    tls = client_tls(cfg.ca_cert, cfg.client_cert, cfg.client_key) or True
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, ssl=tls)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=30.0)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        vocab = cfg.vocab_size or await server_vocab_size(session, cfg.url)
        prompts = make_prompts(
            cfg.num_prompts, cfg.input_len, vocab, cfg.seed, cfg.shared_prefix_len
        )
        gate = asyncio.Semaphore(cfg.concurrency)

        texts = await prompt_texts(session, cfg.url, prompts) if cfg.api == "chat" else None

        routed = [cfg, *(replace(cfg, url=u) for u in cfg.more_urls)]

        async def gated(ids: list[int], index: int) -> RequestResult:
            to = routed[index % len(routed)]
            async with gate:
                if cfg.api == "generate":
                    return await _one(session, to, ids, index)
                text = texts[index] if texts is not None else None
                return await one_openai(session, to, ids, index, text)

        before = await server_counts(session, cfg.url)
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(p, i) for i, p in enumerate(prompts)))
        duration = time.perf_counter() - start
        after = await server_counts(session, cfg.url) if before is not None else None
    result = summarize(results, cfg.input_len + cfg.shared_prefix_len, duration)
    if before is None or after is None:
        return result
    ran = counts_during(before, after)
    return replace(
        result,
        prefix_queried_tokens=ran["prefix_queried_tokens"],
        prefix_hit_tokens=ran["prefix_hit_tokens"],
        spec_draft_tokens=ran["spec_draft_tokens"],
        spec_accepted_tokens=ran["spec_accepted_tokens"],
    )
