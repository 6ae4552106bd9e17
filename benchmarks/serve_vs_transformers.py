"""Throughput of the whole serving path against `transformers`' batched `generate`.

Starts `pdserve serve` as its own process (HTTP, router, Ray, engine rank), sends the benchmark
prompts through `/generate` with `pdserve bench`'s client, stops the server, then runs the same
prompts through `transformers` `generate` in batches on the same checkpoint, and prints both
output throughputs and their ratio. Each side runs `--repeat` times (default 3) and the medians
are compared: single runs on a small shared machine move by ±20%. Run it on an otherwise idle
machine:

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
    model_dir: Path, prompts: list[list[int]], output_len: int, batch_size: int
) -> float:
    """Output tokens per second of batched greedy `generate` (prompts share one length)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    warm = torch.tensor(prompts[:1])
    with torch.no_grad():
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2)
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[i : i + batch_size])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                min_new_tokens=output_len, do_sample=False, pad_token_id=0,
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
        "--repeat", type=int, default=3, help="runs of each side; the medians are compared"
    )
    args = parser.parse_args()

    model_dir = args.model or ensure_tiny_checkpoint()
    with open(model_dir / "config.json") as f:
        vocab = json.load(f)["vocab_size"]
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed)

    print(f"model {model_dir.name}; {args.num_prompts} prompts x {args.input_len} tokens in, "
          f"{args.output_len} out; concurrency {args.concurrency}; {os.cpu_count()} CPUs",
          flush=True)  # fmt: skip
    proc = start_server(model_dir, args.port, [a for s in args.serve_arg for a in s.split()])
    try:
        cfg = BenchConfig(
            url=f"http://127.0.0.1:{args.port}", num_prompts=args.num_prompts,
            input_len=args.input_len, output_len=args.output_len,
            concurrency=args.concurrency, seed=args.seed, vocab_size=vocab,
        )  # fmt: skip
        asyncio.run(run_bench(BenchConfig(**{**cfg.__dict__, "num_prompts": args.concurrency})))
        results = []
        for _ in range(args.repeat):
            results.append(asyncio.run(run_bench(cfg)))
            if results[-1].num_failed:
                sys.exit(f"{results[-1].num_failed} requests failed: {results[-1].first_error}")
    finally:
        stop_server(proc)
    # The run with the median throughput stands for the server.
    result = sorted(results, key=lambda r: r.output_tok_s)[len(results) // 2]
    print(result.table())

    hf_runs = [
        bench_transformers(
            model_dir, prompts, args.output_len, args.hf_batch_size or args.concurrency
        )
        for _ in range(args.repeat)
    ]
    hf_tok_s = statistics.median(hf_runs)
    print()
    print(f"{'':34}{'output tok/s (median)':>22}  runs")
    serve_args = [a for s in args.serve_arg for a in s.split()]
    topology = "colocated" if "--colocated" in serve_args else "disaggregated"
    runs = " ".join(f"{r.output_tok_s:.0f}" for r in results)
    print(f"{f'pdserve ({topology}, HTTP + Ray)':34}{result.output_tok_s:>22.1f}  {runs}")
    hf_label = f"transformers generate (batch {args.hf_batch_size or args.concurrency})"
    print(f"{hf_label:34}{hf_tok_s:>22.1f}  {' '.join(f'{t:.0f}' for t in hf_runs)}")
    print(f"{'ratio':34}{result.output_tok_s / hf_tok_s:>21.2f}x")


if __name__ == "__main__":
    main()
