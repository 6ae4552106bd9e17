"""Conformance of every EP dispatcher backend against a plain-torch MoE, on real processes.

Processes are spawned once per (world size, backend family) and run every case of every backend
of that family; each rank records its assertion failures (never raising mid-case, so that all
ranks keep making the same collective calls), and the parametrized test reads them back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from workers.ep import ExpertPlacement, create_dispatcher, run_local_experts
from workers.ep.deepep import deepep_available

BACKENDS = ["torch-normal", "torch-low-latency", "deepep-normal", "deepep-low-latency"]
WORLD_SIZES = [1, 2, 4]
HIDDEN, INTER, NUM_LAYERS, LAYER = 16, 8, 2, 1


@dataclass(frozen=True)
class Case:
    name: str
    num_logical: int
    num_redundant: int
    top_k: int
    tokens_per_rank: tuple[int, ...]  # rank r has tokens_per_rank[r % len] tokens
    capacity_per_expert: int = 8
    hot_expert: bool = False  # every token picks expert 0: overflows a small capacity
    shuffled: bool = False  # a random phy2log instead of the default placement


CASES = [
    Case("plain", num_logical=8, num_redundant=0, top_k=2, tokens_per_rank=(6, 0, 11, 3)),
    Case("redundant", num_logical=8, num_redundant=4, top_k=3, tokens_per_rank=(0, 5, 2, 9)),
    Case("shuffled", 6, 2, 2, (4, 7, 0, 1), shuffled=True),
    Case("overflow", 8, 0, 2, (11, 0, 7, 3), capacity_per_expert=2, hot_expert=True),
]


def _placement(case: Case, world_size: int) -> ExpertPlacement:
    if not case.shuffled:
        return ExpertPlacement.default(NUM_LAYERS, case.num_logical, case.num_redundant, world_size)
    gen = torch.Generator().manual_seed(7)
    extra = torch.randint(case.num_logical, (case.num_redundant,), generator=gen)
    rows = [
        torch.cat([torch.randperm(case.num_logical, generator=gen), extra])
        for _ in range(NUM_LAYERS)
    ]
    return ExpertPlacement.from_phy2log(torch.stack(rows), world_size)


def _tokens(
    case: Case, rank: int, micro_batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x: [T, hidden]`, `topk_ids: [T, top_k]` (distinct logical ids), `topk_weights`."""
    num_tokens = case.tokens_per_rank[rank % len(case.tokens_per_rank)] + micro_batch
    gen = torch.Generator().manual_seed(1000 * rank + micro_batch)
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    scores = torch.rand(num_tokens, case.num_logical, generator=gen)
    if case.hot_expert:
        scores[:, 0] = 2.0
    topk_ids = scores.topk(case.top_k, dim=1).indices
    return x, topk_ids, torch.rand(num_tokens, case.top_k, generator=gen)


def _reference(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13, w2
) -> torch.Tensor:
    """sum_k w_k * expert_{topk_ids[t, k]}(x_t), on the full weights."""
    gate, up = torch.einsum("th,tkih->tki", x, w13[topk_ids]).chunk(2, dim=-1)
    y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, w2[topk_ids])
    return (y * topk_weights[..., None]).sum(dim=1)


