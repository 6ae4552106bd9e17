"""`pdserve`: serve, generate, bench, status. Each subcommand is one `add_*` + one `cmd_*`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from orchestrator.tool_parser import FORMATS as TOOL_CALL_FORMATS

Command = Callable[[argparse.Namespace], int]


def _print(*parts: Any) -> None:
    print("pdserve:", *parts, flush=True)


# ---- serve --------------------------------------------------------------------------------------


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start (or join) a Ray cluster and serve a model over HTTP")
    p.add_argument("--model", help="Hugging Face checkpoint dir (default: the built-in tiny model)")
    p.add_argument("--served-model-name", help="name in /v1/models (default: the dir's name)")
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
    e.add_argument("--max-running-requests", type=int, default=256)
    e.add_argument(
        "--disable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt whole (by default requests share the KV of common prefixes)",
    )
    e.add_argument("--chunked-prefill-size", type=int, default=2048)
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
    e.add_argument("--num-threads", type=int, help="torch threads per rank on CPU")
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
        "--admin-token",
        default=os.environ.get("PDSERVE_ADMIN_TOKEN"),
        help="enables /admin/* with this bearer token (default: $PDSERVE_ADMIN_TOKEN; unset: off)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--access-log", action="store_true", help="log every HTTP request (uvicorn's access log)"
    )
    p.set_defaults(func=cmd_serve)


def serve_config(args: argparse.Namespace) -> Any:
    from orchestrator.config import ServeConfig
    from workers.engine.config import EngineConfig

    engine = EngineConfig(
        page_size=args.page_size,
        kv_capacity_tokens=args.kv_capacity_tokens,
        kv_memory_fraction=args.kv_memory_fraction,
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
        eplb_interval_s=args.eplb_interval_s,
        eplb_min_balancedness=args.eplb_min_balancedness,
        init_expert_placement=args.init_expert_placement,
        decode_instances=args.decode_instances,
        transfer_backend=args.transfer_backend,
        transfer_timeout_s=args.transfer_timeout,
        engine=engine,
        max_request_body_bytes=args.max_request_body_bytes,
        incremental_streaming_output=args.incremental_streaming_output,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests_per_client=args.max_concurrent_requests_per_client,
        default_max_new_tokens=args.default_max_new_tokens,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
        access_log=args.access_log,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import ray

    from orchestrator.launcher import launch, local_ray_cpus, resolve_model_dir, starts_local_ray

    try:
        config = serve_config(args)
    except ValueError as e:
        _print(f"error: {e}")
        return 2
    _print(f"topology: {config.topology}")
    model_dir = resolve_model_dir(config)
    _print(f"model: {model_dir}")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        _print("warning: RAY_AUTH_MODE=disabled: anyone who reaches the Ray ports controls the "
               "cluster; keep Ray's token authentication on outside a test box")  # fmt: skip
    num_cpus = None
    if starts_local_ray(config):
        cores = os.cpu_count() or 1
        num_cpus = local_ray_cpus(config, cores)
        if num_cpus is not None:
            _print(f"warning: the ranks take {num_cpus} CPUs and this machine has {cores} cores: "
                   f"the local Ray declares {num_cpus}, so ranks share cores (fine for trying the "
                   "topology out; measure with a core per rank)")  # fmt: skip
    ctx = ray.init(address=config.ray_address, num_cpus=num_cpus, logging_level=logging.WARNING)
    dashboard = getattr(ctx, "dashboard_url", None)
    where = f"joined Ray cluster at {config.ray_address}" if config.ray_address else "local Ray"
    _print(f"{where}" + (f", dashboard http://{dashboard}" if dashboard else ""))

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while loading, SIGTERM interrupts like Ctrl-C
    stop = threading.Event()
    server = None
    try:
        _print(f"loading {model_dir.name} ...")
        server = launch(
            config,
            model_dir=model_dir,
            progress=lambda s: _print(f"  still loading ({s:.0f} s)"),
        )
        stop_now = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            (stop_now if stop.is_set() else stop).set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        _print(f"serving {server.router.model_name} on {server.url}")
        if server.grpc_address:
            _print(f"gRPC (pdserve.v1) on {server.grpc_address}")
        while not stop.is_set() and server.http.is_alive():
            stop.wait(0.5)
        in_flight = server.router.num_in_flight
        if in_flight and config.drain_timeout_s > 0 and server.http.is_alive():
            _print(f"draining {in_flight} request(s) in flight (up to "
                   f"{config.drain_timeout_s:g} s; interrupt again to stop now)")  # fmt: skip
            left = server.drain(config.drain_timeout_s, stop_now)
            if left:
                _print(f"{left} request(s) still in flight: ending them")
        _print("shutting down")
        return 0
    except KeyboardInterrupt:
        _print("interrupted")
        return 130
    except Exception as e:
        _print(f"error: {type(e).__name__}: {e}")
        return 1
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()


# ---- generate -----------------------------------------------------------------------------------


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream one completion from a running server")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    p.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC API instead of HTTP")
    p.set_defaults(func=cmd_generate)


def _sse_events(resp: httpx.Response) -> Any:
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def cmd_generate_grpc(args: argparse.Namespace) -> int:
    import grpc

    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    if args.chat:
        print("error: --chat is an HTTP (OpenAI API) feature; drop --grpc", file=sys.stderr)
        return 2
    request = pb.GenerateRequest(
        text=args.prompt,
        sampling=pb.SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature
        ),
    )
    start = time.perf_counter()
    try:
        with grpc.insecure_channel(args.grpc) as channel:
            stub = pb_grpc.GenerationStub(channel)
            for resp in stub.Generate(request, timeout=600):
                if resp.HasField("chunk"):
                    print(resp.chunk.text, end="", flush=True)
                else:
                    final = resp.final
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print()
    print(f"[{final.usage.completion_tokens} tokens, finish: {final.finish_reason}, "
          f"{elapsed:.2f} s]", file=sys.stderr)  # fmt: skip
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.grpc:
        return cmd_generate_grpc(args)
    url = args.url.rstrip("/")
    if args.chat:
        route = "/v1/chat/completions"
        payload: dict[str, Any] = {
            "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    else:
        route = "/generate"
        payload = {
            "text": args.prompt,
            "sampling_params": {
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            },
            "stream": True,
        }  # fmt: skip
    start = time.perf_counter()
    shown, finish, tokens = "", None, 0
    try:
        with httpx.stream("POST", url + route, json=payload, timeout=600) as resp:
            if resp.status_code != 200:
                resp.read()
                print(f"HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
                return 1
            for event in _sse_events(resp):
                if "error" in event:
                    print(f"\nerror: {event['error'].get('message')}", file=sys.stderr)
                    return 1
                if args.chat:
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        print(piece, end="", flush=True)
                        finish = choice.get("finish_reason") or finish
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                else:
                    text = event["text"]
                    print(text[len(shown) :], end="", flush=True)
                    shown = text
                    meta = event["meta_info"]
                    tokens = meta["completion_tokens"]
                    finish = (meta.get("finish_reason") or {}).get("type") or finish
    except httpx.HTTPError as e:
        print(f"error: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print()
    print(f"[{tokens} tokens, finish: {finish}, {elapsed:.2f} s]", file=sys.stderr)
    return 0


# ---- bench --------------------------------------------------------------------------------------


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test a running server (random-token prompts)")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shared-prefix-len", type=int, default=0,
        help="every prompt begins with the same this many random tokens (a system prompt)",
    )  # fmt: skip
    p.add_argument(
        "--no-stream", dest="stream", action="store_false",
        help="plain JSON calls, as an offline batch client sends them (no TTFT / TPOT)",
    )  # fmt: skip
    held = p.add_mutually_exclusive_group()
    held.add_argument("--regex", help="hold every output to this regular expression")
    held.add_argument(
        "--json-schema", help="hold every output to this JSON schema (JSON text, or @FILE)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from orchestrator.bench import BenchConfig, run_bench

    constraint = None
    if args.regex:
        constraint = ("regex", args.regex)
    elif args.json_schema:
        schema = args.json_schema
        if schema.startswith("@"):
            try:
                schema = Path(schema[1:]).read_text()
            except OSError as e:
                print(f"error: --json-schema: {e}", file=sys.stderr)
                return 1
        constraint = ("json_schema", schema)
    try:
        cfg = BenchConfig(
            url=args.url.rstrip("/"),
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            concurrency=args.concurrency,
            seed=args.seed,
            stream=args.stream,
            shared_prefix_len=args.shared_prefix_len,
            constraint=constraint,
        )
        result = asyncio.run(run_bench(cfg))
    except (ValueError, RuntimeError, httpx.HTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.to_json() if args.json else result.table())
    return 0 if result.num_failed == 0 else 1


# ---- status -------------------------------------------------------------------------------------


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="print the ranks' state of a running server")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        resp = httpx.get(args.url.rstrip("/") + "/v1/stats", timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = resp.json()
    state = ", draining (shutting down)" if data.get("draining") else ""
    print(f"model {data['model']}, {data['num_in_flight']} request(s) in flight{state}; "
          f"{data.get('num_retries', 0)} retried, {data.get('num_rank_failures', 0)} rank "
          "failure(s) since start")  # fmt: skip
    header = (
        "pool",
        "dp",
        "rank",
        "node",
        "node id",
        "running",
        "waiting",
        "in transfer",
        "KV pages used",
        "tokens",
    )
    rows: list[tuple[str, ...]] = [header]
    for rank in data["ranks"]:
        info, st = rank["info"] or {}, rank["stats"]
        pool = f"{info.get('role', '?')}-{info.get('instance', 0)}" if info else "?"
        dp = f"{info.get('pool_rank', 0)}/{info.get('pool_size', 1)}" if info else "?"
        where = (pool, dp, str(rank["rank"]), info.get("node", ""), info.get("node_id", "")[:12])
        if rank["error"] or not st:
            rows.append((*where, rank["error"] or "not ready"))
            continue
        used = f"{st['num_pages_used']}/{st['num_pages_total']}"
        rows.append((
            *where, str(st["num_running"]),
            str(st["num_waiting"]), str(st.get("num_in_transfer", 0)), used,
            str(st["num_generated_tokens"]),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return 0


# ---- rebalance ----------------------------------------------------------------------------------


def add_rebalance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rebalance", help="rebalance the experts of the expert-parallel pools now (admin)"
    )
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--token", default=os.environ.get("PDSERVE_ADMIN_TOKEN"), help="admin token")
    p.add_argument("--pool", action="append", help="only this pool (repeatable), e.g. decode-0")
    p.add_argument(
        "--dump", metavar="FILE", help="save the current placement to FILE instead of rebalancing"
    )
    p.add_argument("--apply", metavar="FILE", help="move to the placement saved in FILE")
    p.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC API instead of HTTP")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds")
    p.set_defaults(func=cmd_rebalance)


def cmd_rebalance(args: argparse.Namespace) -> int:
    from orchestrator.launcher import PLACEMENT_FORMAT, read_expert_placements

    if not args.token:
        print("error: --token (or PDSERVE_ADMIN_TOKEN) is required", file=sys.stderr)
        return 2
    if args.grpc:
        if args.dump or args.apply:
            print("error: --dump and --apply use HTTP; drop --grpc", file=sys.stderr)
            return 2
        return _rebalance_grpc(args)
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.token}"}
    try:
        if args.dump:
            resp = httpx.get(f"{url}/admin/experts", headers=headers, timeout=args.timeout)
            if resp.status_code != 200:
                return _admin_error(resp)
            pools = {name: p["phy2log"] for name, p in resp.json()["pools"].items()}
            with open(args.dump, "w") as f:
                json.dump({"format": PLACEMENT_FORMAT, "pools": pools}, f)
            print(f"saved the placement of {len(pools)} pool(s) to {args.dump}")
            return 0
        body: dict[str, Any] = {}
        if args.pool:
            body["pools"] = args.pool
        if args.apply:
            body["placements"] = read_expert_placements(args.apply)
        resp = httpx.post(
            f"{url}/admin/rebalance", json=body, headers=headers, timeout=args.timeout
        )
    except (httpx.HTTPError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        return _admin_error(resp)
    return _print_reports(resp.json()["pools"])


def _rebalance_grpc(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(args.grpc) as channel:
            reply = pb_grpc.GenerationStub(channel).Rebalance(
                pb.RebalanceRequest(pools=args.pool or []),
                metadata=[("authorization", f"Bearer {args.token}")],
                timeout=args.timeout,
            )
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    reports = [
        MessageToDict(
            r, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for r in reply.pools
    ]
    return _print_reports(reports)


def _print_reports(reports: list[dict[str, Any]]) -> int:
    failed = 0
    for r in reports:
        if r["skipped"]:
            print(f"{r['pool']}: skipped ({r['skipped']})")
        elif not r["ok"]:
            failed += 1
            print(f"{r['pool']}: FAILED, rolled back: {r['error']}")
        else:
            print(
                f"{r['pool']}: balancedness {r['balancedness_before']:.3f} -> "
                f"{r['balancedness_after']:.3f}, {r['num_experts_moved']} experts "
                f"({float(r['num_bytes_moved']) / 1e6:.1f} MB) moved; load {r['load_s'] * 1000:.0f} ms, "
                f"prepare {r['prepare_s'] * 1000:.0f} ms, pause {r['execute_s'] * 1000:.1f} ms"
            )
    return 1 if failed else 0


def _admin_error(resp: httpx.Response) -> int:
    try:
        message = resp.json()["error"]["message"]
    except Exception:
        message = resp.text
    print(f"error: HTTP {resp.status_code}: {message}", file=sys.stderr)
    return 1


# ---- entry point --------------------------------------------------------------------------------

SUBCOMMANDS = (add_serve, add_generate, add_bench, add_status, add_rebalance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "serve" and args.config:
        from orchestrator.serve_file import merge_serve_args

        try:
            args = merge_serve_args(args, parser, argv)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    func: Command = args.func
    try:
        return func(args)
    except BrokenPipeError:
        # The reader went away (`pdserve status | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
