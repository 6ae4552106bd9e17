"""What a request pays when its decode instance goes under it: the pause of a resumed stream.

Against a running disaggregated server with two or more decode instances and an admin token:
first `--streams` greedy requests run undisturbed (the reference tokens); then the same
requests again, streamed, and once they all have output the decode instance holding the most
of them is taken out at once (`/admin/scale`, drain timeout 0). Its requests move to the
others with their KV (the default), or — on a server run with `--disable-kv-migration` —
resume there from their output (a prefill of prompt + output there). Printed: how many moved, each
stream's longest gap between two events from the scale on (p50, max) — the moved streams'
pause next to the slowest step of those that stayed — the scale's own time, and whether every
stream ended with the reference tokens (exit status 1 if not).

    .venv/bin/pdserve serve --port 30001 --decode-instances 2 --admin-token admin-token-1 &
    .venv/bin/python benchmarks/resume_pause.py --url http://127.0.0.1:30001 \\
        --admin-token admin-token-1

`--kill`: the busiest decode rank's process is killed instead (SIGKILL; the server must run on
this machine), with one decode instance or more: with one, its requests wait for Ray to restart
the rank (`--rank-restart-wait`) and resume there, so the pause is the restart (the model
loading again) plus the recompute.

    .venv/bin/pdserve serve --port 30001 &
    .venv/bin/python benchmarks/resume_pause.py --url http://127.0.0.1:30001 --kill
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from typing import Any

import aiohttp


async def _whole(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[int]:
    async with session.post(url + "/generate", json=body) as resp:
        answer = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"/generate: HTTP {resp.status}: {answer}")
        return list(answer["output_ids"])


async def _stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], first: asyncio.Event
) -> tuple[list[int], list[float], Any]:
    """The stream's output ids, the time of each event, and its last event."""
    times: list[float] = []
    last: Any = None
    async with session.post(url + "/generate", json={**body, "stream": True}) as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                times.append(time.monotonic())
                first.set()
    ids = list(last["output_ids"]) if last and "output_ids" in last else []
    return ids, times, last


async def _instances(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with session.get(url + "/admin/pools", headers=headers) as resp:
        return (await resp.json())["pools"]


async def _stats(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url + "/v1/stats") as resp:
        return await resp.json()


async def _kill_busiest_decode_rank(session: aiohttp.ClientSession, url: str) -> str:
    ranks = [r for r in (await _stats(session, url))["ranks"]
             if r["info"] and r["info"]["role"] == "decode" and r["stats"]]  # fmt: skip
    busiest = max(ranks, key=lambda r: r["stats"]["num_running"])
    os.kill(busiest["info"]["pid"], signal.SIGKILL)
    return f"rank {busiest['rank']} (pid {busiest['info']['pid']})"


async def run(
    url: str, token: str | None, streams: int, prompt_len: int, output_len: int, kill: bool
) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        decode = [] if kill else [p for p in await _instances(session, url, headers)
                                  if p["role"] == "decode"]  # fmt: skip
        if not kill and len(decode) < 2:
            print("error: the server needs two or more decode instances (--decode-instances 2)",
                  file=sys.stderr)  # fmt: skip
            return 2
        bodies = [
            {"input_ids": [(37 * i + 11 * k) % 900 + 3 for k in range(prompt_len)],
             "sampling_params": {"max_new_tokens": output_len, "temperature": 0.0,
                                 "ignore_eos": True}}
            for i in range(streams)
        ]  # fmt: skip
        want = await asyncio.gather(*(_whole(session, url, b) for b in bodies))
        events = [asyncio.Event() for _ in bodies]
        tasks = [
            asyncio.ensure_future(_stream(session, url, b, e))
            for b, e in zip(bodies, events, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
        if kill:
            resumed_before = (await _stats(session, url))["num_resumed"]
            began = time.monotonic()
            victim = await _kill_busiest_decode_rank(session, url)
            results = await asyncio.gather(*tasks)
            report = {"ok": True, "requests_resumed": (await _stats(session, url))["num_resumed"]
                      - resumed_before, "requests_retried": 0}  # fmt: skip
            return _report(results, want, began, report, f"killed decode {victim}",
                           time.monotonic() - began, prompt_len, output_len)  # fmt: skip
        pools = await _instances(session, url, headers)
        busy = max((p for p in pools if p["role"] == "decode"), key=lambda p: p["num_requests"])
        began = time.monotonic()
        body = {"remove": [busy["name"]], "drain_timeout_s": 0}
        async with session.post(url + "/admin/scale", json=body, headers=headers) as resp:
            report = await resp.json()
        scale_s = time.monotonic() - began
        results = await asyncio.gather(*tasks)
    if not report.get("ok"):
        print(f"error: the scale failed: {report}", file=sys.stderr)
        return 1
    return _report(results, want, began, report, f"removed {busy['name']}", scale_s,
                   prompt_len, output_len)  # fmt: skip


def _report(
    results: list[Any], want: list[list[int]], began: float, report: dict[str, Any], what: str,
    seconds: float, prompt_len: int, output_len: int,
) -> int:  # fmt: skip
    streams = len(want)
    # Each stream's longest gap between two events from the scale on: a resumed stream's
    # pause, else its slowest step meanwhile. The streams moved are the report's count of
    # longest ones (the router does not say which they were).
    after, wrong = [], 0
    for (ids, times, last), expected in zip(results, want, strict=True):
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > began]
        after.append(max(gaps, default=0.0))
        wrong += ids != expected or bool(last and "error" in last)
    after.sort(reverse=True)
    migrated = report.get("requests_migrated", 0)
    num_moved = report["requests_resumed"] + migrated
    moved, stayed = after[:num_moved], after[num_moved:]
    print(f"{streams} streams of {prompt_len} + {output_len} tokens; {what} "
          f"({seconds * 1000:.0f} ms: {migrated} migrated with their KV, "
          f"{report['requests_resumed']} resumed from their output, "
          f"{report['requests_retried']} retried)")  # fmt: skip
    for name, gaps in (("moved", moved), ("others", stayed)):
        if gaps:
            ms = sorted(g * 1000 for g in gaps)
            print(f"  longest gap between events since then, {name:8s}: p50 {statistics.median(ms):7.1f} ms"
                  f", max {ms[-1]:7.1f} ms  ({len(ms)} streams)")  # fmt: skip
    print(f"  streams with the reference tokens: {streams - wrong}/{streams}")
    return 1 if wrong else 0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--admin-token", help="needed unless --kill")
    p.add_argument(
        "--kill",
        action="store_true",
        help="kill the busiest decode rank's process instead of scaling it down",
    )
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=512)
    args = p.parse_args()
    if not args.kill and not args.admin_token:
        p.error("--admin-token is needed to scale an instance down (or use --kill)")
    code = asyncio.run(run(args.url.rstrip("/"), args.admin_token, args.streams,
                           args.prompt_len, args.output_len, args.kill))  # fmt: skip
    sys.exit(code)


if __name__ == "__main__":
    main()
