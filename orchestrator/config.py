"""`ServeConfig`: everything `pdserve serve` needs, validated once, before anything starts."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.reasoning import REASONING_PARSERS
from orchestrator.tls import TlsFiles, check_client_cas, check_tls_files
from orchestrator.tool_parser import FORMATS
from workers.engine.config import EngineConfig
from workers.engine.delta_stream import HEARTBEAT_S
from workers.model.hub import CheckpointSource, check_model_arg

TOOL_CALL_PARSERS = ("auto", *FORMATS)


@dataclass(frozen=True)
class ServeConfig:
    # A Hugging Face checkpoint dir or Hub repository id; None serves the built-in tiny model.
    model: str | None = None
    revision: str | None = None  # of a Hub repository (default: its main branch)
    download_dir: str | None = None  # where Hub checkpoints are fetched to (default: HF's cache)
    # Name in /v1/models; default: the repository id, or the checkpoint dir's name.
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000  # 0 picks a free port
    ray_address: str | None = None  # None starts a local Ray instance; "auto" joins `ray start`
    colocated: bool = (
        False  # one pool does prefill and decode, instead of two linked by KV transfer
    )
    num_ranks: int = 1  # colocated: ranks of the one pool
    prefill_dp: int = 1  # disaggregated: ranks of the prefill pool
    decode_dp: int = 1  # disaggregated: ranks of the decode pool
    prefill_instances: int = 1  # disaggregated: independent prefill pools of prefill_dp ranks
    decode_instances: int = 1  # disaggregated: independent decode pools of decode_dp ranks
    placement_timeout_s: float = 120.0  # how long to wait for the cluster to place the pools
    # How long an instance scaled down lets its requests run before the rest move to other
    # instances (resuming from their output), unless the scale says (`drain_timeout_s`).
    scale_drain_timeout_s: float = 60.0
    # A decode instance scaled down hands its decoding requests to other decode instances with
    # their KV at the drain timeout (nothing computed again); False: they resume from their
    # output there, computing prompt and output again.
    kv_migration: bool = True
    # With `kv_migration`: every this many seconds, a generating rank whose KV runs out hands
    # requests, with their KV, to ranks of its role with room (`orchestrator.kv_relief`)
    # instead of preempting them; 0: never.
    kv_pressure_interval_s: float = 2.0
    # Replace a pool instance one of whose ranks is dead for good (Ray does not restart it).
    replace_dead_instances: bool = True
    # Pools that outlive this process (`orchestrator.deployment`): detached, named after it,
    # taken over by the next `serve` of the same name; None: they go with the process.
    deployment: str | None = None
    keep_pools: bool = False  # a graceful stop leaves the deployment's pools running
    # One more router for this deployment, beside the one that started it
    # (`orchestrator.front`); None: this router starts (or takes over) its pools.
    front: str | None = None
    # Autoscaling (`orchestrator.autoscale`): up to this many instances of a role, by load; the
    # starting count is the minimum. None: that role is not autoscaled.
    max_prefill_instances: int | None = None
    max_decode_instances: int | None = None
    max_instances: int | None = None  # colocated
    autoscale_target: float = 0.8  # utilization that adds an instance
    autoscale_up_after_s: float = 30.0  # ... held on average this long
    autoscale_down_after_s: float = 300.0  # below target × 0.4 this long: one fewer
    allow_fault_injection: bool = False  # tests only: ranks accept `inject_fault`
    grpc_port: int | None = None  # the gRPC API's port (0: a free one); None: no gRPC
    admin_token: str | None = None  # enables /admin/* (Bearer token); None: admin is off
    api_key: str | None = None  # required (Bearer) by the inference routes; None: open
    # TLS for HTTP and gRPC (PEM files); None: plain text (TLS ends at a proxy, or loopback).
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # With TLS: require every client to present a certificate signed by one of these CAs
    # (PEM bundle), on HTTP and gRPC alike (mutual TLS). None: clients need no certificate.
    ssl_ca_certs: str | None = None
    eplb_interval_s: float | None = None  # periodic expert rebalancing; None: on command only
    eplb_min_balancedness: float = 0.95  # a periodic rebalance is skipped above this
    # The most expert weights a rank stages for one round of a rebalance (GiB); a rebalance
    # that moves more goes in rounds of whole layers, each with its own short pause.
    eplb_max_staging_gib: float = 2.0
    init_expert_placement: str | None = None  # JSON file of saved placements (`--dump`)
    transfer_backend: str = "nixl"
    transfer_timeout_s: float = 30.0  # a KV transfer (or its handshake) that takes longer fails
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_request_body_bytes: int = 8 * 1024 * 1024
    # `/generate` streams: an event carries only its new text and output_ids (default: all so
    # far, SGLang's default, whose bytes grow with the square of the output's length).
    incremental_streaming_output: bool = False
    # A stream silent this long gets an SSE comment (": keep-alive"), which clients skip, so
    # that proxies do not close it; 0: never.
    sse_keepalive_s: float = 15.0
    # How the model writes tool calls (`orchestrator.tool_parser.FORMATS`); "auto": as its
    # chat template writes them.
    tool_call_parser: str = "auto"
    # Whether chat answers' `<think>` blocks come apart as `reasoning_content`: "deepseek_r1"
    # always, "none" never, "auto" when the chat template knows thinking blocks.
    reasoning_parser: str = "auto"
    max_prompt_tokens: int | None = None  # longer prompts are refused; None: the model's limits
    max_concurrent_requests_per_client: int | None = None  # per client address; None: no cap
    # Load shedding: while this many requests wait for their first token, new ones get 503
    # (Retry-After: 1) instead of queueing; None: no cap.
    max_queued_requests: int | None = None
    default_max_new_tokens: int = 128  # when a request does not say
    request_timeout_s: float | None = 600.0  # a request running longer is aborted
    # A request whose rank fails under it, with no other rank (pair) to go on on, waits this
    # long for a rank to come back (Ray restarts it) and resumes there; 0: it ends at once.
    rank_restart_wait_s: float = 120.0
    # On SIGTERM/SIGINT: refuse new requests and let those in flight finish for up to this
    # long before stopping (0: stop at once).
    drain_timeout_s: float = 30.0
    ready_timeout_s: float = 900.0  # how long `serve` waits for the ranks to load the model
    # A rank whose output stream sends nothing (no output, no heartbeat) this long is failed.
    stream_silence_s: float = 30.0
    log_level: str = "info"
    log_requests: bool = False  # a JSON line per ended request (`orchestrator.request_log`)
    # A span per request to this OTLP/HTTP traces URL (`orchestrator.tracing`); None: off.
    otlp_traces_endpoint: str | None = None
    otel_service_name: str = "pdserve"  # the spans' `service.name`
    access_log: bool = False  # uvicorn's line per HTTP request (costly at high request rates)

    def autoscale_bounds(self) -> dict[str, int]:
        """The roles autoscaled: their maximum instances."""
        if self.colocated:
            pairs = [("colocated", self.max_instances)]
        else:
            pairs = [("prefill", self.max_prefill_instances),
                     ("decode", self.max_decode_instances)]  # fmt: skip
        return {role: n for role, n in pairs if n is not None}

    def start_counts(self) -> dict[str, int]:
        """The instances per role it starts with (the autoscaler's minimum)."""
        return {"colocated": 1, "prefill": self.prefill_instances,
                "decode": self.decode_instances}  # fmt: skip

    def _check_autoscale(self) -> None:
        start = self.start_counts()
        flags = {"colocated": "--max-instances", "prefill": "--max-prefill-instances",
                 "decode": "--max-decode-instances"}  # fmt: skip
        other = (
            ("prefill", self.max_prefill_instances), ("decode", self.max_decode_instances)
        ) if self.colocated else (("colocated", self.max_instances),)  # fmt: skip
        for role, n in other:
            if n is not None:
                kind = "colocated" if self.colocated else "disaggregated"
                raise ValueError(f"{flags[role]} does not apply to a {kind} server")
        for role, n in self.autoscale_bounds().items():
            if not 1 <= n <= 256:
                raise ValueError(f"{flags[role]} must be in [1, 256], got {n}")
            if n < start[role]:
                raise ValueError(
                    f"{flags[role]} {n} is below the instances it starts with ({start[role]})"
                )
        if not 0 < self.autoscale_target <= 4:
            raise ValueError(f"--autoscale-target must be in (0, 4], got {self.autoscale_target}")
        _check_seconds("--autoscale-up-after", self.autoscale_up_after_s)
        _check_seconds("--autoscale-down-after", self.autoscale_down_after_s)

    @property
    def starts_local_ray(self) -> bool:
        """`ray.init` will start a Ray of its own: no --address and no `RAY_ADDRESS` (a Ray this
        process starts gets no new nodes, and ends with it)."""
        return self.ray_address is None and not os.environ.get("RAY_ADDRESS")

    @property
    def colocated_migration(self) -> bool:
        """Whether colocated ranks open a transfer engine, to move requests between
        instances with their KV: with `kv_migration`, when the instances may change (admin
        scaling, autoscaling)."""
        return (
            self.colocated and self.kv_migration
            and (self.admin_token is not None or self.max_instances is not None)
        )  # fmt: skip

    @property
    def scale_drain_s(self) -> float:
        """How long a pool instance scaled down lets its requests run on, unless the scale
        says (`--scale-drain-timeout`); what still runs then moves, resuming elsewhere."""
        return self.scale_drain_timeout_s

    @property
    def topology(self) -> str:
        if self.colocated:
            return f"colocated: one pool of {self.num_ranks} rank(s)"

        def pools(n: int, role: str, dp: int) -> str:
            return (
                f"{n} {role} pool(s) of {dp} rank(s)" if n > 1 else f"{role} pool of {dp} rank(s)"
            )

        return (
            f"disaggregated: {pools(self.prefill_instances, 'prefill', self.prefill_dp)}, "
            f"{pools(self.decode_instances, 'decode', self.decode_dp)}, "
            f"KV over {self.transfer_backend}"
        )

    @property
    def checkpoint(self) -> CheckpointSource | None:
        """Where `--model` comes from; None: the built-in tiny model."""
        if self.model is None:
            return None
        return CheckpointSource(self.model, self.revision, self.download_dir)

    def model_name(self, model_dir: Path) -> str:
        """The name the API serves the model as."""
        if self.served_model_name:
            return self.served_model_name
        checkpoint = self.checkpoint
        return (
            checkpoint.model
            if checkpoint is not None and checkpoint.is_hub_repo
            else model_dir.name
        )

    @property
    def tls(self) -> TlsFiles | None:
        """The PEM files to serve TLS with; None: plain text."""
        if self.ssl_certfile is None or self.ssl_keyfile is None:
            return None
        return TlsFiles(self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certs)

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            check_model_arg(self.checkpoint)
        elif self.revision is not None or self.download_dir is not None:
            raise ValueError("--revision and --download-dir go with --model")
        if not self.host:
            raise ValueError("--host must not be empty (use 0.0.0.0 to listen on all interfaces)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535] (0 picks a free port), got {self.port}")
        if self.num_ranks < 1:
            raise ValueError(f"--dp must be >= 1, got {self.num_ranks}")
        for name in ("prefill_dp", "decode_dp", "prefill_instances", "decode_instances"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.transfer_backend != "nixl":
            raise ValueError(
                f"--transfer-backend must be nixl (the local backend works inside one process "
                f"only), got {self.transfer_backend!r}"
            )
        _check_seconds("--transfer-timeout", self.transfer_timeout_s)
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"--grpc-port must be in [0, 65535], got {self.grpc_port}")
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise ValueError("--admin-token must be at least 8 characters")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key must be at least 8 characters")
        if self.api_key is not None and self.api_key == self.admin_token:
            raise ValueError(
                "--api-key and --admin-token must differ (every API client would be an admin)"
            )
        if self.eplb_interval_s is not None:
            _check_seconds("--eplb-interval-s", self.eplb_interval_s)
        if not 0.0 < self.eplb_min_balancedness <= 1.0:
            raise ValueError(
                f"--eplb-min-balancedness must be in (0, 1], got {self.eplb_min_balancedness}"
            )
        if not 0.0 < self.eplb_max_staging_gib < math.inf:
            raise ValueError(
                f"--eplb-max-staging-gib must be a positive number, got {self.eplb_max_staging_gib}"
            )
        if (
            self.init_expert_placement is not None
            and not Path(self.init_expert_placement).is_file()
        ):
            raise ValueError(
                f"--init-expert-placement {self.init_expert_placement!r}: no such file"
            )
        _check_seconds("--placement-timeout", self.placement_timeout_s)
        if not 0 <= self.scale_drain_timeout_s < math.inf:
            raise ValueError(
                "--scale-drain-timeout must be a number of seconds >= 0 (0: move the requests "
                f"at once), got {self.scale_drain_timeout_s}"
            )
        if not 0 <= self.kv_pressure_interval_s < math.inf:
            raise ValueError(
                "--kv-pressure-interval must be a number of seconds >= 0 (0: off), got "
                f"{self.kv_pressure_interval_s}"
            )
        self._check_autoscale()
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")
        if (
            self.max_concurrent_requests_per_client is not None
            and self.max_concurrent_requests_per_client < 1
        ):
            raise ValueError("--max-concurrent-requests-per-client must be >= 1")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"--max-queued-requests must be >= 1, got {self.max_queued_requests}")
        if self.max_request_body_bytes < 1024:
            raise ValueError(
                f"--max-request-body-bytes must be >= 1024, got {self.max_request_body_bytes}"
            )
        if self.default_max_new_tokens < 1:
            raise ValueError(
                f"--default-max-new-tokens must be >= 1, got {self.default_max_new_tokens}"
            )
        if self.request_timeout_s is not None:
            _check_seconds("--request-timeout", self.request_timeout_s)
        if self.otlp_traces_endpoint is not None and not self.otlp_traces_endpoint.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                "--otlp-traces-endpoint must be an http:// or https:// URL (OTLP over HTTP, "
                f"e.g. http://collector:4318/v1/traces), got {self.otlp_traces_endpoint!r}"
            )
        if self.deployment is not None:
            from orchestrator.deployment import check_name

            check_name(self.deployment)
            if self.starts_local_ray:
                raise ValueError(
                    "--deployment needs --address: a Ray that this process starts ends with it, "
                    "and its pools with it (start one with `ray start --head` or `ray up`)"
                )
        if self.front is not None:
            from orchestrator.deployment import check_name

            check_name(self.front, "--front")
            if self.deployment is not None:
                raise ValueError(
                    f"--front {self.front} serves that deployment beside its router; --deployment "
                    f"{self.deployment} starts (or takes over) another: give one of them"
                )
            if self.starts_local_ray:
                raise ValueError("--front needs --address: the cluster where the deployment runs")
        if self.keep_pools and self.deployment is None:
            raise ValueError("--keep-pools needs --deployment (pools of no name cannot be found "
                             "again)")  # fmt: skip
        if not 0 <= self.sse_keepalive_s < math.inf:
            raise ValueError(
                f"--sse-keepalive must be a number of seconds >= 0 (0: off), got "
                f"{self.sse_keepalive_s}"
            )
        if not 0 <= self.rank_restart_wait_s < math.inf:
            raise ValueError(
                "--rank-restart-wait must be a number of seconds >= 0 (0: a request whose rank "
                f"fails ends when no other can take it), got {self.rank_restart_wait_s}"
            )
        if not 0 <= self.drain_timeout_s < math.inf:
            raise ValueError(
                f"--drain-timeout must be a number of seconds >= 0 (0: stop at once), "
                f"got {self.drain_timeout_s}"
            )
        _check_seconds("ready_timeout_s", self.ready_timeout_s)
        if not 2 * HEARTBEAT_S <= self.stream_silence_s < math.inf:
            raise ValueError(
                f"stream_silence_s must be a number of seconds >= {2 * HEARTBEAT_S:g} (twice the "
                f"ranks' heartbeat), got {self.stream_silence_s}"
            )
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                f"got {self.tool_call_parser!r}"
            )
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}, "
                f"got {self.reasoning_parser!r}"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            check_tls_files(self.ssl_certfile, self.ssl_keyfile)
        if self.ssl_ca_certs is not None:
            if self.ssl_certfile is None:
                raise ValueError(
                    "--ssl-ca-certs (client certificates) needs TLS: --ssl-certfile and "
                    "--ssl-keyfile"
                )
            check_client_cas(self.ssl_ca_certs)
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(
                f"--log-level must be critical, error, warning, info, debug or trace, "
                f"got {self.log_level!r}"
            )


def _check_seconds(flag: str, value: float) -> None:
    """ValueError naming `flag` unless `value` is a positive, finite number of seconds (NaN
    passes `value <= 0`, and an infinite wait overflows the timers it reaches)."""
    if not 0 < value < math.inf:
        raise ValueError(f"{flag} must be a positive number of seconds, got {value}")


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets (`[::1]:30000`), as URLs and gRPC want it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
