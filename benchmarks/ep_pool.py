"""Expert-parallel pool throughput: 1, 2, 4 ranks (real processes, gloo), two-batch overlap off
and on, beside the plain single-rank engine; and the cost of recording the expert load.

    .venv/bin/python benchmarks/ep_pool.py --ranks 1 2 4 --batch 32 --input-len 64 --output-len 64
    python benchmarks/ep_pool.py --device cuda --dtype bfloat16 --model v2-lite --num-layers 8 \
        --ranks 1 --grouped-gemm-backend torch deep_gemm --batch 64 --input-len 512

Every rank gets `--batch` requests (DP attention: the pool's batch is ranks x batch) and the
ranks step in lockstep. Prints, per configuration, the decode step time (median), the prefill
time and the pool's output tok/s. One thread per rank; on a machine with fewer cores than ranks
the ranks share cores, so the numbers show the protocol's cost, not a speed-up.

`--device cuda`: the ranks form an NCCL group (rank r on GPU r modulo the GPU count) and each
`--grouped-gemm-backend` is measured in turn: `torch` (on CUDA, the Triton fused MoE kernel over
the dispatcher's layout) and `deep_gemm` (FP8, where the package imports; reported as unavailable
otherwise). `--model` takes a checkpoint dir or a random-weight preset (`v2-lite`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine, resolve_device
from workers.engine.messages import GenerateRequest, SamplingParams
from workers.model.random_init import PRESETS, preset_config, random_model
from workers.model.tiny import ensure_tiny_checkpoint


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (length,), generator=g).tolist() for _ in range(n)]


def _run(engine: Engine, args: argparse.Namespace, rank: int, step: Any) -> dict[str, float]:
    sp = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts(args.batch, args.input_len, seed=rank)):
        engine.add(GenerateRequest(f"b{rank}-{i}-{time.monotonic_ns()}", p, sp))
    times = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        if not step():
            break
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {
        "prefill_s": times[0],
        "decode_step_s": statistics.median(times[1:]),
        "total_s": total,
        "tokens": args.batch * args.output_len,
    }


def _engine(
    args: argparse.Namespace, config: EngineConfig, ep: Any = None, rank: int = 0
) -> Engine:
    """The benchmark's engine: a checkpoint, or a random-weight preset built on the device."""
    if args.model in PRESETS:
        hf = preset_config(args.model, args.num_layers)
        model = random_model(
            hf, resolve_device(config.device), getattr(torch, config.dtype), seed=rank, ep=ep,
            max_positions=args.input_len + args.output_len + 16,
        )  # fmt: skip
        return Engine(args.model, config, progress=False, ep=ep, model=model)
    return Engine(args.model or ensure_tiny_checkpoint(), config, progress=False, ep=ep)


def _model_config(args: argparse.Namespace) -> Any:
    from workers.model.config import ModelConfig

    if args.model in PRESETS:
        return ModelConfig.from_hf(preset_config(args.model, args.num_layers))
    return ModelConfig.from_dir(Path(args.model or ensure_tiny_checkpoint()))


def _rank_main(rank: int, world: int, store: str, args: argparse.Namespace, queue: Any) -> None:
    from workers.ep.group import PoolGroup
    from workers.ep.setup import build_ep_context

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store, world),
                            rank=rank, world_size=world)  # fmt: skip
    group = PoolGroup(rank, world, dist.group.WORLD, dist.group.WORLD)  # type: ignore[arg-type]
    for backend, tbo in [(b, t) for b in args.grouped_gemm_backend for t in (False, True)]:
        config = EngineConfig(
            page_size=16, kv_capacity_tokens=args.batch * (args.input_len + args.output_len + 32),
            device=args.device, dtype=args.dtype, enable_two_batch_overlap=tbo,
            num_redundant_experts=args.redundant, grouped_gemm_backend=backend,
            max_context_len=args.input_len + args.output_len + 16,
        )  # fmt: skip
        ctx = build_ep_context(_model_config(args), config, "colocated", rank, world, None)
        try:
            engine = _engine(args, config, ctx, rank)
        except ValueError as e:  # deep_gemm where it does not import
            queue.put((rank, (backend, tbo), {"error": str(e)}))
            continue

        def step(engine: Engine = engine) -> bool:
            if not group.any_has_work(engine.has_work):
                return False
            engine.step(run_empty=True)
            return True

        _run(engine, argparse.Namespace(**{**vars(args), "output_len": 4}), rank, step)  # warm-up
        queue.put((rank, (backend, tbo), _run(engine, args, rank, step)))
        del engine
        if cuda:
            torch.cuda.empty_cache()
    dist.destroy_process_group()


def run_pool(world: int, args: argparse.Namespace) -> dict[tuple[str, bool], list[dict[str, Any]]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, f"{tmp}/store", args, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        out: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        for _ in range(2 * world * len(args.grouped_gemm_backend)):
            _, key, result = queue.get(timeout=1800)
            out.setdefault(key, []).append(result)
        for p in procs:
            p.join()
    return out


def run_single(args: argparse.Namespace, record_load: bool) -> dict[str, float]:
    torch.set_num_threads(1)
    config = EngineConfig(
        page_size=16, kv_capacity_tokens=args.batch * (args.input_len + args.output_len + 32),
        device=args.device, dtype=args.dtype, record_expert_load=record_load,
        max_context_len=args.input_len + args.output_len + 16,
    )  # fmt: skip
    engine = _engine(args, config)

    def step() -> bool:
        if not engine.has_work:
            return False
        engine.step()
        return True

    _run(engine, argparse.Namespace(**{**vars(args), "output_len": 4}), 0, step)
    return _run(engine, args, 0, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32, help="requests per rank")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--redundant", type=int, default=0, help="redundant expert slots")
    parser.add_argument("--model", help=f"checkpoint dir or preset ({', '.join(PRESETS)})")
    parser.add_argument("--num-layers", type=int, help="a preset with this many layers")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--grouped-gemm-backend", nargs="+", default=["torch"], choices=("torch", "deep_gemm")
    )
    args = parser.parse_args()
    print(f"{args.model or 'tiny model'} on {args.device} ({args.dtype}); {args.batch} requests "
          f"per rank, {args.input_len} in / {args.output_len} out; {os.cpu_count()} CPUs")  # fmt: skip
    header = f"{'configuration':48} {'prefill ms':>10} {'decode ms':>10} {'tok/s':>9}"
    print(header)

    def row(name: str, results: list[dict[str, Any]]) -> None:
        if any("error" in r for r in results):
            print(f"{name:48} unavailable: {results[0].get('error', '')}")
            return
        prefill = max(r["prefill_s"] for r in results) * 1000
        decode = max(r["decode_step_s"] for r in results) * 1000
        tps = sum(r["tokens"] for r in results) / max(r["total_s"] for r in results)
        print(f"{name:48} {prefill:10.1f} {decode:10.2f} {tps:9.0f}")

    row("single rank, load recording off", [run_single(args, record_load=False)])
    row("single rank, load recording on", [run_single(args, record_load=True)])
    for world in args.ranks:
        results = run_pool(world, args)
        for backend in args.grouped_gemm_backend:
            gemm = f", {backend}" if len(args.grouped_gemm_backend) > 1 else ""
            row(f"EP pool of {world}{gemm}, two-batch overlap off", results[(backend, False)])
            row(f"EP pool of {world}{gemm}, two-batch overlap on", results[(backend, True)])


if __name__ == "__main__":
    main()
