"""Rank processes for multi-rank tests: spawned (a fresh interpreter each, as Ray's workers
are), one OpenMP thread each so that several share the CPUs, reporting on a queue."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.multiprocessing as mp


@contextmanager
def rank_processes(
    target: Callable[..., None], world: int, *args: Any
) -> Iterator[Any]:  # -> the queue
    """Start `target(rank, *args, queue)` in `world` processes; yields the queue they put
    their results on. On leaving, each is joined (killed after 30 s)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, queue)) for r in range(world)]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by each child as it starts
    try:
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    try:
        yield queue
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
