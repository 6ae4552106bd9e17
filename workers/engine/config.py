"""`EngineConfig`: how one engine rank runs (KV capacity, batching limits, device)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16  # tokens per KV page
    kv_capacity_tokens: int | None = None  # KV capacity in tokens; wins over the fraction
    # GPU: the share of the rank's device memory that weights + KV cache may take (default
    # 0.85; the rest is activations and CUDA graphs). CPU: the share of RAM for the KV cache
    # (default 0.1).
    kv_memory_fraction: float | None = None
    # Host memory (GiB) for the KV of preempted requests, which then resume where they were
    # instead of computing their tokens again (`KVSwap`); 0: always recompute. Used only when
    # a rank runs out of KV pages, and only as much as it needs.
    kv_swap_space: float = 4.0
    # Host memory (GiB) for the prefix cache's second tier: full pages the device lets go are
    # kept there and copied back for a request that starts with them (`HostPageCache`); 0: off.
    prefix_cache_host_space: float = 0.0
    # Speculative decoding by n-gram lookup (`workers.engine.speculative`): guess up to this
    # many tokens a step for each request from where its newest `speculative_ngram_max`
    # down to `speculative_ngram_min` tokens occurred before; 0: off. No guesses while more
    # than `speculative_max_running` requests run on the rank (0: however many). With
    # `speculative_ngram_shared` tokens, finished requests' outputs are looked up too.
    speculative_ngram: int = 0
    speculative_ngram_min: int = 2
    speculative_ngram_max: int = 4
    speculative_max_running: int = 0
    speculative_ngram_shared: int = 0
    # Speculative decoding with the model's multi-token-prediction module as the draft model
    # (`workers.model.mtp`): this many guessed tokens a step per request (the module's guess,
    # then its guesses on its own guesses); 0: off.
    speculative_mtp: int = 0
    # A prefill rank writes each layer's KV of a prompt it is finishing to the decode rank as
    # soon as that layer is computed (`KVTransferEngine.write_ahead`), when the decode rank's
    # pages are known by then; else (False, or no target yet) all layers after the prefill.
    kv_write_ahead: bool = True
    gpu_memory_share: float = 1.0  # the rank's share of its GPU (set by the launcher)
    max_running_requests: int = 256
    # Share the KV of full pages between requests whose tokens begin alike.
    enable_prefix_caching: bool = True
    chunked_prefill_size: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_context_len: int | None = None  # default: the model's max_position_embeddings
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # threads on CPU (torch, C kernels); default: Ray's allotment
    # Expert parallelism (a pool of several ranks; see workers.ep).
    num_redundant_experts: int = 0  # physical expert slots beyond one per logical expert
    moe_a2a_backend: str = "auto"  # auto | torch | deepep
    deepep_mode: str = "auto"  # auto (prefill pool: normal, decode pool: low_latency) | ...
    low_latency_capacity: int = 128  # low-latency mode: rows per expert slot per source rank
    enable_two_batch_overlap: bool = False
    # How long a rank waits for its pool's other ranks to meet (and to reach rank 0's store)
    # before it gives up and is restarted. A pool forms before the ranks load their models, so
    # they meet within seconds; a longer wait means a rank died while meeting (see
    # `workers.ep.group.Rendezvous`).
    pool_formation_timeout_s: float = 60.0
    grouped_gemm_backend: str = "auto"  # auto | torch | deep_gemm (FP8, Hopper, EP pools)
    record_expert_load: bool = True  # count routed tokens per (layer, expert) for EPLB
    # An FP8 checkpoint's routed experts stay FP8 on GPUs with FP8 support (sm89+, Triton,
    # single-rank pools); elsewhere, or when False, they are dequantized at load.
    keep_fp8_experts: bool = True
    # Decode batches up to this size replay CUDA graphs (CUDA, single-rank pools); 0: off.
    cuda_graph_max_batch: int = 256
    # Publish a running request's tokens every this many (its first token and its end at
    # once): larger values trade streaming smoothness for throughput (`StreamBuffer`).
    stream_interval: int = 1
    # Build the structured-output compiler (xgrammar over the model's vocabulary) as the rank
    # starts, before it reports ready (~2 s: it imports transformers), so that the first
    # constrained request does not wait for it; False: on that first request.
    preload_structured_output: bool = True

    def __post_init__(self) -> None:
        # Messages name the `pdserve serve` flag where there is one (gpu_memory_share and
        # pool_formation_timeout_s have none).
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {self.num_threads}")
        if self.page_size < 1:
            raise ValueError(f"--page-size must be >= 1, got {self.page_size}")
        if not (math.isfinite(self.kv_swap_space) and self.kv_swap_space >= 0):
            raise ValueError(f"--kv-swap-space must be >= 0 (GiB), got {self.kv_swap_space}")
        host = self.prefix_cache_host_space
        if not (math.isfinite(host) and host >= 0):
            raise ValueError(f"--prefix-cache-host-space must be >= 0 (GiB), got {host}")
        for name in (
            "speculative_ngram", "speculative_ngram_shared", "speculative_max_running",
            "speculative_mtp",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= 0, got {getattr(self, name)}")
        if self.speculative_ngram and self.speculative_mtp:
            raise ValueError(
                "--speculative-ngram and --speculative-mtp: choose one source of guesses"
            )
        if self.speculative_ngram == 0 and self.speculative_ngram_shared:
            raise ValueError("--speculative-ngram-shared goes with --speculative-ngram K")
        if not (self.speculative_ngram or self.speculative_mtp) and self.speculative_max_running:
            raise ValueError(
                "--speculative-max-running goes with --speculative-ngram K or --speculative-mtp "
                "(speculative decoding is off)"
            )
        if not 1 <= self.speculative_ngram_min <= self.speculative_ngram_max:
            raise ValueError(
                "--speculative-ngram-min and --speculative-ngram-max must satisfy 1 <= min <= "
                f"max, got {self.speculative_ngram_min} and {self.speculative_ngram_max}"
            )
        if host > 0 and not self.enable_prefix_caching:
            raise ValueError(
                "--prefix-cache-host-space is the prefix cache's second tier: it needs prefix "
                "caching (drop --disable-prefix-caching, or set it to 0)"
            )
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < self.page_size:
            raise ValueError(
                f"--kv-capacity-tokens ({self.kv_capacity_tokens}) must hold at least one page "
                f"of {self.page_size} tokens (--page-size)"
            )
        if self.kv_memory_fraction is not None and not 0.0 < self.kv_memory_fraction <= 0.95:
            raise ValueError(
                f"--kv-memory-fraction must be in (0, 0.95], got {self.kv_memory_fraction}"
            )
        if not 0.0 < self.gpu_memory_share <= 1.0:
            raise ValueError(f"gpu_memory_share must be in (0, 1], got {self.gpu_memory_share}")
        if self.max_running_requests < 1:
            raise ValueError(
                f"--max-running-requests must be >= 1, got {self.max_running_requests}"
            )
        if self.chunked_prefill_size < 1:
            raise ValueError(
                f"--chunked-prefill-size must be >= 1, got {self.chunked_prefill_size}"
            )
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        # engine.py clamps a context longer than the model's to the model's; 0 or less would
        # refuse every request (or, as 0 is falsy, silently mean the model's).
        if self.max_context_len is not None and self.max_context_len < 1:
            raise ValueError(
                f"--max-context-len must be >= 1 tokens (leave it out for the model's), "
                f"got {self.max_context_len}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.num_redundant_experts < 0:
            raise ValueError(
                f"--num-redundant-experts must be >= 0, got {self.num_redundant_experts}"
            )
        if self.moe_a2a_backend not in ("auto", "torch", "deepep"):
            raise ValueError(
                f"--moe-a2a-backend must be auto, torch or deepep, got {self.moe_a2a_backend!r}"
            )
        if self.deepep_mode not in ("auto", "normal", "low_latency"):
            raise ValueError(
                f"--deepep-mode must be auto, normal or low_latency, got {self.deepep_mode!r}"
            )
        if self.grouped_gemm_backend not in ("auto", "torch", "deep_gemm"):
            raise ValueError(
                f"--grouped-gemm-backend must be auto, torch or deep_gemm, "
                f"got {self.grouped_gemm_backend!r}"
            )
        if self.cuda_graph_max_batch < 0:
            raise ValueError(
                f"--cuda-graph-max-batch must be >= 0 (0 turns graphs off), "
                f"got {self.cuda_graph_max_batch}"
            )
        # `not 0 < x < inf` also refuses NaN (which passes `x <= 0`); an infinite wait
        # overflows the store's timedelta.
        if not 0 < self.pool_formation_timeout_s < math.inf:
            raise ValueError(
                f"pool_formation_timeout_s must be a positive number of seconds, "
                f"got {self.pool_formation_timeout_s}"
            )
        if self.low_latency_capacity < 1:
            raise ValueError(
                f"--low-latency-capacity must be >= 1, got {self.low_latency_capacity}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
