"""Expert-parallel pool throughput: 1, 2, 4 ranks (real processes, gloo), two-batch overlap off
and on, beside the plain single-rank engine; and the cost of recording the expert load.

    .venv/bin/python benchmarks/ep_pool.py --ranks 1 2 4 --batch 32 --input-len 64 --output-len 64

Every rank gets `--batch` requests (DP attention: the pool's batch is ranks x batch) and the
ranks step in lockstep. Prints, per configuration, the decode step time (median), the prefill
time and the pool's output tok/s. One thread per rank; on a machine with fewer cores than ranks
the ranks share cores, so the numbers show the protocol's cost, not a speed-up.
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
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams
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


def _rank_main(rank: int, world: int, store: str, args: argparse.Namespace, queue: Any) -> None:
    from workers.ep.group import PoolGroup
    from workers.ep.setup import build_ep_context
    from workers.model.config import ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)  # fmt: skip
    group = PoolGroup(rank, world, dist.group.WORLD, dist.group.WORLD)  # type: ignore[arg-type]
    model_dir = ensure_tiny_checkpoint()
    for tbo in (False, True):
        config = EngineConfig(
            page_size=16, kv_capacity_tokens=65536, device="cpu", enable_two_batch_overlap=tbo,
            num_redundant_experts=args.redundant,
        )  # fmt: skip
        ctx = build_ep_context(ModelConfig.from_dir(Path(model_dir)), config, "colocated", rank,
                               world, None)  # fmt: skip
        engine = Engine(model_dir, config, progress=False, ep=ctx)

        def step(engine: Engine = engine) -> bool:
            if not group.any_has_work(engine.has_work):
                return False
            engine.step(run_empty=True)
            return True

        _run(engine, argparse.Namespace(**{**vars(args), "output_len": 4}), rank, step)  # warm-up
        queue.put((rank, tbo, _run(engine, args, rank, step)))
    dist.destroy_process_group()


def run_pool(world: int, args: argparse.Namespace) -> dict[bool, list[dict[str, float]]]:
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
        out: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(2 * world):
            _, tbo, result = queue.get(timeout=1800)
            out[tbo].append(result)
        for p in procs:
            p.join()
    return out


def run_single(args: argparse.Namespace, record_load: bool) -> dict[str, float]:
    torch.set_num_threads(1)
    config = EngineConfig(page_size=16, kv_capacity_tokens=65536, device="cpu",
                          record_expert_load=record_load)  # fmt: skip
    engine = Engine(ensure_tiny_checkpoint(), config, progress=False)

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
    args = parser.parse_args()
    print(f"tiny model; {args.batch} requests per rank, {args.input_len} in / "
          f"{args.output_len} out; {os.cpu_count()} CPUs")  # fmt: skip
    header = f"{'configuration':34} {'prefill ms':>10} {'decode ms':>10} {'tok/s':>9}"
    print(header)

    def row(name: str, results: list[dict[str, float]]) -> None:
        prefill = max(r["prefill_s"] for r in results) * 1000
        decode = max(r["decode_step_s"] for r in results) * 1000
        tps = sum(r["tokens"] for r in results) / max(r["total_s"] for r in results)
        print(f"{name:34} {prefill:10.1f} {decode:10.2f} {tps:9.0f}")

    row("single rank, load recording off", [run_single(args, record_load=False)])
    row("single rank, load recording on", [run_single(args, record_load=True)])
    for world in args.ranks:
        results = run_pool(world, args)
        row(f"EP pool of {world}, two-batch overlap off", results[False])
        row(f"EP pool of {world}, two-batch overlap on", results[True])


if __name__ == "__main__":
    main()
