"""Offline engine throughput (no HTTP, no Ray) against `transformers` `generate`, one run.

    .venv/bin/python benchmarks/offline.py --batch 32 --input-len 64 --output-len 64
    python benchmarks/offline.py --model v2-lite --device cuda --dtype bfloat16 \\
        --batch 1 32 128 --input-len 1024 --output-len 64 --transformers-output-len 16

`--model` is a checkpoint dir, a preset with random weights built on the device
(`workers.model.random_init.PRESETS`, e.g. `v2-lite`), or nothing (the built-in tiny model).
For each batch it prints the engine's prefill time and tok/s, the decode step time (median over
the run's steps), output tok/s, the same prompts through `transformers` batched greedy
`generate` (its decode step from two `generate` lengths), the ratio of decode throughputs, and
the bandwidth floor of a decode step: bytes it must read (weights it touches — every expert a
batch of B tokens routes to, in expectation — plus the KV cache) over the copy bandwidth
measured in the same run. Then peak memory and the KV capacity at 0.9 of device memory.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.kv_cache import KVCache
from workers.engine.messages import GenerateRequest, SamplingParams
from workers.model.model import DeepseekForCausalLM
from workers.model.random_init import PRESETS, preset_config, random_model
from workers.model.tiny import ensure_tiny_checkpoint

GIB = 1 << 30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (bytes read + written), best of 5."""
    if device.type != "cuda":
        num_bytes = min(num_bytes, 256 << 20)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def decode_step_bytes(
    model: DeepseekForCausalLM, batch: int, ctx_len: int, kv_bytes_per_token: int
) -> float:
    """Bytes a decode step of `batch` requests at context `ctx_len` must read: every weight
    but the embedding table (B rows of it), the routed experts that B tokens' top-k picks reach
    in expectation (uniform routing: a fraction 1 - (1 - k/E)^B of them), and the KV."""
    cfg = model.config
    total = 0.0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            continue
        if ".experts.w" in name:
            experts, top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
            size *= 1 - (1 - top_k / experts) ** batch
        total += size
    return total + batch * ctx_len * kv_bytes_per_token


def run_engine(
    engine: Engine, prompts: list[list[int]], output_len: int
) -> tuple[float, list[float], float]:
    """(seconds of the first step — the whole prefill —, each decode step's seconds, total)."""
    greedy = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(GenerateRequest(f"bench-{time.monotonic_ns()}-{i}", p, greedy))
    sync(engine.device)
    start = time.perf_counter()
    engine.step()  # sampling reads the tokens back: every step ends synchronized
    first = time.perf_counter() - start
    steps = []
    while engine.has_work:
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    return first, steps, time.perf_counter() - start


