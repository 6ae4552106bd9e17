"""`pdserve scale`: start or drain pool instances of a running server (admin), or list them."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import httpx

from orchestrator.cli.common import (
    add_admin_args,
    admin_problem,
    cannot_reach,
    grpc_channel,
    grpc_error,
    ok_json,
    print_table,
    quiet_grpc,
    response_error,
    seconds_or_zero,
    tls_context,
)

ROLES = ("prefill", "decode", "colocated")


def add_scale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scale",
        help="start or drain pool instances of a running server (admin); without counts or "
        "--remove, list them",
    )
    for role in ROLES:
        p.add_argument(f"--{role}", type=int, metavar="N", help=f"{role} pool instances wanted")
    p.add_argument(
        "--remove", action="append", metavar="NAME", default=[],
        help="drain and remove this instance (repeatable), e.g. decode-0; with the same count "
        "(or as its role's last instance) a new one replaces it, started first",
    )  # fmt: skip
    p.add_argument(
        "--drain-timeout", type=seconds_or_zero, metavar="S",
        help="how long a removed instance's requests may run on (default: the server's "
        "--scale-drain-timeout, 60 s); those still running then move to another instance "
        "with their KV (those decoding), else resuming from their output (0: at once)",
    )  # fmt: skip
    add_admin_args(p, timeout_s=3600.0)
    p.set_defaults(func=cmd_scale)


def cmd_scale(args: argparse.Namespace) -> int:
    problem = admin_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    body: dict[str, Any] = {role: n for role in ROLES if (n := getattr(args, role)) is not None}
    if any(n < 1 for n in body.values()):
        print("error: every pool keeps at least one instance (counts must be >= 1)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.remove:
        body["remove"] = args.remove
    if args.drain_timeout is not None:
        body["drain_timeout_s"] = args.drain_timeout
    if args.grpc:
        return _scale_grpc(args, body)
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.token}"}
    verify = tls_context(args)
    if not body:
        try:
            resp = httpx.get(f"{url}/admin/pools", headers=headers, timeout=30, verify=verify)
        except httpx.HTTPError as e:
            print(f"error: {cannot_reach(url, e)}", file=sys.stderr)
            return 1
        answer = _answer(resp)
        if answer is None:
            print(f"error: {response_error(url, resp)}", file=sys.stderr)
            return 1
        _print_pools(answer["pools"])
        _print_autoscale(answer.get("autoscale") or {})
        return 0
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(url, headers, verify, done), name="scale-progress", daemon=True
    )
    watcher.start()
    try:
        resp = httpx.post(
            f"{url}/admin/scale", json=body, headers=headers, timeout=args.timeout, verify=verify
        )
    except httpx.HTTPError as e:
        print(f"error: {cannot_reach(url, e)}", file=sys.stderr)
        return 1
    finally:
        done.set()
    answer = _answer(resp)
    if answer is None:
        print(f"error: {response_error(url, resp)}", file=sys.stderr)
        return 1
    return _print_report(answer)


def _print_report(answer: dict[str, Any]) -> int:
    started = ", ".join(answer.get("started") or []) or "none"
    removed = ", ".join(answer.get("removed") or []) or "none"
    print(f"scaled in {answer.get('seconds', 0.0):.1f} s: started {started}; removed {removed}")
    if answer.get("requests_migrated"):
        print(f"{answer['requests_migrated']} request(s) moved to another instance with their "
              "KV (nothing computed again)")  # fmt: skip
    if answer.get("requests_resumed"):
        print(f"{answer['requests_resumed']} request(s) on removed instances at the drain "
              "timeout resumed on another instance from the output they had")  # fmt: skip
    if answer.get("requests_retried"):
        print(f"{answer['requests_retried']} request(s) without output yet on removed "
              "instances at the drain timeout were run again on another instance")  # fmt: skip
    for failure in answer.get("failed") or []:
        print(f"{failure.get('pool')}: FAILED: {failure.get('error')}")
    _print_pools(answer["pools"])
    return 0 if answer.get("ok") else 1


def _answer(resp: httpx.Response) -> dict[str, Any] | None:
    """The body of a pdserve `/admin/pools` or `/admin/scale` answer; None for any other."""
    body = ok_json(resp)
    pools = body.get("pools") if isinstance(body, dict) else None
    if not isinstance(pools, list) or not all(isinstance(p, dict) and "name" in p for p in pools):
        return None
    return body


def _print_pools(pools: list[dict[str, Any]]) -> None:
    rows: list[tuple[str, ...]] = [("pool", "state", "rank ids", "requests")]
    for p in pools:
        ranks = ",".join(str(r) for r in p.get("ranks", []))
        rows.append((p["name"], str(p.get("state", "")), ranks, str(p.get("num_requests", ""))))
    print_table(rows)


def _print_autoscale(roles: dict[str, Any]) -> None:
    """A line per autoscaled role: its bounds and latest utilization."""
    for role, a in sorted(roles.items()):
        u = a.get("utilization")
        load = f"utilization {u:.2f}" if isinstance(u, int | float) else "no live rank"
        print(f"{role}: autoscaled between {a['min']} and {a['max']} instances; {load}")


def _watch(url: str, headers: dict[str, str], verify: Any, done: threading.Event) -> None:
    """While the scale runs: a line each time an instance changes state (every ~5 s)."""
    seen: dict[str, str] = {}
    began = time.monotonic()
    while not done.wait(5.0):
        try:
            resp = httpx.get(f"{url}/admin/pools", headers=headers, timeout=10, verify=verify)
        except httpx.HTTPError:
            continue
        answer = _answer(resp)
        if answer is None:
            continue
        for p in answer["pools"]:
            state = str(p.get("state"))
            changed = seen.get(p["name"], "serving") != state
            if changed and not done.is_set():
                extra = f", {p['num_requests']} request(s)" if p.get("num_requests") else ""
                print(f"[{time.monotonic() - began:.0f} s] {p['name']}: {state}{extra}",
                      flush=True)  # fmt: skip
            seen[p["name"]] = state


def _scale_grpc(args: argparse.Namespace, body: dict[str, Any]) -> int:
    quiet_grpc()
    import grpc
    from google.protobuf.json_format import MessageToDict

    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    metadata = [("authorization", f"Bearer {args.token}")]
    try:
        with grpc_channel(args, args.grpc) as channel:
            stub = pb_grpc.GenerationStub(channel)
            if not body:
                reply: Any = stub.Pools(pb.PoolsRequest(), metadata=metadata, timeout=30)
            else:
                request = pb.ScaleRequest(
                    instances={k: v for k, v in body.items() if k in ROLES},
                    remove=body.get("remove", []),
                )
                if "drain_timeout_s" in body:
                    request.drain_timeout_s = body["drain_timeout_s"]
                reply = stub.Scale(request, metadata=metadata, timeout=args.timeout)
    except grpc.RpcError as e:
        print(grpc_error(args, e), file=sys.stderr)
        return 1
    answer = MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if not body:
        _print_pools(answer["pools"])
        roles = {a["role"]: {"min": a["min_instances"], "max": a["max_instances"],
                             "utilization": a.get("utilization")} for a in answer["autoscale"]}  # fmt: skip
        _print_autoscale(roles)
        return 0
    return _print_report(answer)
