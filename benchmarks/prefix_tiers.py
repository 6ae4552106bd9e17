"""What the prefix cache's host tier buys: more long contexts revisited than the KV cache holds.

`--num-contexts` conversations, each a long context of its own (`--context-len` random tokens:
a document, an agent's history), are visited in rounds: every round asks one new question
(`--question-len` tokens) of every context, `--concurrency` at once, in a new order each round.
When the contexts together exceed the KV cache, the device's least-recently-used eviction lets
each context go before its turn comes again, and every visit computes its context again; with
`--prefix-cache-host-space` the pages it lets go wait in host memory and come back. Run against
servers that differ only in that flag (`--url`, repeated; one after another, the same prompts on
each); printed side by side per round: the share of prompt tokens found cached, time to first
token (p50 / p99) and the round's wall time.

    .venv/bin/pdserve serve --port 30021 --colocated --kv-capacity-tokens 8192 \\
        --prefix-cache-host-space 1 &
    .venv/bin/pdserve serve --port 30022 --colocated --kv-capacity-tokens 8192 &
    .venv/bin/python benchmarks/prefix_tiers.py --url http://127.0.0.1:30021 \\
        --url http://127.0.0.1:30022
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
from orchestrator.bench_results import percentile


async def _ask(session: aiohttp.ClientSession, url: str, ids: list[int], out_len: int) -> Any:
    """Stream one greedy request: (seconds to its first token, cached prompt tokens)."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": out_len, "temperature": 0.0,
                                "ignore_eos": True}}  # fmt: skip
    start, first, cached = time.monotonic(), None, 0
    async for event in generate_events(session, url, body):
        if first is None:
            first = time.monotonic() - start
        cached = event["meta_info"].get("cached_tokens", cached)
    return first or 0.0, cached


async def _round(
    url: str, prompts: list[list[int]], out_len: int, concurrency: int
) -> tuple[list[float], int, float]:
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(ids: list[int]) -> Any:
            async with gate:
                return await _ask(session, url, ids, out_len)

        start = time.monotonic()
        results = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.monotonic() - start
    return [r[0] for r in results], sum(r[1] for r in results), wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", action="append", required=True, help="a server (repeat)")
    p.add_argument("--num-contexts", type=int, default=32)
    p.add_argument("--context-len", type=int, default=512)
    p.add_argument("--question-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    contexts = [[rng.randrange(3, 1000) for _ in range(args.context_len)]
                for _ in range(args.num_contexts)]  # fmt: skip
    rounds = []
    for _ in range(args.rounds):
        order = rng.sample(range(args.num_contexts), args.num_contexts)
        rounds.append([contexts[i] + [rng.randrange(3, 1000) for _ in range(args.question_len)]
                       for i in order])  # fmt: skip
    total = args.num_contexts * (args.context_len + args.question_len)
    print(f"{args.num_contexts} contexts of {args.context_len} tokens ({total} prompt tokens a "
          f"round), {args.rounds} rounds, {args.concurrency} at once")  # fmt: skip
    print("server | round | cached share | TTFT p50 / p99 ms | round s")
    for url in args.url:
        for k, prompts in enumerate(rounds):
            ttfts, cached, wall = asyncio.run(
                _round(url, prompts, args.output_len, args.concurrency)
            )
            print(f"{url} | {k + 1} | {cached / total:.2f} | "
                  f"{1000 * statistics.median(ttfts):.0f} / {1000 * percentile(ttfts, 99):.0f} | "
                  f"{wall:.1f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