def hf_model(source: Path | dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    if isinstance(source, Path):
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        return model.to(device).eval()
    kwargs = dict(source)
    model_type = kwargs.pop("model_type")
    config_cls, model_cls = {
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    }[model_type]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config_cls(**kwargs))
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def run_transformers(
    model: Any, prompts: list[list[int]], output_len: int, device: torch.device
) -> tuple[float, float]:
    """(decode step seconds, seconds for `output_len` tokens) of batched greedy `generate`."""
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
        sync(device)
        return time.perf_counter() - start

    with torch.no_grad():
        model.generate(ids[:1, :8], attention_mask=mask[:1, :8], max_new_tokens=2)  # warm up
        one = generate(1)
        full = generate(output_len)
    return (full - one) / max(1, output_len - 1), full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help=f"checkpoint dir or random-weight preset ({', '.join(PRESETS)}); default: tiny",
    )
    parser.add_argument("--num-layers", type=int, help="a preset with this many layers")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--transformers-output-len", type=int, help="tokens per transformers run (default: same)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--fp8-experts", action="store_true", help="a preset's routed experts in FP8 (128x128)"
    )
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    max_batch = max(args.batch)
    ctx = args.input_len + args.output_len
    config = EngineConfig(
        kv_capacity_tokens=max_batch * (ctx + 16) + 1024,
        dtype=args.dtype,
        device=device.type,
        max_running_requests=max_batch,
        max_context_len=ctx + 16,
        chunked_prefill_size=max(2048, max_batch * args.input_len),
        cuda_graph_max_batch=0 if args.no_cuda_graphs else max_batch,
        enable_prefix_caching=False,  # measure the computation, whatever the prompts
    )
    source: Path | dict[str, Any]
    if args.model in PRESETS:
        source = preset_config(args.model, args.num_layers)
        name = args.model + (f"-{args.num_layers}l" if args.num_layers else "")
        name += "-fp8experts" if args.fp8_experts else ""
        model = random_model(
            source, device, dtype, max_positions=ctx + 16, fp8_experts=args.fp8_experts
        )
        engine = Engine(name, config, progress=False, model=model)
    else:
        source = Path(args.model) if args.model else ensure_tiny_checkpoint()
        name = source.name
        engine = Engine(source, config, progress=False)
    cfg = engine.model_config
    kv_per_token = KVCache.bytes_per_token(cfg.num_hidden_layers, cfg.kv_cache_dim, dtype)
    bandwidth = copy_bandwidth(device)
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"model {name} on {device} ({args.dtype}{threads}); {engine.fast_path()}; "
          f"in {args.input_len}, out {args.output_len}; copy {bandwidth / 1e9:.0f} GB/s")  # fmt: skip
    header = (
        f"{'batch':>5} {'prefill ms':>10} {'prefill tok/s':>13} {'decode ms':>9} "
        f"{'tok/s':>9} {'floor ms':>8} {'of floor':>8}"
    )
    if not args.no_transformers:
        header += f" {'hf decode ms':>12} {'hf tok/s':>9} {'ratio':>6}"
    print(header)
    run_engine(engine, [[1] * 8] * max_batch, 4)  # warm up (kernels, allocator)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch:
        prompts = torch.randint(2, cfg.vocab_size, (batch, args.input_len), generator=g).tolist()
        first, steps, total = run_engine(engine, prompts, args.output_len)
        step = statistics.median(steps) if steps else float("nan")
        mid_ctx = args.input_len + args.output_len // 2
        floor = decode_step_bytes(engine.model, batch, mid_ctx, kv_per_token) / bandwidth
        rows.append((batch, prompts, step))
        print(
            f"{batch:>5} {first * 1e3:>10.1f} {batch * args.input_len / first:>13.0f} "
            f"{step * 1e3:>9.2f} {batch * args.output_len / total:>9.1f} {floor * 1e3:>8.2f} "
            f"{floor / step:>8.0%}",
            flush=True,
        )
    if device.type == "cuda":
        kv_bytes = engine.kv.data.numel() * engine.kv.data.element_size()
        peak = torch.cuda.max_memory_allocated(device)
        total_mem = torch.cuda.get_device_properties(device).total_memory
        room = 0.9 * total_mem - (peak - kv_bytes)
        print(f"peak memory {peak / GIB:.1f} GiB (KV {kv_bytes / GIB:.1f} GiB); KV capacity at "
              f"0.9 of {total_mem / GIB:.0f} GiB: {int(room // kv_per_token):,} tokens")  # fmt: skip
    if args.no_transformers:
        return
    model_ref = engine.model
    del engine, model_ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = hf_model(source, device, dtype)
    hf_len = args.transformers_output_len or args.output_len
    print(f"transformers {hf_len} tokens per run:")
    for batch, prompts, step in rows:
        hf_step, hf_total = run_transformers(hf, prompts, hf_len, device)
        print(f"{batch:>5} {'':>10} {'':>13} {step * 1e3:>9.2f} {'':>9} {'':>8} {'':>8} "
              f"{hf_step * 1e3:>12.2f} {batch * hf_len / hf_total:>9.1f} "
              f"{hf_step / step:>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
