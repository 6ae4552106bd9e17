"""Expert-parallel token dispatch and combine: the `Dispatcher` interface and its torch backends.

Each rank of an EP group holds `num_local_slots` physical expert slots (see
`workers.ep.placement`); physical slot `p` lives on rank `p // num_local_slots`. A MoE layer is

    result = dispatcher.dispatch(x, topk_phys, topk_weights)  # tokens → their experts' ranks
    out = run_local_experts(result, w13_local, w2_local)       # this rank's experts, in place
    y = dispatcher.combine(out, result.handle)                 # rows → source ranks, weighted sum

and every rank of the group must make the same sequence of calls (they are collectives), each
with its own number of tokens `T` (0 allowed). `dispatch_async` / `combine_async` start the same
work and return a `Pending` whose `wait()` gives the result, so that the caller can compute
another micro-batch in between (two-batch overlap).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch
import torch.distributed as dist

Layout = Literal["contiguous", "masked"]
Mode = Literal["normal", "low_latency"]  # normal → contiguous layout, low_latency → masked
ResultT = TypeVar("ResultT")


@dataclass
class DispatchResult:
    """The rows this rank's expert slots must process, in one of two layouts.

    contiguous: `x: [num_recv_rows, hidden]`, rows sorted by local slot, slot `s` owning the
        `num_tokens_per_expert[s]` rows after those of slots `< s` (a grouped GEMM's input).
    masked: `x: [num_local_slots, max_rows_per_slot, hidden]`; slot `s` owns rows
        `x[s, :num_tokens_per_expert[s]]`, the rest is padding (a masked grouped GEMM's input).

    `num_tokens_per_expert: [num_local_slots]` int64 on `x.device`. The expert output passed to
    `combine` has `x`'s shape (padding rows are ignored). `handle` belongs to the dispatcher:
    pass it unchanged to `combine`, once; it keeps the routing it needs alive until then.
    """

    x: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    layout: Layout
    handle: Any

    @property
    def masked_count(self) -> torch.Tensor:
        """`[num_local_slots]`: the valid rows of each slot in the masked layout."""
        assert self.layout == "masked", "masked_count belongs to the masked layout"
        return self.num_tokens_per_expert


class Pending(Generic[ResultT]):
    """Communication in flight; `wait()` blocks until it is done and returns its result (the
    same object on every call). Until then the caller must not touch the tensors it passed in."""

    def __init__(
        self,
        finish: Callable[[], ResultT],
        works: list[Any] | None = None,
        keep_alive: tuple[torch.Tensor, ...] = (),
    ):
        self._finish: Callable[[], ResultT] | None = finish
        self._works = works or []
        self._keep_alive = keep_alive  # send buffers, until the exchange is over
        self._result: ResultT | None = None

    def wait(self) -> ResultT:
        if self._finish is not None:
            for work in self._works:
                work.wait()
            self._result, self._finish = self._finish(), None
            self._works, self._keep_alive = [], ()
        return self._result  # type: ignore[return-value]


class Dispatcher(ABC):
    """Moves token rows to the ranks holding their experts and the expert outputs back.

    Contract, per call, on every rank of `group`:
      dispatch(x: [T, hidden], topk_phys: [T, top_k] int64 physical slot ids in
          [0, num_ranks * num_local_slots) or -1 (no expert), topk_weights: [T, top_k] float32)
          -> DispatchResult. `x`'s dtype and device are kept; the caller still owns its inputs.
      combine(expert_out, handle) -> [T, hidden] in `x`'s dtype: for each token,
          sum_k topk_weights[t, k] * expert_out row of (t, k), accumulated in float32.
    """

    layout: Layout
    # The most token rows one call may dispatch on a rank (None: any number). An engine using
    # the dispatcher keeps its steps within it (`Engine`: the scheduler's token budget), so
    # that no rank ever fails a call its peers are already waiting in.
    max_tokens_per_call: int | None = None

    def __init__(self, group: dist.ProcessGroup | None, num_local_slots: int):
        if num_local_slots < 1:
            raise ValueError(f"num_local_slots must be >= 1, got {num_local_slots}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_local_slots = num_local_slots

    @property
    def num_physical(self) -> int:
        return self.num_ranks * self.num_local_slots

    @abstractmethod
    def dispatch_async(
        self, x: torch.Tensor, topk_phys: torch.Tensor, topk_weights: torch.Tensor
    ) -> Pending[DispatchResult]: ...

    @abstractmethod
    def combine_async(self, expert_out: torch.Tensor, handle: Any) -> Pending[torch.Tensor]: ...

    def dispatch(
        self, x: torch.Tensor, topk_phys: torch.Tensor, topk_weights: torch.Tensor
    ) -> DispatchResult:
        return self.dispatch_async(x, topk_phys, topk_weights).wait()

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.combine_async(expert_out, handle).wait()


class _SendPlan:
    """This rank's (token, k) pairs with an expert, sorted by physical slot (so by destination
    rank, then local slot): `token_of`, `weight`, `phys` are `[num_pairs]`."""

    def __init__(self, topk_phys: torch.Tensor, topk_weights: torch.Tensor, num_physical: int):
        if topk_phys.shape != topk_weights.shape or topk_phys.dim() != 2:
            raise ValueError(
                f"topk_phys {tuple(topk_phys.shape)} and topk_weights "
                f"{tuple(topk_weights.shape)} must both be [T, top_k]"
            )
        if topk_phys.numel() and int(topk_phys.max()) >= num_physical:
            raise ValueError(f"topk_phys holds slot ids >= num_physical = {num_physical}")
        top_k = topk_phys.shape[1]
        flat = topk_phys.flatten()
        pair = torch.nonzero(flat >= 0).squeeze(1)
        order = torch.argsort(flat[pair], stable=True)
        pair = pair[order]
        self.num_tokens = topk_phys.shape[0]
        self.token_of = pair // top_k
        self.phys = flat[pair]
        self.weight = topk_weights.flatten()[pair].float()
        self.count_per_slot = torch.bincount(self.phys, minlength=num_physical)  # [P]

    def reduce(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`[T, hidden]`: sum of `rows: [num_pairs, hidden]` (this plan's pair order) per
        token, each scaled by its weight."""
        out = torch.zeros(self.num_tokens, rows.shape[-1], dtype=torch.float32, device=rows.device)
        out.index_add_(0, self.token_of, rows.float() * self.weight[:, None])
        return out.to(dtype)


def _all_to_all(
    output: torch.Tensor,
    input: torch.Tensor,
    group: dist.ProcessGroup | None,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
) -> Any:
    work = dist.all_to_all_single(
        output, input, output_split_sizes, input_split_sizes, group=group, async_op=True
    )
    assert work is not None
    return work


@dataclass
class _NormalHandle:
    plan: _SendPlan
    send_rows_per_rank: list[int]
    recv_rows_per_rank: list[int]
    recv_order: torch.Tensor  # [num_recv_rows]: slot-major position → arrival position


class TorchNormalDispatcher(Dispatcher):
    """Exact-size exchange (prefill): the per-(rank, slot) counts go first (`all_to_all_single`,
    then a host sync for the split sizes), then the rows themselves, one row per (token, k).
    Contiguous layout. `dispatch_async` returns once the counts are known, with the row
    exchange in flight."""

    layout: Layout = "contiguous"

    def dispatch_async(
        self, x: torch.Tensor, topk_phys: torch.Tensor, topk_weights: torch.Tensor
    ) -> Pending[DispatchResult]:
        plan = _SendPlan(topk_phys, topk_weights, self.num_physical)
        send_counts = plan.count_per_slot.view(self.num_ranks, self.num_local_slots)
        recv_counts = torch.empty_like(send_counts)  # [src rank, local slot]
        _all_to_all(recv_counts, send_counts, self.group).wait()
        send_rows_per_rank = send_counts.sum(1).tolist()
        recv_rows_per_rank = recv_counts.sum(1).tolist()

        send_rows = x.index_select(0, plan.token_of)
        recv_rows = x.new_empty(sum(recv_rows_per_rank), x.shape[1])
        work = _all_to_all(recv_rows, send_rows, self.group, recv_rows_per_rank, send_rows_per_rank)
        # Rows arrive grouped by source rank, then by slot; the experts want them by slot.
        slot_of = torch.arange(self.num_local_slots, device=x.device).repeat(self.num_ranks)
        arrival_slot = torch.repeat_interleave(slot_of, recv_counts.flatten())
        recv_order = torch.argsort(arrival_slot, stable=True)
        handle = _NormalHandle(plan, send_rows_per_rank, recv_rows_per_rank, recv_order)

        def finish() -> DispatchResult:
            return DispatchResult(recv_rows[recv_order], recv_counts.sum(0), self.layout, handle)

        return Pending(finish, [work], (send_rows,))

    def combine_async(self, expert_out: torch.Tensor, handle: Any) -> Pending[torch.Tensor]:
        assert isinstance(handle, _NormalHandle)
        back_rows = torch.empty_like(expert_out)
        back_rows[handle.recv_order] = expert_out
        rows = expert_out.new_empty(len(handle.plan.token_of), expert_out.shape[1])
        work = _all_to_all(
            rows, back_rows, self.group, handle.send_rows_per_rank, handle.recv_rows_per_rank
        )

        def finish() -> torch.Tensor:
            return handle.plan.reduce(rows, expert_out.dtype)

        return Pending(finish, [work], (back_rows,))


@dataclass
class _LowLatencyHandle:
    plan: _SendPlan
    send_index: torch.Tensor  # [num_pairs]: row of each pair in the [P * rows_per_source] buffer
    packed_index: torch.Tensor  # [num_recv_rows]: its row in the masked [S * max_rows] layout
    arrival_index: torch.Tensor  # [num_recv_rows]: its row in the [R, S, rows_per_source] buffer
    rows_per_source: int


class TorchLowLatencyDispatcher(Dispatcher):
    """Fixed-size exchange (decode): every rank sends every (rank, local slot) a block of
    `rows_per_source` rows, whatever its routing; no count exchange before the data.

    Capacity: `capacity_per_expert` is how many rows one expert slot accepts from one source
    rank in one round (DeepEP's `num_max_dispatch_tokens_per_rank`; a rank sends a slot at most
    one row per token, so it never overflows when `T <= capacity_per_expert`).
    Overflow: no row is ever dropped. Each call, every rank works out the rounds it needs,
    `ceil(max rows it sends one slot / capacity_per_expert)`, and an `all_reduce(MAX)` makes
    `num_rounds` the same everywhere; the rounds then go out as one exchange of
    `rows_per_source = num_rounds * capacity_per_expert` rows per block. The masked layout has
    `max_rows_per_slot = num_ranks * rows_per_source` rows per slot: the static
    `num_ranks * capacity_per_expert` while no rank overflows, `num_rounds` times that when one
    does (a larger buffer for that call, never a lost row).
    """

    layout: Layout = "masked"

    def __init__(
        self, group: dist.ProcessGroup | None, num_local_slots: int, capacity_per_expert: int
    ):
        super().__init__(group, num_local_slots)
        if capacity_per_expert < 1:
            raise ValueError(f"capacity_per_expert must be >= 1, got {capacity_per_expert}")
        self.capacity_per_expert = capacity_per_expert

    def _num_rounds(self, plan: _SendPlan) -> int:
        max_rows = int(plan.count_per_slot.max()) if plan.count_per_slot.numel() else 0
        rounds = torch.tensor(
            [max(1, math.ceil(max_rows / self.capacity_per_expert))],
            device=plan.count_per_slot.device,
        )
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=self.group)
        return int(rounds.item())

    def dispatch_async(
        self, x: torch.Tensor, topk_phys: torch.Tensor, topk_weights: torch.Tensor
    ) -> Pending[DispatchResult]:
        plan = _SendPlan(topk_phys, topk_weights, self.num_physical)
        rows_per_source = self._num_rounds(plan) * self.capacity_per_expert
        num_ranks, num_slots, hidden = self.num_ranks, self.num_local_slots, x.shape[1]

        first_of_slot = torch.cumsum(plan.count_per_slot, 0) - plan.count_per_slot
        row_in_slot = torch.arange(len(plan.phys), device=x.device) - first_of_slot[plan.phys]
        send_index = plan.phys * rows_per_source + row_in_slot
        send_rows = x.new_zeros(self.num_physical * rows_per_source, hidden)
        send_rows[send_index] = x.index_select(0, plan.token_of)
        send_counts = plan.count_per_slot.view(num_ranks, num_slots)

        recv_rows = torch.empty_like(send_rows)  # [src rank, local slot, rows_per_source]
        recv_counts = torch.empty_like(send_counts)
        works = [
            _all_to_all(recv_counts, send_counts, self.group),
            _all_to_all(recv_rows, send_rows, self.group),
        ]

        def finish() -> DispatchResult:
            # Pack each slot's rows from all sources to its front: [slot, src, row] order.
            row = torch.arange(rows_per_source, device=x.device)
            is_valid = (row < recv_counts[:, :, None]).transpose(0, 1).flatten(1)  # [S, R*rows]
            max_rows_per_slot = num_ranks * rows_per_source
            valid = torch.nonzero(is_valid.flatten()).squeeze(1)
            slot, pos = valid // max_rows_per_slot, valid % max_rows_per_slot
            src, row_of = pos // rows_per_source, pos % rows_per_source
            arrival_index = (src * num_slots + slot) * rows_per_source + row_of
            packed_pos = torch.cumsum(is_valid, dim=1).flatten()[valid] - 1
            packed_index = slot * max_rows_per_slot + packed_pos
            packed = x.new_zeros(num_slots * max_rows_per_slot, hidden)
            packed[packed_index] = recv_rows[arrival_index]
            handle = _LowLatencyHandle(
                plan, send_index, packed_index, arrival_index, rows_per_source
            )
            return DispatchResult(
                packed.view(num_slots, max_rows_per_slot, hidden),
                recv_counts.sum(0),
                self.layout,
                handle,
            )

        return Pending(finish, works, (send_rows, send_counts))

    def combine_async(self, expert_out: torch.Tensor, handle: Any) -> Pending[torch.Tensor]:
        assert isinstance(handle, _LowLatencyHandle)
        hidden = expert_out.shape[-1]
        back_rows = expert_out.new_zeros(self.num_physical * handle.rows_per_source, hidden)
        back_rows[handle.arrival_index] = expert_out.reshape(-1, hidden)[handle.packed_index]
        rows = torch.empty_like(back_rows)
        work = _all_to_all(rows, back_rows, self.group)

        def finish() -> torch.Tensor:
            return handle.plan.reduce(rows[handle.send_index], expert_out.dtype)

        return Pending(finish, [work], (back_rows,))
