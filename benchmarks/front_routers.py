"""One router against two (a primary and a front router, `pdserve serve --front`) on the same
pool instances: output tokens/s of the whole serving path and each router process's CPU per
1,000 output tokens, in one run.

A Ray head runs in this process; `pdserve serve --address <it> --deployment NAME` starts the
pools and `pdserve serve --front NAME` a second router. Each round runs the same load
(`--num-prompts` streamed requests of `--input-len` / `--output-len` tokens at
`--concurrency`) once through the primary alone and once split evenly over both routers at
the same time (half the prompts and half the concurrency each), in alternating order. The
routers' CPU comes from `pdserve_router_cpu_seconds_total` on their `/metrics`. Extra
arguments after `--` go to both `pdserve serve`s (default: the built-in tiny model, one
prefill and one decode rank).

    .venv/bin/python benchmarks/front_routers.py --rounds 2
    .venv/bin/python benchmarks/front_routers.py -- --model /models/DeepSeek-V2-Lite

A front router moves CPU work off the primary; it adds tokens/s only where the router's
process was the limit and the machine has cores to spare for another one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import replace

import httpx
import ray

from orchestrator.bench import BenchConfig, run_bench


def _serve(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "serving" in line and " on http://" in line:
            return proc, line.rsplit(" on ", 1)[1].strip()
        if "error" in line:
            print(line, end="", file=sys.stderr)
    raise RuntimeError(f"pdserve serve {' '.join(args)} exited with {proc.wait()}")


def _router_cpu(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.search(r"^pdserve_router_cpu_seconds_total (\S+)$", text, re.M)
    assert found is not None, "no pdserve_router_cpu_seconds_total on /metrics"
    return float(found.group(1))


async def _run(urls: list[str], cfg: BenchConfig) -> tuple[float, list[float], int]:
    """Output tok/s of `cfg`'s load split evenly over `urls`, each router's CPU s per 1k of
    its output tokens, and the failed requests."""
    n = len(urls)
    parts = [
        replace(cfg, url=u, num_prompts=cfg.num_prompts // n, concurrency=cfg.concurrency // n,
                seed=cfg.seed + i)
        for i, u in enumerate(urls)
    ]  # fmt: skip
    cpu_before = [_router_cpu(u) for u in urls]
    began = time.perf_counter()
    results = await asyncio.gather(*(run_bench(p) for p in parts))
    elapsed = time.perf_counter() - began
    cpu = [_router_cpu(u) - c for u, c in zip(urls, cpu_before, strict=True)]
    tokens = sum(r.output_tokens for r in results)
    per_1k = [c / max(1, r.output_tokens) * 1000 for c, r in zip(cpu, results, strict=True)]
    return tokens / elapsed, per_1k, sum(r.num_failed for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--address", help="a running Ray cluster's (default: a Ray of its own)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"] or ["--prefill-dp", "1", "--decode-dp", "1"]
    if args.address:
        ray.init(address=args.address, logging_level="ERROR")
    else:
        ray.init(logging_level="ERROR", num_cpus=max(16, os.cpu_count() or 1))
    gcs = ray.get_runtime_context().gcs_address
    name = f"bench-{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen[str]] = []
    try:
        primary, url = _serve(["--address", gcs, "--deployment", name, *extra])
        procs.append(primary)
        front, front_url = _serve(["--address", gcs, "--front", name])
        procs.append(front)
        cfg = BenchConfig(url, args.num_prompts, args.input_len, args.output_len,
                          args.concurrency)  # fmt: skip
        asyncio.run(_run([url, front_url], replace(cfg, num_prompts=2 * args.concurrency)))
        rows: dict[str, list[tuple[float, list[float], int]]] = {"one": [], "two": []}
        for r in range(args.rounds):
            for kind in ("one", "two") if r % 2 == 0 else ("two", "one"):
                urls = [url] if kind == "one" else [url, front_url]
                rows[kind].append(asyncio.run(_run(urls, replace(cfg, seed=r))))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "down", "--address", gcs,
                        "--deployment", name, "--force"], capture_output=True, timeout=120)  # fmt: skip
        ray.shutdown()
    print(f"pdserve serve {' '.join(extra)}: {args.num_prompts} streamed requests of "
          f"{args.input_len} / {args.output_len} tokens at concurrency {args.concurrency}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"{'routers':<28} {'output tok/s (runs)':<30} router CPU s / 1k output tokens")
    for kind, label in (("one", "primary alone"), ("two", "primary + front, half each")):
        runs = rows[kind]
        rates = " ".join(f"{t:.0f}" for t, _, _ in runs)
        mean = sum(t for t, _, _ in runs) / len(runs)
        cpu = " / ".join(
            f"{sum(c[i] for _, c, _ in runs) / len(runs):.3f}" for i in range(len(runs[0][1]))
        )
        failed = sum(f for _, _, f in runs)
        print(f"{label:<28} {f'{mean:.0f} ({rates})':<30} {cpu}"
              + (f"  ({failed} failed)" if failed else ""))  # fmt: skip
    return 0 if not any(f for runs in rows.values() for _, _, f in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
