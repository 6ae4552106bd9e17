"""What relieving KV pressure buys: over-committed decode ranks, with and without the moves.

A busy server over-commits its decode ranks' KV on purpose: the router places requests by
`max_new_tokens`, and most requests end well before it. This load does that: every request asks
for `--max-new-tokens`, and its client ends it early (it closes the stream, as a client that got its answer or an EOS would end it): most after a
few dozen tokens, `--long-share` of them not before the limit; `--concurrency`
at once. Run against two or more servers (`--url`, repeated) that differ in
`--kv-pressure-interval` (the default 2 s, and 0: off), one after another, the same load on each
(same prompts and lengths); printed side by side: output tokens/s, preemptions (each one
computes a request's prompt and output again), KV-pressure moves and migrations (each one KV
transfer), requests resumed, and the time per output token (p50 / p99 over streams).

    .venv/bin/pdserve serve --port 30011 --decode-instances 2 --kv-capacity-tokens 8192 &
    .venv/bin/pdserve serve --port 30012 --decode-instances 2 --kv-capacity-tokens 8192 \\
        --kv-pressure-interval 0 &
    .venv/bin/python benchmarks/kv_pressure.py --url http://127.0.0.1:30011 \\
        --url http://127.0.0.1:30012
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from typing import Any

import aiohttp

from orchestrator.bench import generate_events


async def _stats(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url + "/v1/stats") as resp:
        return await resp.json()


def _preemptions(stats: Any) -> int:
    return sum(r["stats"]["num_preemptions"] for r in stats["ranks"] if r["stats"])


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], length: int
) -> tuple[int, float]:
    """Stream `body` until `length` tokens came (then hang up) or it ends: the tokens, and
    the seconds per token after the first."""
    tokens, first, last = 0, 0.0, 0.0
    events = generate_events(session, url, body)
    async for event in events:
        tokens = len(event["output_ids"])
        last = time.monotonic()
        first = first or last
        if tokens >= length or event["meta_info"].get("finish_reason"):
            break
    await events.aclose()  # hang up now
    return tokens, (last - first) / max(1, tokens - 1)


async def run_one(url: str, load: list[tuple[dict[str, Any], int]], concurrency: int) -> dict:
    timeout = aiohttp.ClientTimeout(total=1800)
    limits = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=limits) as session:
        before = await _stats(session, url)
        gate = asyncio.Semaphore(concurrency)

        async def bounded(body: dict[str, Any], length: int) -> tuple[int, float]:
            async with gate:
                return await _one(session, url, body, length)

        began = time.monotonic()
        results = await asyncio.gather(*(bounded(b, n) for b, n in load))
        seconds = time.monotonic() - began
        await asyncio.sleep(1.0)  # the hung-up requests' aborts reach their ranks
        after = await _stats(session, url)
    per_token = sorted(t for _, t in results)
    return {
        "tokens": sum(n for n, _ in results),
        "seconds": seconds,
        "preemptions": _preemptions(after) - _preemptions(before),
        "pressure_moves": after.get("num_kv_pressure_moves", 0)
        - before.get("num_kv_pressure_moves", 0),
        "migrated": after["num_migrated"] - before["num_migrated"],
        "resumed": after["num_resumed"] - before["num_resumed"],
        "tpot_p50_ms": 1000 * statistics.median(per_token),
        "tpot_p99_ms": 1000 * per_token[int(0.99 * (len(per_token) - 1))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", action="append", required=True, help="a server (repeat)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--min-len", type=int, default=16, help="the shortest a client lets one run")
    p.add_argument(
        "--long-share", type=float, default=0.2,
        help="the share of requests that run to --max-new-tokens; the others end after "
        "between --min-len and 4x that many tokens",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    load = []
    for _ in range(args.num_requests):
        prompt = [rng.randrange(3, 900) for _ in range(args.input_len)]
        body = {"input_ids": prompt, "stream": True,
                "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 0.0,
                                    "ignore_eos": True}}  # fmt: skip
        # Most end early, a few run long: the over-commitment a real load has.
        if rng.random() < args.long_share:
            length = args.max_new_tokens
        else:
            length = rng.randint(args.min_len, 4 * args.min_len)
        load.append((body, length))
    print(f"{args.num_requests} requests of {args.input_len} prompt tokens asking "
          f"{args.max_new_tokens} new ones, ended by their clients after "
          f"{statistics.mean(n for _, n in load):.0f} on average; {args.concurrency} at once")  # fmt: skip
    header = ("server", "tok/s", "preempted", "pressure moves", "migrated", "resumed",
              "TPOT p50 / p99 ms")  # fmt: skip
    print(" | ".join(header))
    for url in args.url:
        try:
            r = asyncio.run(run_one(url, load, args.concurrency))
        except (aiohttp.ClientError, RuntimeError) as e:
            print(f"error: {url}: {e}", file=sys.stderr)
            return 1
        print(f"{url} | {r['tokens'] / r['seconds']:.0f} | {r['preemptions']} | "
              f"{r['pressure_moves']} | {r['migrated']} | {r['resumed']} | "
              f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
