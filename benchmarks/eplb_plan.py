"""EPLB planning time and quality at DeepSeek-V3 scale, ours against the reference's algorithm.

    .venv/bin/python benchmarks/eplb_plan.py [--layers 61 --experts 256 --replicas 288 ...]

A skewed (log-normal) load; the incremental planner starts from the scratch plan of the same
load before a multiplicative drift. Prints the median planning time of a few runs, the mean and
worst per-layer balancedness (mean / max GPU load) and the slots that change expert.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eplb import balancedness, num_moves, rebalance_experts, rebalance_experts_incremental  # noqa: E402
from tests.test_eplb_algorithm import reference_phy2log  # noqa: E402


def median_seconds(fn: Callable[[], torch.Tensor], runs: int) -> tuple[float, torch.Tensor]:
    times, out = [], torch.empty(0)
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=288)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=32)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the load")
    parser.add_argument("--drift", type=float, default=0.2, help="log-normal load drift")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.layers, args.experts)
    old_weight = (torch.exp(torch.randn(shape, generator=gen) * args.sigma) * 1000).round()
    weight = (old_weight * torch.exp(torch.randn(shape, generator=gen) * args.drift)).round()
    layout = (args.groups, args.nodes, args.gpus)
    old = rebalance_experts(old_weight, args.replicas, *layout).phy2log

    plans = {
        "reference": lambda: reference_phy2log(weight, args.replicas, *layout),
        "ours": lambda: rebalance_experts(weight, args.replicas, *layout).phy2log,
        "incremental": lambda: rebalance_experts_incremental(weight, old, *layout).phy2log,
    }
    print(
        f"{args.layers} layers x {args.experts} experts -> {args.replicas} slots on {args.gpus} "
        f"GPUs ({args.nodes} nodes, {args.groups} groups), sigma={args.sigma}, "
        f"drift={args.drift}, median of {args.runs} runs"
    )
    print(f"{'planner':<12} {'time_ms':>9} {'bal_mean':>9} {'bal_min':>9} {'moves':>7}")
    old_bal = balancedness(weight, old, args.gpus)
    print(f"{'old plan':<12} {'-':>9} {old_bal.mean():9.4f} {old_bal.min():9.4f} {0:7d}")
    for name, fn in plans.items():
        seconds, phy2log = median_seconds(fn, args.runs)
        bal = balancedness(weight, phy2log, args.gpus)
        moves = num_moves(old, phy2log)
        print(f"{name:<12} {seconds * 1e3:9.1f} {bal.mean():9.4f} {bal.min():9.4f} {moves:7d}")


if __name__ == "__main__":
    main()
