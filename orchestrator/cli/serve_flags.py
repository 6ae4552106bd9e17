"""`pdserve serve`'s flags, by group: the model and where to listen, topology, engine, expert
parallelism, requests. `orchestrator/serve.schema.json` lists the same keys for `--config`
files (tests/test_deploy.py checks that they agree)."""

from __future__ import annotations

import argparse
import os

from orchestrator.tool_parser import FORMATS as TOOL_CALL_FORMATS


def add_serve_flags(p: argparse.ArgumentParser) -> None:
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
        "--front", metavar="NAME",
        help="with --address: serve deployment NAME as one more router beside the one that "
        "started it (--deployment NAME), sharing the per-token work of HTTP, tokenizing and "
        "streaming; it follows that router's scaling and takes no pool flags. Admin commands "
        "that change the pools go to that router",
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
    t.add_argument(
        "--disable-kv-write-ahead", dest="kv_write_ahead", action="store_false",
        help="a prefill rank sends a prompt's KV once its prefill is done; by default it writes "
        "each layer's KV to the decode rank as soon as that layer is computed (when the decode "
        "rank's pages are known by then), so that little is left to send at the end",
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
        help="low_latency mode: rows per expert slot and source rank in one exchange (with "
        "DeepEP also the most tokens a decode rank computes in one step)",
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
        "--eplb-max-staging-gib",
        type=float,
        default=2.0,
        metavar="GIB",
        help="the most expert weights a rank stages in GPU memory for one round of a "
        "rebalance; one that moves more goes in rounds of whole layers, each its own pause",
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