def _expect(errors: list[str], what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    try:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    except AssertionError as error:
        errors.append(f"{what}: {error}")


def _run_case(backend: str, case: Case, rank: int, world_size: int, device: str) -> list[str]:
    errors: list[str] = []
    placement = _placement(case, world_size)
    gen = torch.Generator().manual_seed(42)
    w13 = torch.randn(case.num_logical, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(case.num_logical, HIDDEN, INTER, generator=gen) / INTER**0.5
    local = placement.local_experts(LAYER, rank)
    w13_local, w2_local = w13[local].to(device), w2[local].to(device)
    kind, mode = backend.split("-", 1)
    dispatcher = create_dispatcher(
        kind,  # type: ignore[arg-type]
        mode.replace("-", "_"),  # type: ignore[arg-type]
        None,
        placement.slots_per_rank,
        hidden_size=HIDDEN,
        capacity_per_expert=case.capacity_per_expert,
    )
    batches = [_tokens(case, rank, micro_batch) for micro_batch in range(2)]

    def inputs(micro_batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, topk_ids, topk_weights = batches[micro_batch]
        topk_phys = placement.choose_replicas(LAYER, topk_ids, rank)
        return x.to(device), topk_phys.to(device), topk_weights.to(device)

    def reference(micro_batch: int) -> torch.Tensor:
        return _reference(*batches[micro_batch], w13, w2)

    # One batch, blocking calls; every (token, k) row must arrive somewhere exactly once.
    result = dispatcher.dispatch(*inputs(0))
    out = dispatcher.combine(run_local_experts(result, w13_local, w2_local), result.handle)
    _expect(errors, f"{case.name}/sync", out.cpu(), reference(0))
    counts = torch.stack(
        [result.num_tokens_per_expert.sum().cpu(), torch.tensor(batches[0][1].numel())]
    ).to(device)
    dist.all_reduce(counts)
    if counts[0] != counts[1]:
        errors.append(f"{case.name}: {int(counts[0])} rows received, {int(counts[1])} sent")
    if result.layout == "masked" and kind == "torch":
        # The hot expert gets one row per token from each rank: ceil(max T / capacity) rounds.
        per_round = world_size * case.capacity_per_expert
        max_tokens = max(
            case.tokens_per_rank[r % len(case.tokens_per_rank)] for r in range(world_size)
        )
        num_rounds = math.ceil(max_tokens / case.capacity_per_expert)
        if case.hot_expert and result.x.shape[1] != num_rounds * per_round:
            errors.append(f"{case.name}: {result.x.shape[1]} masked rows, {num_rounds=}")
        if result.x.shape[1] % per_round:
            errors.append(f"{case.name}: {result.x.shape[1]} masked rows, not whole rounds")

    # Two-batch overlap: B is dispatched and A's reference computed while A is in flight.
    pending_a = dispatcher.dispatch_async(*inputs(0))
    expected_a = reference(0)
    pending_b = dispatcher.dispatch_async(*inputs(1))
    result_a = pending_a.wait()
    combining_a = dispatcher.combine_async(
        run_local_experts(result_a, w13_local, w2_local), result_a.handle
    )
    result_b = pending_b.wait()
    expert_out_b = run_local_experts(result_b, w13_local, w2_local)
    _expect(errors, f"{case.name}/async A", combining_a.wait().cpu(), expected_a)
    out_b = dispatcher.combine_async(expert_out_b, result_b.handle).wait()
    _expect(errors, f"{case.name}/async B", out_b.cpu(), reference(1))
    return errors


def _worker(rank: int, world_size: int, family: str, init_file: str, result_dir: str) -> None:
    device = f"cuda:{rank}" if family == "deepep" else "cpu"
    if family == "deepep":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if family == "deepep" else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        errors = {
            backend: [
                error
                for case in CASES
                for error in _run_case(backend, case, rank, world_size, device)
            ]
            for backend in BACKENDS
            if backend.startswith(family)
        }
        (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


_RESULTS: dict[tuple[int, str], dict[str, list[str]]] = {}


def _errors(world_size: int, backend: str, tmp_root: Path) -> list[str]:
    """Every rank's failures for `backend`, spawning the processes on first use."""
    family = backend.split("-")[0]
    if (world_size, family) not in _RESULTS:
        run_dir = tmp_root / f"{family}-{world_size}"
        run_dir.mkdir()
        mp.spawn(
            _worker,
            args=(world_size, family, str(run_dir / "store"), str(run_dir)),
            nprocs=world_size,
            join=True,
        )
        merged: dict[str, list[str]] = {}
        for rank in range(world_size):
            for name, errors in json.loads((run_dir / f"rank{rank}.json").read_text()).items():
                merged.setdefault(name, []).extend(f"rank {rank}: {e}" for e in errors)
        _RESULTS[(world_size, family)] = merged
    return _RESULTS[(world_size, family)][backend]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_combine_matches_reference(backend, world_size, tmp_path_factory):
    if backend.startswith("deepep") and not (
        deepep_available() and torch.cuda.device_count() >= world_size > 1
    ):
        pytest.skip(f"needs deep_ep, {world_size} CUDA devices and 2 or more ranks")
    errors = _errors(world_size, backend, tmp_path_factory.mktemp("ep"))
    assert not errors, "\n".join(errors)
