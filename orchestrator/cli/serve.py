"""`pdserve serve`: its flags, the serve config they make, and the command that starts (or joins) a
Ray cluster and serves until interrupted."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from orchestrator.cli.common import say
from orchestrator.tool_parser import FORMATS as TOOL_CALL_FORMATS
from workers import gc_pauses


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start (or join) a Ray cluster and serve a model over HTTP")
    p.add_argument(
        "--model",
        help="Hugging Face checkpoint dir, or Hub repository id (ORG/NAME: fetched once into "
        "the Hub cache on each machine) (default: the built-in tiny model)",
    )
    p.add_argument("--revision", help="branch, tag or commit of a Hub --model (default: main)")
    p.add_argument(
        "--download-dir", metavar="DIR",
        help="fetch Hub checkpoints into this cache dir (default: huggingface_hub's, "
        "$HF_HUB_CACHE)",
    )  # fmt: skip
    p.add_argument(
        "--served-model-name",
        help="name in /v1/models (default: the repository id, or the dir's name)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--grpc-port", type=int, help="also serve the gRPC API here (0: a free port)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="serve config (YAML, e.g. deploy/serve.yaml); flags given here override it",
    )
    p.add_argument("--address", help="Ray cluster to join ('auto': the one `ray start` made)")
    t = p.add_argument_group("topology")
    t.add_argument(
        "--colocated",
        action="store_true",
        help="one pool does prefill and decode (default: a prefill and a decode pool)",
    )
    t.add_argument("--dp", type=int, default=1, help="ranks of the colocated pool")
    t.add_argument("--prefill-dp", type=int, default=1, help="ranks of the prefill pool")
    t.add_argument("--decode-dp", type=int, default=1, help="ranks of the decode pool")
    t.add_argument(
        "--prefill-instances",
        type=int,
        default=1,
        help="independent prefill pools (of --prefill-dp)",
    )
    t.add_argument(
        "--decode-instances", type=int, default=1, help="independent decode pools (of --decode-dp)"
    )
    t.add_argument(
        "--max-prefill-instances", type=int, metavar="N",
        help="autoscale: add prefill instances by load, up to N (the starting count is the "
        "minimum); see --autoscale-target",
    )  # fmt: skip
    t.add_argument(
        "--max-decode-instances", type=int, metavar="N",
        help="autoscale: add decode instances by load, up to N",
    )  # fmt: skip
    t.add_argument(
        "--max-instances", type=int, metavar="N",
        help="autoscale a colocated server's instances (of --dp ranks) up to N",
    )  # fmt: skip
    t.add_argument(
        "--autoscale-target", type=float, default=0.8, metavar="U",
        help="utilization that adds an instance: decode/colocated, KV tokens reserved over "
        "capacity; prefill, queued prompt tokens over two steps' worth (default 0.8); below "
        "0.4 x U for --autoscale-down-after, one goes",
    )  # fmt: skip
    t.add_argument(
        "--autoscale-up-after", type=float, default=30.0, metavar="S",
        help="seconds the mean utilization must hold the target before adding an instance",
    )  # fmt: skip
    t.add_argument(
        "--autoscale-down-after", type=float, default=300.0, metavar="S",
        help="seconds of low utilization before removing the newest instance",
    )  # fmt: skip
    t.add_argument(
        "--placement-timeout", type=float, default=120.0, metavar="S",
        help="seconds to wait for the cluster to place a pool instance, at start and when "
        "scaling (on a cluster that grows: time for the autoscaler to add a node)",
    )  # fmt: skip
    t.add_argument(
        "--scale-drain-timeout", type=float, default=60.0, metavar="S",
        help="seconds an instance scaled down (by pdserve scale without --drain-timeout, or "
        "by the autoscaler) lets its requests run; then the rest move to other instances — "
        "with their KV (decoding on a decode instance, or a colocated one that may scale), "
        "else resuming from their output (0: at once)",
    )  # fmt: skip
    t.add_argument(
        "--deployment", metavar="NAME",
        help="with --address: the pools are detached Ray actors named NAME that outlive this "
        "process; if it dies, the next `pdserve serve --deployment NAME` (same settings) takes "
        "them over in seconds instead of loading the model again. A graceful stop removes them "
        "unless --keep-pools; `pdserve down --deployment NAME` removes them",
    )  # fmt: skip
    t.add_argument(
        "--keep-pools", action="store_true",
        help="with --deployment: a graceful stop (SIGTERM, Ctrl-C) leaves the pools running "
        "for the next `pdserve serve --deployment NAME` (a router upgrade without reloading "
        "the model)",
    )  # fmt: skip
    t.add_argument(
        "--disable-instance-replacement",
        dest="replace_dead_instances",
        action="store_false",
        help="leave a pool instance down when one of its ranks is dead for good (Ray does not "
        "restart it: its model failed to load, or it was killed for good); by default the "
        "instance is taken down and a new one of its role started",
    )
    t.add_argument(
        "--disable-kv-migration",
        dest="kv_migration",
        action="store_false",
        help="at a scaled-down decode instance's drain timeout, resume its requests elsewhere "
        "by computing their prompt and output again; by default their KV moves to another "
        "decode instance (NIXL, as from a prefill rank) and they decode on there",
    )
    t.add_argument(
        "--kv-pressure-interval", type=float, default=2.0, metavar="S",
        help="every S seconds, a decode rank (or colocated one that may scale) whose KV runs "
        "out hands requests to ranks of its role with room, with their KV, instead of "
        "preempting them (they would wait, swapped out or to be recomputed); 0: off (also off with "
        "--disable-kv-migration)",
    )  # fmt: skip
    t.add_argument("--transfer-backend", default="nixl", choices=("nixl",))
    t.add_argument("--transfer-timeout", type=float, default=30.0, help="seconds")
    e = p.add_argument_group("engine")
    e.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    kv = e.add_mutually_exclusive_group()
    kv.add_argument("--kv-capacity-tokens", type=int, help="KV cache size in tokens")
    kv.add_argument(
        "--kv-memory-fraction",
        type=float,
        help="GPU: share of a rank's GPU memory for weights + KV (default 0.85); "
        "CPU: share of RAM for the KV cache (default 0.1)",
    )
    e.add_argument(
        "--kv-swap-space", type=float, default=4.0, metavar="GIB",
        help="host memory per rank for the KV of requests preempted when the KV cache runs "
        "out: they resume where they were instead of computing their tokens again; used only "
        "as needed; 0: always recompute (default 4)",
    )  # fmt: skip
    e.add_argument("--max-running-requests", type=int, default=256)
    e.add_argument(
        "--disable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt whole (by default requests share the KV of common prefixes)",
    )
    e.add_argument(
        "--prefix-cache-host-space", type=float, default=0.0, metavar="GIB",
        help="host memory per rank for a second tier of the prefix cache: full pages the KV "
        "cache lets go are kept there and copied back for requests that begin with them "
        "(long shared prompts, multi-turn chats beyond the KV cache); 0: off (default)",
    )  # fmt: skip
    e.add_argument("--chunked-prefill-size", type=int, default=2048)
    e.add_argument(
        "--speculative-ngram", type=int, default=0, metavar="K",
        help="speculative decoding by n-gram lookup: each request guesses up to K tokens a "
        "step from where its newest tokens occurred before (prompt or output; a structured "
        "request first the text its constraint forces), verified in the same step: the same "
        "tokens, fewer steps when outputs repeat their context; 0: off",
    )  # fmt: skip
    e.add_argument("--speculative-ngram-min", type=int, default=2, metavar="N",
                   help="the shortest run of newest tokens looked up (default 2)")  # fmt: skip
    e.add_argument("--speculative-ngram-max", type=int, default=4, metavar="N",
                   help="the longest, tried first (default 4)")  # fmt: skip
    e.add_argument(
        "--speculative-ngram-shared", type=int, default=0, metavar="TOKENS",
        help="also guess from the outputs of a rank's finished requests, the latest TOKENS "
        "of them (the same question again, templates, an agent's repeated calls); 0: off",
    )  # fmt: skip
    e.add_argument(
        "--speculative-mtp", type=int, default=0, metavar="K",
        help="speculative decoding with the model's multi-token-prediction module (DeepSeek-V3/"
        "R1 checkpoints hold one) as the draft model: each request guesses K tokens a step "
        "(the module's guess, then its guesses on its own), verified in the same step; 0: off",
    )  # fmt: skip
    e.add_argument(
        "--speculative-max-running", type=int, default=0, metavar="N",
        help="no guesses while more than N requests run on a rank, where a step is bound by "
        "compute rather than memory and extra rows cost their share (0: however many)",
    )  # fmt: skip
    e.add_argument(
        "--lazy-structured-output",
        dest="preload_structured_output",
        action="store_false",
        help="build each rank's structured-output compiler on the first constrained request "
        "instead of at start (saves ~2 s of start-up and ~100 MB per rank)",
    )
    e.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="send a request's tokens every N tokens (the first at once): higher values trade "
        "streaming smoothness for throughput",
    )
    e.add_argument("--max-context-len", type=int, help="default: the model's")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument(
        "--num-threads", type=int,
        help="threads per rank on CPU, for torch ops and the C kernels (default: 1); each rank "
        "reserves that many CPUs",
    )  # fmt: skip
    e.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=256,
        help="decode batches up to this size replay CUDA graphs (CUDA, one-rank pools); 0: off",
    )
    x = p.add_argument_group("expert parallelism (pools of several ranks)")
    x.add_argument(
        "--num-redundant-experts", type=int, default=0, help="extra expert slots per pool"
    )
    x.add_argument("--moe-a2a-backend", default="auto", choices=("auto", "torch", "deepep"))
    x.add_argument(
        "--grouped-gemm-backend",
        default="auto",
        choices=("auto", "torch", "deep_gemm"),
        help="routed experts' GEMMs in EP pools: deep_gemm = FP8 on Hopper (auto: where it imports)",
    )
    x.add_argument(
        "--deepep-mode",
        default="auto",
        choices=("auto", "normal", "low_latency"),
        help="auto: normal for prefill pools, low_latency for decode pools",
    )
    x.add_argument(
        "--low-latency-capacity",
        type=int,
        default=128,
        help="low_latency mode: rows per expert slot and source rank in one exchange",
    )
    x.add_argument(
        "--eplb-interval-s",
        type=float,
        help="rebalance experts every this many seconds (default: only on `pdserve rebalance`)",
    )
    x.add_argument(
        "--eplb-min-balancedness",
        type=float,
        default=0.95,
        help="a periodic rebalance is skipped while balancedness is at least this",
    )
    x.add_argument(
        "--init-expert-placement",
        metavar="FILE",
        help="start from a saved placement (`pdserve rebalance --dump FILE`)",
    )
    x.add_argument(
        "--enable-two-batch-overlap",
        action="store_true",
        help="split each batch in two and overlap one's all-to-all with the other's compute",
    )
    r = p.add_argument_group("requests")
    r.add_argument("--default-max-new-tokens", type=int, default=128)
    r.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    r.add_argument(
        "--rank-restart-wait",
        type=float,
        default=120.0,
        metavar="S",
        help="a request whose engine rank fails, with no other rank to go on on, waits up to S "
        "seconds for a rank to come back (Ray restarts it) and resumes there from its output "
        "(0: it ends with an error at once; default 120)",
    )
    r.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C, seconds to let requests in flight finish while new ones are "
        "refused (0: stop at once; a second signal stops at once)",
    )
    r.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024)
    r.add_argument(
        "--incremental-streaming-output",
        action="store_true",
        help="/generate streams: each event carries only its new text and output_ids "
        "(default: everything so far, as SGLang sends them)",
    )
    r.add_argument(
        "--sse-keepalive",
        type=float,
        default=15.0,
        metavar="S",
        help="a stream silent for S seconds (a long queue or prompt, a wait for a restarting "
        "rank) gets an SSE comment line, which clients skip, so that proxies keep it open "
        "(0: never; default 15)",
    )
    r.add_argument(
        "--tool-call-parser",
        choices=("auto", *TOOL_CALL_FORMATS),
        default="auto",
        help="how the model writes tool calls (default auto: as its chat template does)",
    )
    r.add_argument(
        "--reasoning-parser",
        choices=("auto", "none", "deepseek_r1"),
        default="auto",
        help="split chat answers' <think> blocks off as reasoning_content: deepseek_r1 "
        "always, none never (default auto: when the chat template has thinking blocks)",
    )
    r.add_argument("--max-prompt-tokens", type=int, help="refuse longer prompts (default: none)")
    r.add_argument(
        "--max-concurrent-requests-per-client",
        type=int,
        help="requests in flight per client address (default: no cap)",
    )
    r.add_argument(
        "--max-queued-requests",
        type=int,
        help="load shedding: while this many requests wait for their first token, new ones "
        "get 503 with Retry-After: 1 instead of queueing (default: no cap)",
    )
    r.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY"),
        help="the inference routes (HTTP but /health and /metrics; gRPC Generate and Abort) "
        "require 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY; unset: open)",
    )
    r.add_argument(
        "--ssl-certfile", metavar="PEM",
        help="serve HTTPS and gRPC over TLS with this certificate chain (with --ssl-keyfile)",
    )  # fmt: skip
    r.add_argument("--ssl-keyfile", metavar="PEM", help="the private key of --ssl-certfile")
    r.add_argument(
        "--ssl-ca-certs", metavar="PEM",
        help="mutual TLS: every client (HTTP and gRPC, probes included) must present a "
        "certificate signed by one of these CAs",
    )  # fmt: skip
    r.add_argument(
        "--admin-token",
        default=os.environ.get("PDSERVE_ADMIN_TOKEN"),
        help="enables /admin/* with this bearer token (default: $PDSERVE_ADMIN_TOKEN; unset: off)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--access-log", action="store_true", help="log every HTTP request (uvicorn's access log)"
    )
    p.add_argument(
        "--log-requests", action="store_true",
        help="log a JSON line per ended generate request (id, route, client, token counts, "
        "finish, TTFT, latency; never the prompt or output)",
    )  # fmt: skip
    p.add_argument(
        "--otlp-traces-endpoint", metavar="URL",
        default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None,
        help="export a span per request (OpenTelemetry, OTLP over HTTP) to this URL, e.g. "
        "http://collector:4318/v1/traces; a request's traceparent header makes it a child of "
        "the caller's span (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; unset: off)",
    )  # fmt: skip
    p.add_argument(
        "--otel-service-name", default=os.environ.get("OTEL_SERVICE_NAME") or "pdserve",
        help="the spans' service.name (default: $OTEL_SERVICE_NAME, else pdserve)",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)


def serve_config(args: argparse.Namespace) -> Any:
    from orchestrator.config import ServeConfig
    from workers.engine.config import EngineConfig

    engine = EngineConfig(
        page_size=args.page_size,
        kv_capacity_tokens=args.kv_capacity_tokens,
        kv_memory_fraction=args.kv_memory_fraction,
        kv_swap_space=args.kv_swap_space,
        prefix_cache_host_space=args.prefix_cache_host_space,
        speculative_ngram=args.speculative_ngram,
        speculative_ngram_min=args.speculative_ngram_min,
        speculative_ngram_max=args.speculative_ngram_max,
        speculative_max_running=args.speculative_max_running,
        speculative_ngram_shared=args.speculative_ngram_shared,
        speculative_mtp=args.speculative_mtp,
        max_running_requests=args.max_running_requests,
        enable_prefix_caching=args.enable_prefix_caching,
        preload_structured_output=args.preload_structured_output,
        chunked_prefill_size=args.chunked_prefill_size,
        stream_interval=args.stream_interval,
        max_context_len=args.max_context_len,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.num_threads,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        num_redundant_experts=args.num_redundant_experts,
        moe_a2a_backend=args.moe_a2a_backend,
        grouped_gemm_backend=args.grouped_gemm_backend,
        deepep_mode=args.deepep_mode,
        low_latency_capacity=args.low_latency_capacity,
        enable_two_batch_overlap=args.enable_two_batch_overlap,
    )
    return ServeConfig(
        model=args.model,
        revision=args.revision,
        download_dir=args.download_dir,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        ray_address=args.address,
        colocated=args.colocated,
        num_ranks=args.dp,
        prefill_dp=args.prefill_dp,
        decode_dp=args.decode_dp,
        prefill_instances=args.prefill_instances,
        admin_token=args.admin_token,
        api_key=args.api_key,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ca_certs=args.ssl_ca_certs,
        eplb_interval_s=args.eplb_interval_s,
        eplb_min_balancedness=args.eplb_min_balancedness,
        init_expert_placement=args.init_expert_placement,
        decode_instances=args.decode_instances,
        placement_timeout_s=args.placement_timeout,
        scale_drain_timeout_s=args.scale_drain_timeout,
        max_prefill_instances=args.max_prefill_instances,
        max_decode_instances=args.max_decode_instances,
        max_instances=args.max_instances,
        autoscale_target=args.autoscale_target,
        autoscale_up_after_s=args.autoscale_up_after,
        autoscale_down_after_s=args.autoscale_down_after,
        transfer_backend=args.transfer_backend,
        transfer_timeout_s=args.transfer_timeout,
        engine=engine,
        max_request_body_bytes=args.max_request_body_bytes,
        incremental_streaming_output=args.incremental_streaming_output,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests_per_client=args.max_concurrent_requests_per_client,
        max_queued_requests=args.max_queued_requests,
        default_max_new_tokens=args.default_max_new_tokens,
        request_timeout_s=args.request_timeout,
        rank_restart_wait_s=args.rank_restart_wait,
        replace_dead_instances=args.replace_dead_instances,
        kv_migration=args.kv_migration,
        kv_pressure_interval_s=args.kv_pressure_interval,
        deployment=args.deployment,
        keep_pools=args.keep_pools,
        sse_keepalive_s=args.sse_keepalive,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
        access_log=args.access_log,
        log_requests=args.log_requests,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        otel_service_name=args.otel_service_name,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def log_to_stderr(level: str) -> None:
    """pdserve's own log lines (scaling, rank failures, rebalances: the `orchestrator` and
    `eplb` loggers) on standard error from `level` (`--log-level`) up, with their time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    value = logging.getLevelName(level.upper())
    for name in ("orchestrator", "eplb"):
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.setLevel(value if isinstance(value, int) else logging.INFO)
        log.propagate = False


