"""Invariants of `ExpertPlacement` and its replica choice (pure CPU bookkeeping)."""

from __future__ import annotations

import pytest
import torch

from workers.ep import ExpertPlacement

CONFIGS = [  # num_logical, num_redundant, num_ranks
    (8, 0, 1),
    (8, 0, 4),
    (8, 4, 4),
    (6, 2, 4),
    (10, 2, 3),
    (4, 4, 2),
    (256, 32, 32),  # DeepSeek-V3 with one redundant expert per rank
    (3, 5, 8),  # more replicas than experts: replicas wrap around
]


def _check_invariants(placement: ExpertPlacement) -> None:
    num_layers, num_physical = placement.phy2log.shape
    assert num_physical == placement.num_logical + placement.num_redundant
    assert placement.slots_per_rank * placement.num_ranks == num_physical
    assert (placement.logcnt >= 1).all()
    assert (placement.logcnt.sum(dim=1) == num_physical).all()
    for layer in range(num_layers):
        for expert in range(placement.num_logical):
            count = int(placement.logcnt[layer, expert])
            slots = placement.log2phy[layer, expert]
            assert (slots[count:] == -1).all()
            assert (placement.phy2log[layer, slots[:count]] == expert).all()
            assert slots[:count].tolist() == sorted(slots[:count].tolist())


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("num_logical", "num_redundant", "num_ranks"), CONFIGS)
def test_default_placement(num_logical, num_redundant, num_ranks):
    placement = ExpertPlacement.default(3, num_logical, num_redundant, num_ranks)
    _check_invariants(placement)
    assert placement.num_layers == 3
    assert (placement.phy2log == placement.phy2log[0]).all()
    per_rank = placement.phy2log[0].view(num_ranks, -1)
    # Logical experts in contiguous blocks, first in each rank, sizes differing by at most one.
    base, extra = divmod(num_logical, num_ranks)
    owned = [row[: base + (rank < extra)] for rank, row in enumerate(per_rank.tolist())]
    assert [expert for block in owned for expert in block] == list(range(num_logical))
    # No rank holds two copies of one expert unless some expert has more copies than ranks.
    if int(placement.logcnt.max()) <= num_ranks:
        for row in per_rank.tolist():
            assert len(set(row)) == len(row)
    # Redundant slots replicate experts 0, 1, 2, ... in order.
    expected = torch.ones(num_logical, dtype=torch.int64)
    expected += torch.bincount(torch.arange(num_redundant) % num_logical, minlength=num_logical)
    assert placement.logcnt[0].tolist() == expected.tolist()


@pytest.mark.timeout(30)
def test_from_phy2log_derives_maps():
    phy2log = torch.tensor([[2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 3, 3]])
    placement = ExpertPlacement.from_phy2log(phy2log, num_ranks=3)
    _check_invariants(placement)
    assert placement.logcnt.tolist() == [[2, 1, 2, 1], [1, 1, 1, 3]]
    assert placement.max_replicas == 3  # the most copies of an expert in any layer
    assert placement.log2phy[0].tolist() == [[1, 5, -1], [2, -1, -1], [0, 3, -1], [4, -1, -1]]
    assert placement.log2phy[1, 3].tolist() == [3, 4, 5]
    assert placement.local_experts(0, 1).tolist() == [1, 2]
    # An explicit num_logical larger than the ids seen is checked, not guessed.
    with pytest.raises(ValueError, match="logical expert 4 has no replica"):
        ExpertPlacement.from_phy2log(phy2log, num_ranks=3, num_logical=5)


@pytest.mark.timeout(30)
def test_from_phy2log_round_trips_default():
    default = ExpertPlacement.default(2, 12, 4, 4)
    again = ExpertPlacement.from_phy2log(default.phy2log, 4)
    for name in ("phy2log", "log2phy", "logcnt"):
        assert torch.equal(getattr(default, name), getattr(again, name))


@pytest.mark.timeout(30)
def test_choose_replicas_prefers_local_then_spreads():
    # 4 experts on 2 ranks of 3 slots: rank 0 holds [0, 1, 2], rank 1 holds [3, 0, 1].
    placement = ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 1]]), num_ranks=2)
    topk_ids = torch.tensor([[0, 3], [1, 2], [0, 1], [2, 3]])
    on_rank0 = placement.choose_replicas(0, topk_ids, rank=0)
    on_rank1 = placement.choose_replicas(0, topk_ids, rank=1)
    assert on_rank0.tolist() == [[0, 3], [1, 2], [0, 1], [2, 3]]
    assert on_rank1.tolist() == [[4, 3], [5, 2], [4, 5], [2, 3]]
    assert on_rank0.dtype == torch.int64
    # Every choice is a replica of the asked expert.
    assert torch.equal(placement.phy2log[0][on_rank1], topk_ids)


@pytest.mark.timeout(30)
def test_choose_replicas_spreads_remote_load_deterministically():
    # Expert 0 has replicas on ranks 1 and 2; rank 0 has none, so its tokens alternate.
    placement = ExpertPlacement.from_phy2log(torch.tensor([[1, 2, 0, 2, 0, 1]]), num_ranks=3)
    topk_ids = torch.zeros(6, 1, dtype=torch.int64)
    chosen = placement.choose_replicas(0, topk_ids, rank=0)
    assert chosen.flatten().tolist() == [2, 4, 2, 4, 2, 4]
    assert torch.equal(chosen, placement.choose_replicas(0, topk_ids, rank=0))
    assert placement.choose_replicas(0, topk_ids[:0], rank=0).shape == (0, 1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 8, 1, 4), "must be divisible by num_ranks"),
        ((1, 8, 0, 0), "num_ranks must be >= 1"),
        ((1, 0, 0, 1), "num_logical >= 1"),
        ((1, 8, -1, 1), "num_redundant >= 0"),
    ],
)
def test_default_rejects_bad_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement.default(*args)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("phy2log", "num_ranks", "message"),
    [
        (torch.tensor([0, 1, 2, 3]), 2, "integer \\[num_layers, num_physical\\]"),
        (torch.tensor([[0.0, 1.0]]), 1, "integer \\[num_layers, num_physical\\]"),
        (torch.tensor([[0, 1, 2]]), 2, "must be divisible by num_ranks"),
        (torch.tensor([[0, 2, 2, 3]]), 2, "logical expert 1 has no replica in layer 0"),
        (torch.tensor([[0, -1]]), 1, "outside"),
        (torch.zeros(1, 0, dtype=torch.int64), 1, "empty"),
    ],
)
def test_from_phy2log_rejects_bad_maps(phy2log, num_ranks, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement.from_phy2log(phy2log, num_ranks)
