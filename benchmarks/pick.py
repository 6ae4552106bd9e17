"""What one pick of a request's ranks costs the router on a large deployment.

    .venv/bin/python benchmarks/pick.py [--ranks 256] [--picks 5000]

`RankTable.pick` over `--ranks` ranks (half prefill, half decode, random loads), for a short
prompt (no prefix affinity) and one of over 64 tokens (rendezvous hashing over each role), and
`RankTable.loads()` alone (the per-rank view every pick builds). Prints the mean per call.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.ranks import RankTable  # noqa: E402
from workers.engine.rank_reports import RankInfo  # noqa: E402


def table(num_ranks: int, seed: int = 0) -> RankTable:
    rng = random.Random(seed)
    out = RankTable([object() for _ in range(num_ranks)])
    capacity = 100_000
    for i in range(num_ranks):
        role = "prefill" if i < num_ranks // 2 else "decode"
        out.infos[i] = RankInfo("m", "deepseek_v3", 1000, 4096, (0,), capacity, 16,
                                capacity // 16, role=role, instance=i, migrates=True)  # fmt: skip
        out.reserved_tokens[i] = rng.randrange(capacity // 2)
        out.queued_prefill_tokens[i] = rng.randrange(5000)
    return out


def per_call_ms(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, default=256)
    p.add_argument("--picks", type=int, default=5000)
    args = p.parse_args()
    ranks = table(args.ranks)
    short, long = list(range(10)), list(range(100))
    print(f"{args.ranks} ranks, {args.picks} calls each")
    print(
        f"pick, no affinity:   {per_call_ms(lambda: ranks.pick(frozenset(), short), args.picks):.3f} ms"
    )
    print(
        f"pick, with affinity: {per_call_ms(lambda: ranks.pick(frozenset(), long), args.picks):.3f} ms"
    )
    print(f"loads():             {per_call_ms(ranks.loads, args.picks):.3f} ms")


if __name__ == "__main__":
    main()
