"""`pdserve`: serve, generate, bench, status, rebalance, scale. Each subcommand is one `add_*` (its
flags) and one `cmd_*` (what it does), in the module of its kind."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from orchestrator.auth import client_tls
from orchestrator.cli.client import add_bench, add_generate, add_status
from orchestrator.cli.common import Command
from orchestrator.cli.down import add_down
from orchestrator.cli.rebalance import add_rebalance
from orchestrator.cli.scale import add_scale
from orchestrator.cli.serve import add_serve, serve_config

__all__ = ["build_parser", "main", "serve_config"]

SUBCOMMANDS = (
    add_serve, add_generate, add_bench, add_status, add_rebalance, add_scale, add_down
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Serve DeepSeek-V3/V2-architecture MoE models on a Ray cluster, with "
        "prefill/decode disaggregation; and talk to a running server.",
    )
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
            print(f"pdserve: error: {e}", file=sys.stderr)  # as serve's flag errors read
            return 2
    if hasattr(args, "ca_cert"):
        if args.client_key and not args.client_cert:
            print("error: --client-key goes with --client-cert", file=sys.stderr)
            return 2
        try:
            client_tls(args.ca_cert, args.client_cert, args.client_key)
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