def join_ray(config: Any, num_cpus: int | None) -> Any:
    """`ray.init`: a Ray of its own, or the cluster `--address` names. ConnectionError (or
    ValueError) naming the address when there is none to join, rather than Ray's retries."""
    import ray

    from orchestrator.pool_instance import starts_local_ray

    address = config.ray_address
    if address and address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 5):
                pass
        except ValueError:
            raise ValueError(
                f"--address {address}: expected HOST:PORT, 'auto' or ray://..."
            ) from None
        except OSError as e:
            raise ConnectionError(
                f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start "
                "one with `ray start --head` (or `ray up`), or leave --address out"
            ) from None
    # A Ray of this process's own dies with it: when a signal to the whole process group
    # (systemd, `timeout`, Ctrl-C in some shells) ends its GCS too, waiting a minute for the
    # GCS to come back (Ray's default) only delays the exit.
    system = {"gcs_rpc_server_reconnect_timeout_s": 5} if starts_local_ray(config) else None
    # A deployment's detached placement groups are found by name within a namespace.
    from orchestrator.deployment import NAMESPACE

    namespace = NAMESPACE if config.deployment is not None else None
    try:
        return ray.init(
            address=address, num_cpus=num_cpus, logging_level=logging.WARNING,
            _system_config=system, namespace=namespace,
        )  # fmt: skip
    except ConnectionError as e:
        raise ConnectionError(
            f"--address {address}: {e} (start one with `ray start --head` or `ray up`, or "
            "leave --address out to start a Ray of this process's own)"
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import ray

    from orchestrator.launcher import launch, local_ray_cpus, resolve_model_dir
    from orchestrator.pool_instance import RankStartError, starts_local_ray
    from orchestrator.preflight import preflight

    try:
        config = serve_config(args)
    except ValueError as e:
        say(f"error: {e}")
        return 2
    log_to_stderr(config.log_level)
    say(f"topology: {config.topology}")
    for role, most in config.autoscale_bounds().items():
        start = {"prefill": config.prefill_instances, "decode": config.decode_instances}
        if most == start.get(role, 1):
            say(f"warning: {role} starts with its maximum of {most} instance(s): the "
                "autoscaler has nothing to add")  # fmt: skip
        else:
            say(f"autoscaling {role} instances between {start.get(role, 1)} and {most}")
    if config.checkpoint is not None and config.checkpoint.is_hub_repo:
        say(f"model: {config.model} from the Hugging Face Hub (or its cache)")
    local = starts_local_ray(config)
    try:
        model_dir = resolve_model_dir(config)
        warnings = preflight(config, model_dir, local)
    except (ValueError, OSError) as e:
        say(f"error: {e}")
        return 2
    say(f"model: {model_dir}")
    for line in warnings:
        say(f"warning: {line}")
    mutual_tls = config.tls is not None and config.tls.client_cas is not None
    if config.api_key is None and not mutual_tls and not _is_loopback(config.host):
        say(f"warning: listening on {config.host} without --api-key: anyone who reaches the "
               "port can generate (set --api-key or PDSERVE_API_KEY, or --ssl-ca-certs)")  # fmt: skip
    elif config.api_key is not None and config.tls is None and not _is_loopback(config.host):
        say(f"warning: listening on {config.host} without TLS: the API key crosses the network "
               "in clear unless a TLS proxy sits in front (--ssl-certfile / --ssl-keyfile)")  # fmt: skip
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        say("warning: RAY_AUTH_MODE=disabled: anyone who reaches the Ray ports controls the "
               "cluster; keep Ray's token authentication on outside a test box")  # fmt: skip
    num_cpus = None
    if local:
        cores = os.cpu_count() or 1
        num_cpus = local_ray_cpus(config, cores)
        if num_cpus is not None:
            say(f"warning: the ranks take {num_cpus} CPUs and this machine has {cores} cores: "
                   f"the local Ray declares {num_cpus}, so ranks share cores (fine for trying the "
                   "topology out; measure with a core per rank)")  # fmt: skip

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while starting, SIGTERM interrupts like Ctrl-C
    try:
        ctx = join_ray(config, num_cpus)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (ValueError, ConnectionError) as e:
        say(f"error: {e}")
        return 2
    dashboard = getattr(ctx, "dashboard_url", None)
    where = f"joined Ray cluster at {config.ray_address}" if config.ray_address else "local Ray"
    say(f"{where}" + (f", dashboard http://{dashboard}" if dashboard else ""))
    stop = threading.Event()
    server = None
    try:
        if config.engine.device == "cuda" and not ray.cluster_resources().get("GPU"):
            say("error: --device cuda: the Ray cluster has no GPUs")
            return 2
        say(f"loading {config.model_name(model_dir)} ...")
        server = launch(
            config,
            model_dir=model_dir,
            progress=lambda s: say(f"  still loading ({s:.0f} s)"),
        )
        gc_pauses.freeze_startup_objects("router")  # this process serves from now on
        gc_pauses.PROCESS.install()
        stop_now = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            (stop_now if stop.is_set() else stop).set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        say(f"serving {server.router.model_name} on {server.url}")
        if server.grpc_address:
            say(f"gRPC (pdserve.v1) on {server.grpc_address}")
        while not stop.is_set() and server.http.is_alive():
            stop.wait(0.5)
        in_flight = server.router.num_in_flight
        scaling = server.pools is not None and server.pools.scaling
        if (in_flight or scaling) and config.drain_timeout_s > 0 and server.http.is_alive():
            also = " and winding up the scale that runs" if scaling else ""
            say(f"draining {in_flight} request(s) in flight{also} (up to "
                f"{config.drain_timeout_s:g} s; interrupt again to stop now)")  # fmt: skip
            left = server.drain(config.drain_timeout_s, stop_now)
            if left:
                say(f"{left} request(s) still in flight: ending them")
        say("shutting down")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except RankStartError as e:
        say(f"error: {e}")
        say("(the rank's whole log: /tmp/ray/session_latest/logs/worker-*.err on its node)")
        return 1
    except Exception as e:
        say(f"error: {type(e).__name__}: {e}")
        return 1
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()
