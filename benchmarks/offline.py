"""Offline engine throughput (no HTTP, no Ray) against `transformers` `generate`, one run.

    .venv/bin/python benchmarks/offline.py --batch 32 --input-len 64 --output-len 64

Prints the engine's prefill time, decode step time and output tok/s, the same prompts through
`transformers` batched greedy `generate`, and the ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams
from workers.model.tiny import ensure_tiny_checkpoint


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(engine: Engine, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(seconds of the first step — the whole prefill when it fits the budget —, total seconds)."""
    greedy = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(GenerateRequest(f"bench-{time.monotonic_ns()}-{i}", p, greedy))
    sync(engine.device)
    start = time.perf_counter()
    engine.step()
    sync(engine.device)
    first = time.perf_counter() - start
    while engine.has_work:
        engine.step()
    sync(engine.device)
    return first, time.perf_counter() - start


def run_transformers(
    model_dir: Path, prompts: list[list[int]], output_len: int, device: torch.device, dtype: str
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2)
        sync(device)
        start = time.perf_counter()
        model.generate(
            ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
        sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the built-in tiny model")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = args.model or ensure_tiny_checkpoint()
    max_batch = max(args.batch)
    kv_tokens = max_batch * (args.input_len + args.output_len) + 1024
    engine = Engine(
        model_dir,
        EngineConfig(
            kv_capacity_tokens=kv_tokens,
            dtype=args.dtype,
            device=args.device,
            max_running_requests=max_batch,
            chunked_prefill_size=max(2048, max_batch * args.input_len),
        ),  # fmt: skip
        progress=False,
    )
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    print(f"model {model_dir.name} on {engine.device} ({args.dtype}), "
          f"{torch.get_num_threads()} CPU threads; in {args.input_len}, out {args.output_len}")  # fmt: skip
    print(f"{'batch':>6} {'prefill ms':>11} {'decode ms/step':>15} {'pdserve tok/s':>14} "
          f"{'transformers tok/s':>19} {'ratio':>6}")  # fmt: skip
    run_engine(engine, [[1] * 8], 4)  # warm up
    for batch in args.batch:
        prompts = torch.randint(2, vocab, (batch, args.input_len), generator=g).tolist()
        first, total = run_engine(engine, prompts, args.output_len)
        decode_ms = (total - first) / max(1, args.output_len - 1) * 1000
        ours = batch * args.output_len / total
        line = f"{batch:>6} {first * 1000:>11.1f} {decode_ms:>15.2f} {ours:>14.1f}"
        if not args.no_transformers:
            hf = (
                batch
                * args.output_len
                / run_transformers(model_dir, prompts, args.output_len, engine.device, args.dtype)
            )
            line += f" {hf:>19.1f} {ours / hf:>6.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
