"""`Engine`: one rank's model, KV cache and scheduler, advanced one step at a time.

What a request becomes on the way in is `workers.engine.admission`; what one step does is
`workers.engine.step`, and what it makes of its logits (tokens, finish rules, deltas)
`workers.engine.step_output`. The engine keeps the rank's parts and its requests' bookkeeping:
which are live, which are handed off, received, moved or aborted, and what the rank reports.

Not thread-safe: the rank's loop thread is its only caller (see `workers.engine.worker`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from workers.engine.admission import check_request, new_sequence, skip_draws
from workers.engine.config import EngineConfig
from workers.engine.cuda_graph import DecodeGraphs
from workers.engine.grammar import GrammarBackend
from workers.engine.kv_cache import KVCache, num_kv_pages, pages_needed
from workers.engine.kv_swap import KVSwap
from workers.engine.messages import FinishReason, GenerateRequest, TokenDelta, TokenLogprob
from workers.engine.rank_reports import RankInfo, RankStats
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import SeqStatus, Sequence
from workers.engine.speculative import Speculator
from workers.engine.step import append_token, run_step
from workers.engine.step_output import token_delta
from workers.ep.moe import EPContext, select_grouped_gemm
from workers.kernels import triton_available
from workers.model.loader import load_model
from workers.model.mla import MLAttention
from workers.model.model import DeepseekForCausalLM
from workers.model.moe import ExpertLoad, RoutedExperts

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def step_token_budget(config: EngineConfig, ep: EPContext | None) -> int:
    """The most tokens one step computes: `--chunked-prefill-size`, within what the
    expert-parallel dispatcher takes per call (DeepEP's low-latency mode: its capacity)."""
    limit = ep.dispatcher.max_tokens_per_call if ep is not None else None
    if limit is None or limit >= config.chunked_prefill_size:
        return config.chunked_prefill_size
    logger.info(
        "steps of at most %d tokens (--low-latency-capacity: DeepEP's low-latency buffers), "
        "not %d (--chunked-prefill-size)", limit, config.chunked_prefill_size,
    )  # fmt: skip
    return limit


class Engine:
    """With `ep` the engine is one rank of an expert-parallel pool: it holds only its expert
    slots, and every `step` is a collective over the pool (see `step`)."""

    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig,
        progress: bool = True,
        ep: EPContext | None = None,
        model: DeepseekForCausalLM | None = None,
    ):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.model_dir = Path(model_dir)
        self.ep = ep
        keep_fp8 = (
            config.keep_fp8_experts and ep is None and self.device.type == "cuda"
            and triton_available() and torch.cuda.get_device_capability(self.device) >= (8, 9)
        )  # fmt: skip
        # `model`: already built and placed (benchmarks' random-weight models); `model_dir`
        # then only names it.
        self.model = model or load_model(
            model_dir, self.device, self.dtype, progress=progress, ep=ep,
            keep_fp8_experts=keep_fp8, mtp=config.speculative_mtp > 0,
        )  # fmt: skip
        if config.speculative_mtp > 0 and self.model.mtp is None:
            raise ValueError("--speculative-mtp: the model was built without its MTP module")
        self.model_config = cfg = self.model.config
        self.grammars = GrammarBackend(self.model_dir, cfg.vocab_size, cfg.eos_token_ids)
        self.expert_load: ExpertLoad | None = None
        if config.record_expert_load and cfg.n_routed_experts:
            self.expert_load = ExpertLoad(cfg.num_hidden_layers, cfg.n_routed_experts, self.device)
            self.model.record_expert_load(self.expert_load)
        self.two_batch_overlap = config.enable_two_batch_overlap and ep is not None
        self.grouped_gemm = select_grouped_gemm(
            self.model, config.grouped_gemm_backend, ep is not None, self.dtype, self.device
        )
        self.max_context_len = min(
            config.max_context_len or cfg.max_position_embeddings, self.model.rope.max_positions
        )
        # The MTP module's KV is one more layer of the cache, moved and cached with the rest.
        num_layers = cfg.num_hidden_layers + (1 if self.model.mtp is not None else 0)
        num_pages = num_kv_pages(config, num_layers, cfg.kv_cache_dim, self.dtype, self.device)
        per_token = KVCache.bytes_per_token(num_layers, cfg.kv_cache_dim, self.dtype)
        host_pages = int(config.prefix_cache_host_space * (1 << 30)) // (
            per_token * config.page_size
        )
        self.kv = KVCache(
            num_layers,
            num_pages,
            config.page_size,
            cfg.kv_cache_dim,
            self.dtype,
            self.device,
            prefix_caching=config.enable_prefix_caching,
            host_pages=host_pages,
        )
        self.scheduler = Scheduler(
            self.kv.allocator,
            config.page_size,
            config.max_running_requests,
            step_token_budget(config, ep),
        )
        if config.kv_swap_space > 0:
            swap_tokens = int(config.kv_swap_space * (1 << 30)) // per_token
            self.scheduler.swap = KVSwap(self.kv, swap_tokens)
        self.speculator: Speculator | None = None
        if config.speculative_ngram > 0 or config.speculative_mtp > 0:
            self.speculator = Speculator(config, self.max_context_len)
            self.scheduler.speculate = self.speculator.guess
            self.scheduler.speculate_max_running = config.speculative_max_running
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and ep is None and config.cuda_graph_max_batch:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv,
                min(config.cuda_graph_max_batch, config.max_running_requests),
                pages_needed(self.max_context_len, config.page_size),
                self.expert_load,
            )
            self.graphs.capture()
        self.requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_moved_in = 0  # requests that came with their KV from another rank of its role
        self.handoffs: list[Sequence] = []
        # Prefill rank (`KVHandoff.bind`): given a step's batch, what the model calls after
        # each layer to write that layer's KV of the prompts the step finishes ahead of their
        # sends; None when there are none.
        self.layer_writes: Callable[[ScheduledBatch], Callable[[int], None] | None] | None = None
        self._reserved: list[Sequence] = []
        self.idle = True  # the last step found nothing to do
        # Logits of the last step, by request id (kept for parity tests and debugging).
        self.step_logits: tuple[list[str], torch.Tensor | None] = ([], None)
        logger.info(
            "engine ready: %s on %s (%s), KV %d pages x %d tokens (host tier: %d pages); %s",
            self.model_dir.name,
            self.device,
            config.dtype,
            num_pages,
            config.page_size,
            host_pages,
            self.fast_path(),
        )

    def fast_path(self) -> str:
        """Which implementations this rank runs, in words (for logs and benchmarks)."""
        attn = [m for m in self.model.modules() if isinstance(m, MLAttention)]
        attention = {m.decode_backend for m in attn}
        experts = [m for m in self.model.modules() if isinstance(m, RoutedExperts)]
        parts = [f"decode attention {'/'.join(sorted(attention)) or 'none'}"]
        if experts:
            fp8 = " (FP8 weights)" if experts[0].is_fp8 else ""
            parts.append(f"experts {experts[0].backend}{fp8}")
        elif self.ep is not None:
            parts.append(f"EP experts {self.grouped_gemm}")
        if self.model.cpu_layers is not None:
            parts.append("decode layers in one C call")
        elif any(m.cpu_block is not None for m in attn):
            parts.append("decode blocks in C")
        graphs = self.graphs
        parts.append(f"CUDA graphs up to batch {graphs.max_batch}" if graphs else "no CUDA graphs")
        return ", ".join(parts)

    # ---- requests -------------------------------------------------------------------------

    def info(self) -> RankInfo:
        cfg = self.model_config
        return RankInfo(
            model_name=self.model_dir.name,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            max_context_len=self.max_context_len,
            eos_token_ids=cfg.eos_token_ids,
            kv_capacity_tokens=self.kv.capacity_tokens,
            page_size=self.kv.page_size,
            num_pages=self.kv.num_pages,
        )

    def validate(self, req: GenerateRequest) -> None:
        """Raise ValueError (naming the field) for a request this rank cannot serve."""
        check_request(req, self.info(), self.requests, self.grammars)

    def add(self, req: GenerateRequest, mode: str = "full") -> None:
        """Queue a request. `mode` "full" computes and generates; "prefill" computes the prompt
        and samples the first token, then hands the request off (`take_handoffs`) with its pages
        held; "decode" waits for pages (`take_reserved`), then for its prompt's KV to arrive
        (`admit_received`), then generates."""
        if mode not in ("full", "prefill", "decode"):
            raise ValueError(f"mode must be full, prefill or decode, got {mode!r}")
        self.validate(req)
        if req.migrated and mode != "decode":
            raise ValueError("migrated: a request moving with its KV is added to wait for it")
        seq = new_sequence(req, next(self._arrivals), mode == "prefill", self.grammars)
        self.requests[req.rid] = seq
        self.idle = False
        if mode == "decode":
            self.scheduler.expect_kv(seq)
            self.num_moved_in += req.migrated
        else:
            self.scheduler.add(seq)

    # ---- disaggregation ---------------------------------------------------------------------

    def take_handoffs(self) -> list[Sequence]:
        """Prefill-only requests finished since the last call: `pages` hold their KV, the last
        of `token_ids` is the first sampled token. Free them with `release` once sent."""
        out, self.handoffs = self.handoffs, []
        return out

    def reserve_kv(self) -> list[Sequence]:
        """Decode side: give pages to waiting requests now (also done by every `step`); they
        are then in `take_reserved`."""
        reserved = self.scheduler.reserve_kv()
        self._reserved.extend(reserved)
        return reserved

    def take_unplaced(self) -> list[TokenDelta]:
        """Decode side: the last deltas of requests that were to move here with their KV but
        found no free pages (`Scheduler.reserve_kv`): they fail, and the router resumes them
        elsewhere from their output."""
        out = []
        for seq in self.scheduler.unplaced:
            delta = self.fail(seq.rid, "no free KV pages on the rank it was to move to")
            if delta is not None:
                out.append(delta)
        self.scheduler.unplaced.clear()
        return out

    def take_reserved(self) -> list[Sequence]:
        """Decode-side requests that got pages since the last call, ready to receive their KV."""
        out, self._reserved = self._reserved, []
        return out

    def admit_received(
        self,
        rid: str,
        first_token: int,
        first_logprob: TokenLogprob | None = None,
        num_cached_tokens: int = 0,
        guesses: list[int] | None = None,
    ) -> TokenDelta | None:
        """The prompt's KV of `rid` is in its pages: it joins the batch with its first token
        (and that token's logprob, computed by the prefill rank, when the request asks;
        `num_cached_tokens`: prompt tokens the prefill rank's prefix cache held; `guesses`:
        the sender's MTP guesses after its last token, for the first step here)."""
        seq = self.requests.get(rid)
        if seq is None or seq.status is not SeqStatus.RECEIVING:
            return None  # aborted meanwhile
        seq.num_cached_tokens = num_cached_tokens
        seq.mtp_draft = list(guesses or ())
        if seq.migrated:  # its tokens came with it: the sender's last one is ours
            if first_token != seq.token_ids[-1]:
                return self.fail(
                    rid, f"the KV that arrived is of other tokens (last token {first_token}, "
                    f"expected {seq.token_ids[-1]})",
                )  # fmt: skip
            self.scheduler.admit_received(seq)
            self.idle = False
            arrived = token_delta(seq, [], None)
            arrived.kv_arrived = True  # the router needs the rank it left no more
            return arrived
        skip_draws(seq.generator, 1)  # the prefill rank drew the first token: draw on from there
        self.scheduler.admit_received(seq)
        self.idle = False
        return append_token(self, seq, first_token, first_logprob)

    def migrate_out(self, rid: str, new_rid: str) -> tuple[Sequence, TokenDelta] | None:
        """Decode side: hand request `rid`, decoding here, off to another decode rank with its
        KV. It leaves the batch and is held under `new_rid` (its pages kept until `release`),
        ready to send the KV of its tokens but the last; returned with the last delta of `rid`
        (resumable, `moved_to` set). None when `rid` is not decoding here now (finished,
        queued, preempted, its own KV still arriving): it stays."""
        seq = self.requests.get(rid)
        if (
            seq is None or seq.status is not SeqStatus.RUNNING or not seq.is_decoding
            or new_rid in self.requests
        ):  # fmt: skip
            return None
        delta = token_delta(seq, [], FinishReason.ERROR)
        delta.error = "moved to another decode rank with its KV"
        delta.resumable, delta.moved_to = True, new_rid
        del self.requests[rid]
        seq.rid = new_rid
        self.requests[new_rid] = seq
        self.scheduler.hand_off(seq)
        return seq, delta

    def release(self, rid: str) -> None:
        """Forget a handed-off request and free its pages (its KV was sent, or failed to be)."""
        seq = self.requests.pop(rid, None)
        if seq is not None:
            self.scheduler.remove(seq)
            self.idle = False  # freed pages may let waiting requests in

    def fail(self, rid: str, error: str) -> TokenDelta | None:
        """End `rid` with an error (e.g. its KV transfer failed), freeing its pages."""
        delta = self.abort(rid)
        if delta is not None:
            delta.finish_reason, delta.error = FinishReason.ERROR, error
        return delta

    def abort(self, rid: str) -> TokenDelta | None:
        seq = self.requests.pop(rid, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        self.idle = False  # freed pages may let waiting requests in
        return token_delta(seq, [], FinishReason.ABORT)

    def detach(self, rid: str) -> list[int]:
        """End `rid` without a delta and keep its pages allocated: the caller frees them with
        `free_pages` once nothing writes them any more (a receive's sender may still)."""
        seq = self.requests.pop(rid, None)
        return [] if seq is None else self.scheduler.remove(seq, keep_pages=True)

    def free_pages(self, pages: list[int]) -> None:
        """Free pages kept by `detach`."""
        self.kv.allocator.free(pages)
        self.idle = False  # freed pages may let waiting requests in

    def abort_all(self, error: str) -> list[TokenDelta]:
        out = []
        for rid in list(self.requests):
            delta = self.abort(rid)
            if delta is not None:
                delta.finish_reason, delta.error = FinishReason.ERROR, error
                out.append(delta)
        return out

    @property
    def last_logits(self) -> dict[str, torch.Tensor]:
        """Logits `[vocab]` of the last step by request id (built on access: off the hot path)."""
        rids, logits = self.step_logits
        return {} if logits is None else {rid: logits[i] for i, rid in enumerate(rids)}

    def flush_prefix_cache(self) -> int:
        """Forget the prefix cache (requests in flight keep their pages, and the pages they
        fill from now on are cached again); the idle pages freed."""
        for seq in self.requests.values():
            seq.cacheable = False  # until its pages are recomputed from the first
        return self.kv.allocator.flush()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> RankStats:
        swap, host, spec = self.scheduler.swap, self.kv.allocator.host, self.speculator
        return RankStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_pages_total=self.kv.num_pages,
            num_pages_free=self.kv.allocator.num_free,
            num_steps=self.num_steps,
            num_generated_tokens=self.num_generated_tokens,
            num_in_transfer=len(self.requests)
            - len(self.scheduler.running)
            - len(self.scheduler.waiting),
            num_pages_cached=self.kv.allocator.num_idle,
            num_prefix_queried_tokens=self.kv.allocator.num_queried_tokens,
            num_prefix_hit_tokens=self.kv.allocator.num_hit_tokens,
            num_prefix_host_hit_tokens=self.kv.allocator.num_host_hit_tokens,
            num_host_cached_pages=host.num_pages if host is not None else 0,
            num_transfer_skipped_tokens=self.scheduler.num_reused_tokens,
            num_parked=self.scheduler.num_parked,
            num_preemptions=self.scheduler.num_preemptions,
            num_swapped_out=swap.num_swapped_out if swap is not None else 0,
            num_swapped_tokens=swap.num_tokens if swap is not None else 0,
            num_spec_draft_tokens=spec.num_guessed_tokens if spec is not None else 0,
            num_spec_accepted_tokens=spec.num_accepted_tokens if spec is not None else 0,
            num_moved_in=self.num_moved_in,
        )

    def take_expert_load(self) -> torch.Tensor | None:
        """Tokens routed per (layer, logical expert) since the last call (CPU int64)."""
        return None if self.expert_load is None else self.expert_load.take()

    # ---- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, run_empty: bool = False) -> list[TokenDelta]:
        """Schedule and run one batch (`workers.engine.step`). `run_empty`: run the model even
        on an empty batch — a rank of an expert-parallel pool must, whenever another rank of
        the pool steps, so that the MoE layers' collectives match."""
        return run_step(self, run_empty)
