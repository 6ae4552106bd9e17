"""`Dispatcher` over DeepEP's `deep_ep.Buffer` (CUDA only; import-guarded).

normal: `get_dispatch_layout` + `dispatch` send each token once per destination rank; here the
    received tokens are expanded to one row per (token, local expert) sorted by expert (the
    contiguous layout), and `combine` applies the top-k weights on the expert side before
    DeepEP's unweighted sum.
low_latency: `low_latency_dispatch` / `low_latency_combine` with BF16 rows (no FP8) and the
    receive hook for overlap. `capacity_per_expert` is DeepEP's
    `num_max_dispatch_tokens_per_rank`; DeepEP has no extra rounds, so a call with more tokens
    raises instead of dropping rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from workers.ep.dispatch import Dispatcher, DispatchResult, Mode, Pending

try:
    import deep_ep
except ImportError:  # pragma: no cover - depends on the machine
    deep_ep = None


def deepep_available() -> bool:
    return deep_ep is not None and torch.cuda.is_available()


@dataclass
class _NormalHandle:
    deepep_handle: Any
    row_of: torch.Tensor  # [num_pairs]: received token of each expert row
    weight: torch.Tensor  # [num_pairs] float32
    num_recv_tokens: int


@dataclass
class _LowLatencyHandle:
    deepep_handle: Any
    topk_phys: torch.Tensor
    topk_weights: torch.Tensor


class DeepEPDispatcher(Dispatcher):
    """One `deep_ep.Buffer` per dispatcher, sized for `hidden_size` (BF16 rows); in
    low-latency mode for `capacity_per_expert` tokens per rank and call."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_local_slots: int,
        mode: Mode,
        hidden_size: int,
        capacity_per_expert: int = 128,
    ):
        if deep_ep is None:
            raise RuntimeError("DeepEPDispatcher needs the deep_ep package")
        super().__init__(group, num_local_slots)
        if self.num_ranks < 2:
            raise ValueError("DeepEP needs an EP group of 2 or more ranks; use backend 'torch'")
        group = group if group is not None else dist.group.WORLD
        self.layout = "masked" if mode == "low_latency" else "contiguous"
        self.capacity_per_expert = capacity_per_expert
        Buffer = deep_ep.Buffer
        if mode == "low_latency":
            # Its buffers hold `capacity_per_expert` tokens per rank and call, no more: the
            # engine keeps each step within that (a step over it would fail on this rank
            # while its peers wait inside the kernel).
            self.max_tokens_per_call = capacity_per_expert
            num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
                capacity_per_expert, hidden_size, self.num_ranks, self.num_physical
            )
            self.buffer = Buffer(
                group, 0, num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=num_local_slots
            )
        else:
            hidden_bytes = hidden_size * 2
            num_nvl_bytes = num_rdma_bytes = 0
            for config in (
                Buffer.get_dispatch_config(self.num_ranks),
                Buffer.get_combine_config(self.num_ranks),
            ):
                num_nvl_bytes = max(
                    num_nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, self.num_ranks)
                )
                num_rdma_bytes = max(
                    num_rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, self.num_ranks)
                )
            self.buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)

    def dispatch_async(
        self, x: torch.Tensor, topk_phys: torch.Tensor, topk_weights: torch.Tensor
    ) -> Pending[DispatchResult]:
        if self.layout == "masked":
            return self._low_latency_dispatch(x, topk_phys, topk_weights)
        return self._normal_dispatch(x, topk_phys, topk_weights)

    def combine_async(self, expert_out: torch.Tensor, handle: Any) -> Pending[torch.Tensor]:
        if isinstance(handle, _LowLatencyHandle):
            combined, _, hook = self.buffer.low_latency_combine(
                expert_out,
                handle.topk_phys,
                handle.topk_weights,
                handle.deepep_handle,
                return_recv_hook=True,
            )
            return Pending(lambda: (hook(), combined)[1])
        assert isinstance(handle, _NormalHandle)
        weighted = torch.zeros(
            handle.num_recv_tokens,
            expert_out.shape[1],
            dtype=torch.float32,
            device=expert_out.device,
        )
        weighted.index_add_(0, handle.row_of, expert_out.float() * handle.weight[:, None])
        combined, _, event = self.buffer.combine(
            weighted.to(expert_out.dtype), handle.deepep_handle, async_finish=True
        )
        return Pending(lambda: (event.current_stream_wait(), combined)[1])

    def _normal_dispatch(
        self, x: torch.Tensor, topk_phys: torch.Tensor, topk_weights: torch.Tensor
    ) -> Pending[DispatchResult]:
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            topk_phys, self.num_physical
        )
        recv_x, recv_topk, recv_weights, num_recv_per_expert, deepep_handle, event = (
            self.buffer.dispatch(
                x,
                topk_idx=topk_phys,
                topk_weights=topk_weights.float(),
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                async_finish=True,
            )
        )

        def finish() -> DispatchResult:
            event.current_stream_wait()
            # recv_topk: [num_recv_tokens, top_k] local expert ids, -1 for other ranks' experts.
            flat = recv_topk.flatten()
            pair = torch.nonzero(flat >= 0).squeeze(1)
            pair = pair[torch.argsort(flat[pair], stable=True)]
            row_of = pair // recv_topk.shape[1]
            handle = _NormalHandle(
                deepep_handle, row_of, recv_weights.flatten()[pair].float(), recv_x.shape[0]
            )
            counts = torch.tensor(num_recv_per_expert, dtype=torch.int64, device=x.device)
            return DispatchResult(recv_x[row_of], counts, "contiguous", handle)

        return Pending(finish)

    def _low_latency_dispatch(
        self, x: torch.Tensor, topk_phys: torch.Tensor, topk_weights: torch.Tensor
    ) -> Pending[DispatchResult]:
        if x.shape[0] > self.capacity_per_expert:
            raise ValueError(
                f"{x.shape[0]} tokens exceed DeepEP low-latency capacity "
                f"{self.capacity_per_expert}; use a larger capacity_per_expert or normal mode"
            )
        recv_x, recv_count, deepep_handle, _, hook = self.buffer.low_latency_dispatch(
            x,
            topk_phys,
            self.capacity_per_expert,
            self.num_physical,
            use_fp8=False,
            return_recv_hook=True,
        )
        handle = _LowLatencyHandle(deepep_handle, topk_phys, topk_weights.float())

        def finish() -> DispatchResult:
            hook()
            return DispatchResult(recv_x, recv_count.to(torch.int64), "masked", handle)

        return Pending(finish)
