"""KV transfer throughput: NIXL between two Ray actor processes vs a plain copy of the same pages.

    .venv/bin/python benchmarks/kv_transfer.py [--device cuda]

For each request size, the sender process writes the request's pages (every layer) into the
receiver's pool and the receiver waits for the completion notification; the time is measured
on the receiver from `send` to the notification (`elapsed_s` of the sender's result, the first
transfer to a peer excluded as warm-up). The reference is `index_copy_` of the same pages
between two pools inside one process. Each size runs twice: pages scattered at random on both
sides (one descriptor per page and layer: the worst case) and consecutive (one run per side:
one descriptor per layer, what the engine's allocator hands out while a free run is long
enough). First, the runs per request that the allocator gives under a churn of requests, beside
a plain free-page stack.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import ray
import torch

from workers.engine.kv_cache import PageAllocator
from workers.engine.prefix_cache import CachingAllocator
from workers.transfer import create_transfer_engine
from workers.transfer.pages import page_runs


class Rank:
    def __init__(self, layers: int, pages: int, page_size: int, dim: int, dtype: str, device: str):
        self.kv = torch.randn(layers, pages * page_size, dim).to(getattr(torch, dtype)).to(device)
        self.engine = create_transfer_engine("nixl", f"bench-{time.time_ns()}", self.kv, page_size)

    def expect(self, tid: str, pages: list[int]):
        return self.engine.expect(tid, pages, 60).target

    def send_and_wait(self, tid: str, pages: list[int], target) -> float:
        self.engine.send(tid, pages, 1, 60, target)
        while True:
            for r in self.engine.poll():
                if not r.ok:
                    raise RuntimeError(r.error)
                return r.elapsed_s
            time.sleep(0.0002)

    def wait_recv(self) -> bool:
        while True:
            for r in self.engine.poll():
                return r.ok
            time.sleep(0.0002)


def local_copy_s(layers, pages, page_size, dim, dtype, device, num_pages, reps) -> float:
    src = torch.randn(layers, pages, page_size * dim).to(getattr(torch, dtype)).to(device)
    dst = torch.zeros_like(src)
    idx = torch.randperm(pages)[:num_pages].to(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.index_copy_(1, idx, src.index_select(1, idx))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _StackAllocator:
    """A free-page stack (last freed, first reused): the comparison for `PageAllocator`."""

    def __init__(self, num_pages: int):
        self.free_pages = list(range(num_pages - 1, -1, -1))

    def allocate(self, n: int) -> list[int]:
        return [self.free_pages.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self.free_pages.extend(pages)


class _Publishing:
    """The engine's allocator with prefix caching where every request publishes all its
    pages before it ends and none is ever reused: freed pages go idle and must be reclaimed."""

    def __init__(self, num_pages: int, page_size: int = 16):
        self.pages = CachingAllocator(PageAllocator(num_pages), page_size)
        self.page_size = page_size
        self.next_token = 0

    def allocate(self, n: int) -> list[int]:
        return self.pages.allocate(n)

    def free(self, pages: list[int]) -> None:
        num = len(pages) * self.page_size
        tokens = range(self.next_token, self.next_token + num)  # distinct: never matched
        self.next_token += num
        self.pages.publish(tokens, pages, 0, b"", num)
        self.pages.free(pages)


def churn_runs(allocator, num_pages: int, seed: int = 0) -> tuple[float, float]:
    """(mean, p90) runs of consecutive pages per prompt allocation over 5000 requests arriving
    and leaving at random (prompts of 1-64 pages, at most 90% of the pool in use), as a decode
    rank's reservations see them; a request also grows by single pages while it lives."""
    rng = random.Random(seed)
    live: list[list[int]] = []
    used, runs = 0, []
    for _ in range(5000):
        while live and (used > 0.9 * num_pages - 64 or rng.random() < 0.5):
            pages = live.pop(rng.randrange(len(live)))
            allocator.free(pages)
            used -= len(pages)
        n = rng.randint(1, 64)
        pages = allocator.allocate(n)
        runs.append(len(page_runs(tuple(pages), tuple(range(n)))))
        used += n
        if live and rng.random() < 0.5:  # a running request takes a page for its next tokens
            live[rng.randrange(len(live))] += allocator.allocate(1)
            used += 1
        live.append(pages)
    runs.sort()
    return statistics.mean(runs), runs[int(0.9 * len(runs))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    gpus = 0.5 if args.device == "cuda" else 0
    ray.init(num_cpus=4, num_gpus=1 if gpus else 0, include_dashboard=False, log_to_driver=False)
    layouts = [  # (name, layers, kv_dim, dtype, page_size, tokens per request)
        ("tiny fp32", 4, 80, "float32", 16, [256, 2048, 16384]),
        ("V3 bf16", 61, 576, "bfloat16", 64, [1024, 4096, 16384]),
    ]
    num_pages = 4096
    for label, allocator in (("PageAllocator", PageAllocator(num_pages)),
                             ("prefix caching, no reuse", _Publishing(num_pages)),
                             ("free-page stack", _StackAllocator(num_pages))):  # fmt: skip
        mean, p90 = churn_runs(allocator, num_pages)
        print(f"runs per request under churn ({num_pages} pages), {label}: "
              f"mean {mean:.2f}, p90 {p90}")  # fmt: skip
    print(f"device {args.device}; median of {args.reps}; GB/s = request KV bytes / time")
    print(f"{'layout':<10} {'tokens':>7} {'pages':>11} {'MB':>8} {'nixl ms':>9} "
          f"{'nixl GB/s':>10} {'copy ms':>9} {'copy GB/s':>10}")  # fmt: skip
    for name, layers, dim, dtype, page_size, sizes in layouts:
        pages = max(sizes) // page_size + 8
        cls = ray.remote(num_cpus=0.5, num_gpus=gpus)(Rank)
        src = cls.remote(layers, pages, page_size, dim, dtype, args.device)
        dst = cls.remote(layers, pages, page_size, dim, dtype, args.device)
        elem = torch.finfo(getattr(torch, dtype)).bits // 8
        for i, tokens in enumerate(sizes):
            n = tokens // page_size
            copy_s = local_copy_s(layers, pages, page_size, dim, dtype, args.device, n, args.reps)
            size = n * page_size * layers * dim * elem
            for mode in ("scattered", "consecutive"):
                times = []
                for rep in range(args.reps + 1):
                    tid = f"{i}-{mode}-{rep}"
                    if mode == "scattered":
                        src_pages = torch.randperm(pages)[:n].tolist()
                        dst_pages = torch.randperm(pages)[:n].tolist()
                    else:
                        src_pages, dst_pages = list(range(n)), list(range(4, 4 + n))
                    target = ray.get(dst.expect.remote(tid, dst_pages))
                    elapsed = ray.get(src.send_and_wait.remote(tid, src_pages, target))
                    assert ray.get(dst.wait_recv.remote())
                    if rep:
                        times.append(elapsed)
                nixl_s = statistics.median(times)
                print(f"{name:<10} {tokens:>7} {mode:>11} {size / 1e6:>8.1f} "
                      f"{nixl_s * 1e3:>9.2f} {size / nixl_s / 1e9:>10.2f} {copy_s * 1e3:>9.2f} "
                      f"{size / copy_s / 1e9:>10.2f}", flush=True)  # fmt: skip
        ray.kill(src)
        ray.kill(dst)


if __name__ == "__main__":
    main()
