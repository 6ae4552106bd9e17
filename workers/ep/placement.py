"""Where each expert's weights live under expert parallelism: one pool of physical slots.

A pool has `num_physical = num_logical + num_redundant` slots split evenly over `num_ranks`
ranks: physical slot `p` lives on rank `p // slots_per_rank` at local index
`p % slots_per_rank`. Each logical expert has one or more replicas (physical slots holding a
copy of its weights); the maps between the two id spaces are

    phy2log: [num_layers, num_physical]              int64, the logical expert of each slot
    log2phy: [num_layers, num_logical, max_replicas] int64, its slots ascending, -1 padded
    logcnt:  [num_layers, num_logical]               int64, number of replicas (>= 1)

as in deepseek-ai/EPLB, whose `rebalance_experts` output feeds `from_phy2log` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """The expert placement of one pool; build it with `default` or `from_phy2log`."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    num_ranks: int

    def __post_init__(self) -> None:
        num_layers, num_physical = self.phy2log.shape
        if self.log2phy.shape[:2] != (num_layers, self.num_logical):
            raise ValueError(
                f"log2phy shape {tuple(self.log2phy.shape)} does not match "
                f"[num_layers={num_layers}, num_logical={self.num_logical}, max_replicas]"
            )
        if self.logcnt.shape != (num_layers, self.num_logical):
            raise ValueError(f"logcnt shape {tuple(self.logcnt.shape)} != log2phy's first two")
        _check_slots(num_physical, self.num_ranks)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_logical(self) -> int:
        return self.log2phy.shape[1]

    @property
    def num_redundant(self) -> int:
        return self.num_physical - self.num_logical

    @property
    def max_replicas(self) -> int:
        return self.log2phy.shape[2]

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    def local_experts(self, layer: int, rank: int) -> torch.Tensor:
        """`[slots_per_rank]` int64: the logical expert held by each local slot of `rank`."""
        start = rank * self.slots_per_rank
        return self.phy2log[layer, start : start + self.slots_per_rank]

    @classmethod
    def default(
        cls, num_layers: int, num_logical: int, num_redundant: int, num_ranks: int
    ) -> ExpertPlacement:
        """The same placement in every layer, before any load is known.

        Logical experts are laid out in contiguous blocks, rank `r` holding
        `num_logical // num_ranks` of them (one more for the first `num_logical % num_ranks`
        ranks); its remaining slots hold replicas of experts `0, 1, 2, ...` (wrapping), each put
        on the first rank after its owner that has a free slot and no copy of it yet.
        """
        if num_logical < 1 or num_layers < 1 or num_redundant < 0:
            raise ValueError(
                f"need num_layers >= 1, num_logical >= 1, num_redundant >= 0; got "
                f"{num_layers}, {num_logical}, {num_redundant}"
            )
        num_physical = num_logical + num_redundant
        _check_slots(num_physical, num_ranks)
        slots_per_rank = num_physical // num_ranks
        base, extra = divmod(num_logical, num_ranks)
        num_owned = [base + (rank < extra) for rank in range(num_ranks)]
        held: list[list[int]] = []
        start = 0
        for count in num_owned:
            held.append(list(range(start, start + count)))
            start += count
        owner = [rank for rank, count in enumerate(num_owned) for _ in range(count)]
        for replica in range(num_redundant):
            expert = replica % num_logical
            order = [(owner[expert] + step) % num_ranks for step in range(1, num_ranks + 1)]
            free = [rank for rank in order if len(held[rank]) < slots_per_rank]
            spread = [rank for rank in free if expert not in held[rank]]
            held[(spread or free)[0]].append(expert)
        phy2log = torch.tensor([expert for slots in held for expert in slots], dtype=torch.int64)
        return cls.from_phy2log(phy2log.expand(num_layers, -1).clone(), num_ranks, num_logical)

    @classmethod
    def from_phy2log(
        cls, phy2log: torch.Tensor, num_ranks: int, num_logical: int | None = None
    ) -> ExpertPlacement:
        """The placement given by `phy2log: [num_layers, num_physical]` (e.g. from EPLB);
        `num_logical` defaults to the largest id + 1. Every logical expert needs a replica."""
        if phy2log.dim() != 2 or phy2log.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"phy2log must be an integer [num_layers, num_physical] tensor; got "
                f"{phy2log.dtype} of shape {tuple(phy2log.shape)}"
            )
        if phy2log.numel() == 0:
            raise ValueError("phy2log is empty")
        phy2log = phy2log.to(torch.int64).cpu()
        num_layers, num_physical = phy2log.shape
        _check_slots(num_physical, num_ranks)
        if num_logical is None:
            num_logical = int(phy2log.max()) + 1
        if int(phy2log.min()) < 0 or int(phy2log.max()) >= num_logical:
            raise ValueError(f"phy2log holds ids outside [0, {num_logical})")
        logcnt = torch.stack([torch.bincount(row, minlength=num_logical) for row in phy2log])
        if bool((logcnt == 0).any()):
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(f"logical expert {expert} has no replica in layer {layer}")
        max_replicas = int(logcnt.max())
        # Slots sorted by logical id (stable: ascending slot within an expert), then each one's
        # rank among its expert's replicas gives its column in log2phy.
        order = torch.argsort(phy2log, dim=1, stable=True)
        sorted_ids = phy2log.gather(1, order)
        first = torch.cumsum(logcnt, dim=1) - logcnt
        column = torch.arange(num_physical).expand(num_layers, -1) - first.gather(1, sorted_ids)
        log2phy = torch.full((num_layers, num_logical, max_replicas), -1, dtype=torch.int64)
        layer_of = torch.arange(num_layers)[:, None].expand(-1, num_physical)
        log2phy[layer_of, sorted_ids, column] = order
        return cls(phy2log, log2phy, logcnt, num_ranks)

    def choose_replicas(self, layer: int, topk_ids: torch.Tensor, rank: int) -> torch.Tensor:
        """Physical slots for `topk_ids: [T, top_k]` int64 logical ids of `rank`'s tokens.

        Returns `[T, top_k]` int64 physical ids (on `topk_ids.device`): a replica on `rank`
        when there is one (no traffic), else replica `(token index + k) % logcnt`, which
        spreads a hot expert's tokens over its replicas, deterministically.
        """
        device = topk_ids.device
        log2phy = self.log2phy[layer].to(device)
        replicas = log2phy[topk_ids]  # [T, top_k, max_replicas]
        count = self.logcnt[layer].to(device)[topk_ids]  # [T, top_k]
        is_local = (replicas >= 0) & (replicas // self.slots_per_rank == rank)
        local = replicas.gather(2, is_local.int().argmax(dim=2, keepdim=True)).squeeze(2)
        num_tokens, top_k = topk_ids.shape
        spread = torch.arange(num_tokens, device=device)[:, None] + torch.arange(
            top_k, device=device
        )
        remote = replicas.gather(2, (spread % count).unsqueeze(2)).squeeze(2)
        return torch.where(is_local.any(dim=2), local, remote)


def _check_slots(num_physical: int, num_ranks: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if num_physical % num_ranks:
        raise ValueError(
            f"num_physical = num_logical + num_redundant = {num_physical} must be divisible by "
            f"num_ranks = {num_ranks}; change num_redundant"
        )
