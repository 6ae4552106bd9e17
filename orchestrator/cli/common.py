"""What every `pdserve` subcommand shares."""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.auth import client_tls

Command = Callable[[argparse.Namespace], int]


def say(*parts: Any) -> None:
    """A line of the command's own output, marked as pdserve's."""
    print("pdserve:", *parts, flush=True)


# ---- talking to a server -------------------------------------------------------------------


def add_connection_args(p: argparse.ArgumentParser, api_key: bool = True) -> None:
    """`--ca-cert` (and `--api-key`) for the commands that call a server."""
    if api_key:
        p.add_argument(
            "--api-key", default=os.environ.get("PDSERVE_API_KEY"),
            help="the server's --api-key (default: $PDSERVE_API_KEY)",
        )  # fmt: skip
    p.add_argument(
        "--ca-cert", metavar="PEM",
        help="trust this CA (or the server's own self-signed certificate) for an https:// URL "
        "and for --grpc, which then uses TLS (default: the system's CAs; plain gRPC)",
    )  # fmt: skip
    p.add_argument(
        "--client-cert", metavar="PEM",
        help="present this certificate to a server that asks for one (its --ssl-ca-certs); "
        "turns TLS on for --grpc too",
    )  # fmt: skip
    p.add_argument(
        "--client-key", metavar="PEM",
        help="the private key of --client-cert (default: in the --client-cert file)",
    )  # fmt: skip


def auth_headers(args: argparse.Namespace) -> dict[str, str]:
    key = getattr(args, "api_key", None)
    return {"Authorization": f"Bearer {key}"} if key else {}


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """What httpx's `verify` takes: the system's CAs, or those of `--ca-cert`, and the
    client certificate of `--client-cert`."""
    return client_tls(args.ca_cert, args.client_cert, args.client_key) or True


def uses_tls(args: argparse.Namespace) -> bool:
    """Whether `--grpc` goes over TLS: with `--ca-cert` or `--client-cert`."""
    return bool(args.ca_cert or args.client_cert)


def grpc_channel(args: argparse.Namespace, address: str) -> Any:
    """A gRPC channel to `address`: TLS trusting `--ca-cert` (else the system's CAs) and
    presenting `--client-cert` when either is given, else plain."""
    import grpc

    if not uses_tls(args):
        return grpc.insecure_channel(address)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca_cert),
        private_key=read(args.client_key or args.client_cert),
        certificate_chain=read(args.client_cert),
    )
    return grpc.secure_channel(address, credentials)


def tls_hint(url: str, error: BaseException) -> str:
    """A hint to add to `error` when an http:// URL met a server that closed at once (one
    that speaks HTTPS does); "" otherwise."""
    if url.startswith("http://") and "disconnected" in str(error).lower():
        return " (if the server has TLS on, use https:// and --ca-cert)"
    return ""


def grpc_error(args: argparse.Namespace, error: Any) -> str:
    """The error line for a failed gRPC call (`grpc.RpcError`), with a hint when a plain
    channel found the port closing on it (a TLS server does that)."""
    line = f"error: {error.code().name}: {error.details()}"
    if error.code().name == "UNAVAILABLE" and not uses_tls(args):
        line += " (if the server has TLS on, add --ca-cert)"
    return line
