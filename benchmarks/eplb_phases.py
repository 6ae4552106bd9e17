"""Expert rebalance phases on a pool of 2 ranks (real processes, gloo): load (disk → host),
prepare (host → device/staging), execute (the pause) against the number of experts moved.

    .venv/bin/python benchmarks/eplb_phases.py --moves 1 4 16 32 [--device cuda]

A synthetic checkpoint (the tiny model's layout with `--hidden`, `--moe-intermediate`,
`--experts`, bf16) is written once to a temp dir. Each row moves `k` experts per rank per MoE
layer (slots swapped between the two ranks, so every moved slot really gets other weights) and
prints each phase's time on the slower rank and the bytes moved.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from workers.model.tiny import _weights, tiny_config


def write_checkpoint(path: Path, args: argparse.Namespace) -> None:
    cfg = tiny_config(1024, 0, 1)
    cfg.update(
        hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
        intermediate_size=2 * args.hidden, n_routed_experts=args.experts, n_group=1,
        topk_group=1, num_hidden_layers=3, torch_dtype="bfloat16",
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    weights = {k: v.to(torch.bfloat16) for k, v in _weights(cfg).items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _rank_main(rank: int, store: str, model_dir: str, args: argparse.Namespace, q: Any) -> None:
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.ep.rebalance import RankRebalancer
    from workers.ep.setup import build_ep_context
    from workers.model.config import ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    config = EngineConfig(page_size=16, kv_capacity_tokens=1024, device=args.device,
                          dtype="bfloat16")  # fmt: skip
    ctx = build_ep_context(ModelConfig.from_dir(Path(model_dir)), config, "colocated", rank, 2,
                           None)  # fmt: skip
    engine = Engine(model_dir, config, progress=False, ep=ctx)
    rebalancer = RankRebalancer(engine.model, ctx, model_dir)
    slots = ctx.placement.slots_per_rank
    for k in args.moves:
        phy2log = ctx.placement.phy2log.clone()
        for layer in range(phy2log.shape[0]):
            for i in range(k):  # swap slot i of rank 0 with slot i of rank 1
                a, b = i, slots + i
                phy2log[layer, a], phy2log[layer, b] = (
                    phy2log[layer, b].item(),
                    phy2log[layer, a].item(),
                )
        loaded = rebalancer.load(phy2log)
        prepared = rebalancer.prepare()
        dist.barrier()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        executed = rebalancer.execute()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        pause = time.perf_counter() - start
        q.put((rank, k, loaded.seconds, prepared.seconds, pause, executed.num_experts,
               executed.num_bytes))  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-intermediate", type=int, default=704)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        write_checkpoint(model_dir, args)
        expert_mb = 3 * args.hidden * args.moe_intermediate * 2 / 1e6
        print(f"pool of 2 ranks, {args.experts} experts of {expert_mb:.1f} MB (bf16), 2 MoE "
              f"layers, device {args.device}")  # fmt: skip
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(r, f"{tmp}/store", str(model_dir), args, q))
                 for r in range(2)]  # fmt: skip
        for p in procs:
            p.start()
        rows: dict[int, list[Any]] = {}
        for _ in range(2 * len(args.moves)):
            _, k, load_s, prep_s, pause_s, n, nbytes = q.get(timeout=1800)
            rows.setdefault(k, []).append((load_s, prep_s, pause_s, n, nbytes))
        for p in procs:
            p.join()
    print(f"{'moved/rank':>10} {'MB/rank':>8} {'load ms':>8} {'prepare ms':>10} {'pause ms':>9}")
    for k in args.moves:
        r = rows[k]
        print(f"{max(x[3] for x in r):10d} {max(x[4] for x in r) / 1e6:8.1f} "
              f"{max(x[0] for x in r) * 1000:8.1f} {max(x[1] for x in r) * 1000:10.1f} "
              f"{max(x[2] for x in r) * 1000:9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
