"""`pdserve rebalance`: an expert rebalance on a running server (HTTP or gRPC admin call), or a
dump of its expert placement."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from orchestrator.cli.common import (
    add_admin_args,
    admin_problem,
    cannot_reach,
    grpc_channel,
    grpc_error,
    ok_json,
    quiet_grpc,
    response_error,
    tls_context,
)


def add_rebalance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rebalance", help="rebalance the experts of the expert-parallel pools now (admin)"
    )
    p.add_argument("--pool", action="append", help="only this pool (repeatable), e.g. decode-0")
    p.add_argument(
        "--dump", metavar="FILE", help="save the current placement to FILE instead of rebalancing"
    )
    p.add_argument("--apply", metavar="FILE", help="move to the placement saved in FILE")
    add_admin_args(p, timeout_s=600.0)
    p.set_defaults(func=cmd_rebalance)


def cmd_rebalance(args: argparse.Namespace) -> int:
    from orchestrator.pool_instance import PLACEMENT_FORMAT, read_expert_placements

    problem = admin_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.dump and args.apply:
        print("error: --dump saves the placement, --apply moves to one: give one of them",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.grpc:
        if args.dump or args.apply:
            print("error: --dump and --apply use HTTP; drop --grpc", file=sys.stderr)
            return 2
        return _rebalance_grpc(args)
    url = args.url.rstrip("/")
    body: dict[str, Any] = {}
    if args.pool:
        body["pools"] = args.pool
    try:
        if args.apply:
            body["placements"] = read_expert_placements(args.apply)
    except (OSError, ValueError) as e:
        print(f"error: --apply: {e}", file=sys.stderr)
        return 1
    headers = {"Authorization": f"Bearer {args.token}"}
    try:
        if args.dump:
            resp = httpx.get(
                f"{url}/admin/experts", headers=headers, timeout=args.timeout,
                verify=tls_context(args),
            )  # fmt: skip
        else:
            resp = httpx.post(
                f"{url}/admin/rebalance", json=body, headers=headers, timeout=args.timeout,
                verify=tls_context(args),
            )  # fmt: skip
    except httpx.HTTPError as e:
        print(f"error: {cannot_reach(url, e)}", file=sys.stderr)
        return 1
    pools = _pools(resp)
    if pools is None:
        print(f"error: {response_error(url, resp)}", file=sys.stderr)
        return 1
    if not args.dump:
        return _print_reports(pools)
    placements = {name: p["phy2log"] for name, p in pools.items()}
    try:
        with open(args.dump, "w") as f:
            json.dump({"format": PLACEMENT_FORMAT, "pools": placements}, f)
    except OSError as e:
        print(f"error: --dump: {e}", file=sys.stderr)
        return 1
    print(f"saved the placement of {len(placements)} pool(s) to {args.dump}")
    return 0


def _pools(resp: httpx.Response) -> Any:
    """The `pools` of a pdserve admin answer (a list of reports from `/admin/rebalance`, a map of
    placements from `/admin/experts`); None for any other answer."""
    body = ok_json(resp)
    pools = body.get("pools") if isinstance(body, dict) else None
    if isinstance(pools, dict):
        return (
            pools if all(isinstance(p, dict) and "phy2log" in p for p in pools.values()) else None
        )
    return pools if isinstance(pools, list) and all(isinstance(r, dict) for r in pools) else None


def _rebalance_grpc(args: argparse.Namespace) -> int:
    quiet_grpc()
    import grpc
    from google.protobuf.json_format import MessageToDict

    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    try:
        with grpc_channel(args, args.grpc) as channel:
            reply = pb_grpc.GenerationStub(channel).Rebalance(
                pb.RebalanceRequest(pools=args.pool or []),
                metadata=[("authorization", f"Bearer {args.token}")],
                timeout=args.timeout,
            )
    except grpc.RpcError as e:
        print(grpc_error(args, e), file=sys.stderr)
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
