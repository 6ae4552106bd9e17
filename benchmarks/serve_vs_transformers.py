"""Throughput of the whole serving path against `transformers`' batched `generate`.

Starts `pdserve serve` as its own process (HTTP, router, Ray, engine rank), sends the benchmark
prompts through `/generate` with `pdserve bench`'s client, stops the server, then runs the same
prompts through `transformers` `generate` in batches on the same checkpoint, and prints both
output throughputs and their ratio. It runs `--repeat` pairs (default 3) — a fresh server
measured, stopped, then the peer measured at once — and reports the median of the pairs'
ratios: single runs on a small shared machine move by ±20% and the host's speed drifts over
minutes, so only runs close in time compare. Run it on an otherwise idle machine:

    .venv/bin/python benchmarks/serve_vs_transformers.py --num-prompts 128 --input-len 64 \\
        --output-len 64 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from orchestrator.bench import BenchConfig, make_prompts, run_bench
from workers.model.tiny import ensure_tiny_checkpoint


def start_server(model_dir: Path, port: int, extra: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--model", str(model_dir)]
    cmd += ["--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "serving" in line and "http://" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("pdserve serve did not come up")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_transformers(
    model_dir: Path,
    prompts: list[list[int]],
    output_len: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> float:
    """Output tokens per second of batched `generate` (prompts share one length), greedy or
    sampled as pdserve's requests are."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sampling: dict[str, object] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    warm = torch.tensor(prompts[:1])
    with torch.no_grad():
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2)
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[i : i + batch_size])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                min_new_tokens=output_len, pad_token_id=0, **sampling,
            )  # fmt: skip
            assert out.shape[1] == ids.shape[1] + output_len
        duration = time.perf_counter() - start
    return len(prompts) * output_len / duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the built-in tiny model")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: --concurrency")
    parser.add_argument("--port", type=int, default=30555)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve flag")
    parser.add_argument(
        "--no-stream", dest="stream", action="store_false",
        help="plain JSON calls to pdserve (transformers' generate does not stream either)",
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=float, default=0.0,
        help="sample on both sides at this temperature (default 0: greedy)",
    )  # fmt: skip
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each side; the medians are compared"
    )
    args = parser.parse_args()

    model_dir = args.model or ensure_tiny_checkpoint()
    with open(model_dir / "config.json") as f:
        vocab = json.load(f)["vocab_size"]
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed)

    print(f"model {model_dir.name}; {args.num_prompts} prompts x {args.input_len} tokens in, "
          f"{args.output_len} out; concurrency {args.concurrency}; {os.cpu_count()} CPUs; "
          f"{'streamed' if args.stream else 'not streamed'}; "
          f"{f'temperature {args.temperature:g}, top_p {args.top_p:g}' if args.temperature else 'greedy'}",
          flush=True)  # fmt: skip
    serve_args = [a for s in args.serve_arg for a in s.split()]
    cfg = BenchConfig(
        url=f"http://127.0.0.1:{args.port}", num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len,
        concurrency=args.concurrency, seed=args.seed, vocab_size=vocab, stream=args.stream,
        temperature=args.temperature, top_p=args.top_p,
    )  # fmt: skip
    hf_batch = args.hf_batch_size or args.concurrency
    # Paired runs: each pair starts a server, measures it, stops it, then measures the peer at
    # once, so that both sides of a pair see the same state of a shared host (whose speed
    # drifts by tens of percent over minutes); the ratio is the median of the pairs' ratios.
    results, hf_runs = [], []
    cpu_runs: list[dict[str, float]] = []
    for i in range(args.repeat):
        proc = start_server(model_dir, args.port, serve_args)
        try:
            asyncio.run(run_bench(BenchConfig(**{**cfg.__dict__, "num_prompts": args.concurrency})))
            processes = server_processes(proc.pid, cfg.url)
            before = cpu_seconds(processes)
            result = asyncio.run(run_bench(cfg))
            used = cpu_seconds(processes)
            cpu_runs.append({k: (used[k] - before[k]) for k in used})
            if result.num_failed:
                sys.exit(f"{result.num_failed} requests failed: {result.first_error}")
        finally:
            stop_server(proc)
        results.append(result)
        hf_runs.append(
            bench_transformers(
                model_dir, prompts, args.output_len, hf_batch, args.temperature, args.top_p
            )
        )
        print(f"pair {i + 1}: pdserve {result.output_tok_s:.0f} tok/s, transformers "
              f"{hf_runs[-1]:.0f} tok/s, ratio {result.output_tok_s / hf_runs[-1]:.2f}x",
              flush=True)  # fmt: skip
    # The run with the median throughput stands for the server's latencies.
    print(sorted(results, key=lambda r: r.output_tok_s)[len(results) // 2].table())
    ratios = [r.output_tok_s / h for r, h in zip(results, hf_runs, strict=True)]
    print()
    print(f"{'':34}{'output tok/s (median)':>22}  runs")
    topology = "colocated" if "--colocated" in serve_args else "disaggregated"
    ours = statistics.median(r.output_tok_s for r in results)
    runs = " ".join(f"{r.output_tok_s:.0f}" for r in results)
    print(f"{f'pdserve ({topology}, HTTP + Ray)':34}{ours:>22.1f}  {runs}")
    hf_label = f"transformers generate (batch {hf_batch})"
    hf_runs_text = " ".join(f"{t:.0f}" for t in hf_runs)
    print(f"{hf_label:34}{statistics.median(hf_runs):>22.1f}  {hf_runs_text}")
    ratio_runs = " ".join(f"{r:.2f}" for r in ratios)
    print(f"{'ratio (median of pairs)':34}{statistics.median(ratios):>21.2f}x  {ratio_runs}")
    # Where the server's CPU goes: seconds of CPU per 1000 output tokens, per process (less
    # sensitive than tokens/s to the host's drift; the same work on fewer cores is faster).
    per_k = {
        name: statistics.median(run[name] / (r.output_tokens / 1000) for run, r in
                                zip(cpu_runs, results, strict=True))
        for name in cpu_runs[0]
    }  # fmt: skip
    shown = ", ".join(f"{name} {sec:.3f}" for name, sec in per_k.items())
    print(f"CPU s per 1k output tokens (median): {shown}; all {sum(per_k.values()):.3f}")


def server_processes(server_pid: int, url: str) -> dict[str, psutil.Process]:
    """The router (the `pdserve serve` process) and each engine rank, by role."""
    import httpx

    out = {"router": psutil.Process(server_pid)}
    ranks = httpx.get(f"{url}/v1/stats", timeout=10, trust_env=False).json()["ranks"]
    for r in ranks:
        info = r["info"]
        name = f"{info['role']} rank" + (f" {r['rank']}" if len(ranks) > 2 else "")
        out[name] = psutil.Process(info["pid"])
    return out


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds of each process (its threads included) so far."""
    out = {}
    for name, p in processes.items():
        t = p.cpu_times()
        out[name] = t.user + t.system
    return out


if __name__ == "__main__":
    main()
