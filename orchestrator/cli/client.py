"""The commands that talk to a running server: `pdserve generate`, `bench` and `status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from orchestrator.cli.common import (
    add_connection_args,
    auth_headers,
    cannot_reach,
    count,
    finite,
    grpc_address_problem,
    grpc_channel,
    grpc_error,
    ok_json,
    print_table,
    quiet_grpc,
    response_error,
    tls_context,
    url_problem,
)

# ---- generate -----------------------------------------------------------------------------------


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream one completion from a running server")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=count, default=64)
    p.add_argument("--temperature", type=finite, default=0.0)
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    p.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC API instead of HTTP")
    add_connection_args(p)
    p.set_defaults(func=cmd_generate)


def _sse_events(resp: httpx.Response) -> Any:
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def cmd_generate_grpc(args: argparse.Namespace) -> int:
    quiet_grpc()
    import grpc

    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    if args.chat:
        print("error: --chat is an HTTP (OpenAI API) feature; drop --grpc", file=sys.stderr)
        return 2
    problem = grpc_address_problem(args.grpc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    request = pb.GenerateRequest(
        text=args.prompt,
        sampling=pb.SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature
        ),
    )
    start = time.perf_counter()
    final, shown = None, False
    try:
        with grpc_channel(args, args.grpc) as channel:
            stub = pb_grpc.GenerationStub(channel)
            metadata = [(k.lower(), v) for k, v in auth_headers(args).items()]
            for resp in stub.Generate(request, timeout=600, metadata=metadata):
                if resp.HasField("chunk"):
                    print(resp.chunk.text, end="", flush=True)
                    shown = True
                else:
                    final = resp.final
    except grpc.RpcError as e:
        print("\n" * shown + grpc_error(args, e), file=sys.stderr)
        return 1
    if final is None:
        print("\n" * shown + f"error: {args.grpc} ended the stream without its final message",
              file=sys.stderr)  # fmt: skip
        return 1
    elapsed = time.perf_counter() - start
    print()
    print(f"[{final.usage.completion_tokens} tokens, finish: {final.finish_reason}, "
          f"{elapsed:.2f} s]", file=sys.stderr)  # fmt: skip
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.grpc:
        return cmd_generate_grpc(args)
    problem = url_problem(args.url)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
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
    shown, finish, tokens, streaming = "", None, 0, False
    try:
        with httpx.stream(
            "POST",
            url + route,
            json=payload,
            headers=auth_headers(args),
            timeout=600,
            verify=tls_context(args),
        ) as resp:
            content_type = resp.headers.get("content-type", "")
            if resp.status_code != 200 or not content_type.startswith("text/event-stream"):
                print(f"error: {response_error(url, resp)}", file=sys.stderr)
                return 1
            streaming = True
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
        if streaming:
            print(f"\nerror: {url} broke off the stream: {e}", file=sys.stderr)
        else:
            print(f"error: {cannot_reach(url, e)}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"\nerror: {url} sent an event that is not pdserve's ({type(e).__name__}: {e})",
              file=sys.stderr)  # fmt: skip
        return 1
    elapsed = time.perf_counter() - start
    print()
    print(f"[{tokens} tokens, finish: {finish}, {elapsed:.2f} s]", file=sys.stderr)
    return 0


# ---- bench --------------------------------------------------------------------------------------


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test a running server (random-token prompts)")
    p.add_argument(
        "--url", action="append",
        help="the server (default http://127.0.0.1:30000); given again, more routers of the "
        "same deployment (pdserve serve --front), which the requests go to in turn",
    )  # fmt: skip
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
        "--temperature", type=finite, default=0.0,
        help="sample every request at this temperature (default 0: greedy); seeded per "
        "request from --seed",
    )  # fmt: skip
    p.add_argument("--top-p", type=finite, default=1.0, help="with --temperature: nucleus")
    p.add_argument(
        "--api", choices=["generate", "completions", "chat"], default="generate",
        help="the route: /generate (default), /v1/completions (the same token ids), "
        "/v1/chat/completions (each prompt's text as a user message)",
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
    add_connection_args(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import aiohttp

    from orchestrator.bench import BenchConfig, run_bench

    given = args.url or ["http://127.0.0.1:30000"]
    for u in given:
        problem = url_problem(u)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    urls = [u.rstrip("/") for u in given]
    url = urls[0]
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
            url=url,
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            concurrency=args.concurrency,
            seed=args.seed,
            stream=args.stream,
            shared_prefix_len=args.shared_prefix_len,
            constraint=constraint,
            temperature=args.temperature,
            top_p=args.top_p,
            api=args.api,
            api_key=args.api_key,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            more_urls=tuple(urls[1:]),
        )
        result = asyncio.run(run_bench(cfg))
    except (aiohttp.ClientConnectionError, TimeoutError) as e:  # OSErrors: caught first
        print(f"error: {cannot_reach(url, e)}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as e:
        print(f"error: {url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.to_json() if args.json else result.table())
    return 0 if result.num_failed == 0 else 1


# ---- status -------------------------------------------------------------------------------------


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="print the ranks' state of a running server")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    add_connection_args(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    problem = url_problem(args.url)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    try:
        resp = httpx.get(
            url + "/v1/stats", headers=auth_headers(args), timeout=10, verify=tls_context(args)
        )
    except httpx.HTTPError as e:
        print(f"error: {cannot_reach(url, e)}", file=sys.stderr)
        return 1
    data = _stats(resp)
    if data is None:
        print(f"error: {response_error(url, resp)}", file=sys.stderr)
        return 1
    state = ", draining (shutting down)" if data.get("draining") else ""
    print(f"model {data['model']}, {data['num_in_flight']} request(s) in flight "
          f"({data.get('num_waiting_first_token', 0)} before their first token, "
          f"{data.get('num_waiting_for_rank', 0)} waiting for a rank to come back){state}; "
          f"{data.get('num_retries', 0)} retried, {data.get('num_resumed', 0)} resumed, "
          f"{data.get('num_migrated', 0)} migrated with their KV "
          f"({data.get('num_kv_pressure_moves', 0)} asked off a rank short of KV), "
          f"{data.get('num_shed', 0)} shed "
          f"(--max-queued-requests), {data.get('num_rank_failures', 0)} rank failure(s) "
          "since start")  # fmt: skip
    if data.get("deployment"):
        print(f"deployment {data['deployment']} (its pools outlive this router)")
    if data.get("front"):
        front = data["front"]
        print(f"front router {front['tag']} of deployment {front['deployment']} (its primary "
              "router scales the pools)")  # fmt: skip
    starting = [p["name"] for p in data.get("pools") or [] if p.get("state") == "starting"]
    if starting:
        print(f"starting (pdserve scale): {', '.join(starting)}")
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
        "tokens out",
        "preempted (swapped)",
        "prefix hit (host)",
        "guesses kept",
        "KV sent / received (failed)",
    )
    rows: list[tuple[str, ...]] = [header]
    for rank in data["ranks"]:
        info, st = rank["info"] or {}, rank["stats"]
        pool = f"{info.get('role', '?')}-{info.get('instance', 0)}" if info else "?"
        pool += " (draining)" if rank.get("draining") else ""
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
            f"{st.get('num_preemptions', 0)} ({st.get('num_swapped_out', 0)})",
            _prefix_hits(st), _guesses(st), _transfers(st.get("transfers") or {}),
        ))  # fmt: skip
    print_table(rows)
    return 0


def _stats(resp: httpx.Response) -> dict[str, Any] | None:
    """The body of a pdserve `/v1/stats` answer; None for any other answer."""
    data = ok_json(resp)
    if not isinstance(data, dict) or not {"model", "num_in_flight", "ranks"} <= data.keys():
        return None
    return data


def _prefix_hits(st: dict[str, Any]) -> str:
    """The share of the prompt tokens looked up that the prefix cache held, and in brackets
    the part of that share the host tier held (both of the tokens looked up: `74% (74%)` is
    every hit from the host tier); `-` before any lookup."""
    queried, hits = st.get("num_prefix_queried_tokens", 0), st.get("num_prefix_hit_tokens", 0)
    if not queried:
        return "-"
    host = st.get("num_prefix_host_hit_tokens", 0)
    return f"{hits / queried:.0%} ({host / queried:.0%})"


def _guesses(st: dict[str, Any]) -> str:
    """Speculative decoding: guessed tokens kept of those guessed; `-` when none."""
    guessed = st.get("num_spec_draft_tokens", 0)
    if not guessed:
        return "-"
    kept = st.get("num_spec_accepted_tokens", 0)
    return f"{kept}/{guessed} ({kept / guessed:.0%})"


def _transfers(t: dict[str, Any]) -> str:
    """A rank's KV transfers for the status table: `-` when it has made none."""
    sent, received = t.get("sent", 0), t.get("received", 0)
    failed = t.get("send_failed", 0) + t.get("receive_failed", 0)
    if not (sent or received or failed):
        return "-"
    moved = (t.get("sent_bytes", 0) + t.get("received_bytes", 0)) / 1e6
    ahead = t.get("sent_ahead", 0)
    layered = f", {ahead} ahead" if ahead else ""
    return f"{sent} / {received} ({failed}), {moved:.1f} MB{layered}"
