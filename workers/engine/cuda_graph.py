"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode-only batch of `n` requests runs as the smallest captured bucket `bs >= n`. Its inputs
are staged in pinned host buffers, copied without blocking into the graph's static device
buffers, and the graph replays the whole model step (no host synchronization inside); the first
`n` rows of the static logits are the answer. Padding rows `n .. bs` read token 0 at position 0,
write their KV to the cache's scratch slot and have context length 0, so attention gives them
zeros and no request's KV is touched. Expert-load counting skips them (`ExpertLoad.valid_rows`).

With the MTP module (`--speculative-mtp`) the graph also keeps the final hidden states of its
rows (`hidden`), which the module's pass after the step reads (`last_pass`); that pass runs
eagerly over the graph's static inputs.

Graphs need every op of the step to be capturable: the Triton decode-attention and fused-MoE
kernels are, and so are the torch fallbacks used on CPU, where `capture=False` runs the very
same static-buffer path eagerly (that is how the CPU tests check the padding and staging logic).
Expert-parallel pools do not use graphs: their dispatch sizes its buffers from exact counts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch

from workers.engine.kv_cache import KVCache
from workers.model.batch import AttentionMetadata
from workers.model.model import DeepseekForCausalLM
from workers.model.moe import ExpertLoad

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Captured batch sizes up to `max_batch`: 1, 2, 4, 8, then every 8 to 32, every 16 to
    128, every 32 beyond (the padding waste stays under ~25%)."""
    sizes = [1, 2, 4, 8, *range(16, 33, 8), *range(48, 129, 16), *range(160, max_batch + 1, 32)]
    out = sorted({s for s in sizes if s <= max_batch} | {max_batch})
    return out


class DecodeGraphs:
    """Replays decode steps of `model` over `kv` for batches of up to `max_batch` requests
    whose contexts fit `max_pages` pages each."""

    def __init__(
        self,
        model: DeepseekForCausalLM,
        kv: KVCache,
        max_batch: int,
        max_pages: int,
        expert_load: ExpertLoad | None = None,
        capture: bool = True,
    ):
        self.model, self.kv, self.expert_load = model, kv, expert_load
        self.max_batch, self.max_pages = max_batch, max_pages
        self.buckets = batch_buckets(max_batch)
        self.capture_enabled = capture
        device = kv.data.device
        pin = device.type == "cuda"
        self.device = device

        def buf(shape: tuple[int, ...], dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        def host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        n = max_batch
        self.input_ids = buf((n,), torch.int64)
        self.positions = buf((n,), torch.int64)
        self.out_slots = buf((n,), torch.int64, kv.scratch_slot)
        self.block_table = buf((n, max_pages), torch.int32)
        self.seq_lens = buf((n,), torch.int32)
        self.valid_rows = buf((n,), torch.int64)
        self.logits_indices = torch.arange(n, device=device)
        # Host staging, one column per input: ids, positions, out slots, seq lens, valid (rows
        # first, so that a batch's rows are one contiguous block for the non-blocking copy).
        self._staged_rows = host((n, 5), torch.int64)
        self._staged_table = host((n, max_pages), torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # with an MTP module: each graph's rows'
        self._last: tuple[int, torch.Tensor | None] = (0, None)  # (rows, hidden) of `run`

    def can_run(self, num_decode: int, num_prefill: int, max_pages: int) -> bool:
        return num_prefill == 0 and 0 < num_decode <= self.max_batch and max_pages <= self.max_pages

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:bs],
            out_slots=self.out_slots[:bs],
            num_decode=bs,
            block_table=self.block_table[:bs],
            seq_lens=self.seq_lens[:bs],
            page_size=self.kv.page_size,
            prefills=[],
            logits_indices=self.logits_indices[:bs],
        )

    @contextlib.contextmanager
    def _masked_load(self, bs: int) -> Iterator[None]:
        """Expert-load counting weighted by `valid_rows` while the step is traced or run."""
        if self.expert_load is None:
            yield
            return
        self.expert_load.valid_rows = self.valid_rows[:bs]
        try:
            yield
        finally:
            self.expert_load.valid_rows = None

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the first `bs` rows, and their final hidden states with an MTP module."""
        meta = self._meta(bs)
        with self._masked_load(bs):
            logits = self.model(self.input_ids[:bs], meta, self.kv.data)
        return logits, meta.hidden

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, in one memory pool (CUDA only). The warm-up
        runs compile the Triton kernels; all their KV writes go to the scratch slot."""
        if not self.capture_enabled:
            return
        start = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(bs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs], hidden = self._forward(bs)
            if hidden is not None:
                self.hidden[bs] = hidden
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured decode CUDA graphs for batch sizes %s in %.1f s",
            self.buckets,
            time.perf_counter() - start,
        )

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        out_slots: list[int],
        block_rows: list[list[int]],
    ) -> torch.Tensor:
        """Logits `[n, vocab]` of a decode batch: request `i` reads token `input_ids[i]` at
        `positions[i]` (its context is `positions[i] + 1` long, on pages `block_rows[i]`) and
        writes its KV to `out_slots[i]`."""
        n = len(input_ids)
        bs = self.bucket(n)
        rows, table = self._staged_rows, self._staged_table
        rows[:n, 0] = torch.tensor(input_ids)
        rows[:n, 1] = torch.tensor(positions)
        rows[:n, 2] = torch.tensor(out_slots)
        rows[:n, 3] = rows[:n, 1] + 1
        rows[:n, 4] = 1
        rows[n:bs, 0:2] = 0
        rows[n:bs, 2] = self.kv.scratch_slot
        rows[n:bs, 3:5] = 0
        for i, pages in enumerate(block_rows):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        # The previous step's copies are done (its tokens were read back), so the pinned
        # buffers are free to refill.
        staged = rows[:bs].to(self.device, non_blocking=True)
        self.input_ids[:bs].copy_(staged[:, 0])
        self.positions[:bs].copy_(staged[:, 1])
        self.out_slots[:bs].copy_(staged[:, 2])
        self.seq_lens[:bs].copy_(staged[:, 3])
        self.valid_rows[:bs].copy_(staged[:, 4])
        self.block_table[:n].copy_(table[:n], non_blocking=True)
        if bs in self.graphs:
            self.graphs[bs].replay()
            self._last = (n, self.hidden.get(bs))
            return self.outputs[bs][:n]
        with torch.inference_mode():
            logits, hidden = self._forward(bs)
        self._last = (n, hidden)
        return logits[:n]

    def last_pass(self) -> tuple[torch.Tensor, AttentionMetadata]:
        """The last `run`'s rows as the MTP module reads them: their token ids and layout,
        views of the static buffers (valid until the next `run`), with `hidden` set."""
        n, hidden = self._last
        assert hidden is not None, "a run of a model with its MTP module"
        meta = self._meta(n)
        meta.hidden = hidden[:n]
        return self.input_ids[:n], meta
