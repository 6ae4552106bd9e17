"""What every `pdserve` subcommand shares."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import ssl
import urllib.parse
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


def finite(text: str) -> float:
    """An argparse type: a finite number (not nan, not inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a time in seconds, > 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def seconds_or_zero(text: str) -> float:
    """An argparse type: a time in seconds, >= 0."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def count(text: str) -> int:
    """An argparse type: a count of tokens, requests, ... in [1, 2**31 - 1] (what the
    APIs' fields hold)."""
    value = int(text)
    if not 1 <= value < 1 << 31:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, 2147483647], got {text!r}")
    return value


def add_admin_args(p: argparse.ArgumentParser, timeout_s: float) -> None:
    """What the admin commands (`rebalance`, `scale`) share: where the server is, its admin
    token, and how long to wait."""
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--token", default=os.environ.get("PDSERVE_ADMIN_TOKEN"), help="admin token")
    p.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC API instead of HTTP")
    p.add_argument("--timeout", type=seconds, default=timeout_s, help="seconds to wait")
    add_connection_args(p, api_key=False)


def admin_problem(args: argparse.Namespace) -> str | None:
    """Why an admin command cannot call the server (no token, a bad --url or --grpc)."""
    if not args.token:
        return "--token (or PDSERVE_ADMIN_TOKEN) is required"
    return grpc_address_problem(args.grpc) if args.grpc else url_problem(args.url)


def ok_json(resp: Any) -> Any:
    """The JSON body of a 200 answer (an `httpx.Response`); None for any other answer, or a
    body that is not JSON (the callers then check its shape)."""
    if resp.status_code != 200:
        return None
    try:
        return resp.json()
    except ValueError:
        return None


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of cells in left-aligned columns (the first row: the header; a row may be short)."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())


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


def quiet_grpc() -> None:
    """Hold gRPC's own logging to errors (it would log a failed TLS handshake on top of our
    error line); read when grpc is first imported, so call it before."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


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
    """A hint to add to `error` when the server closed the connection at once: over http://,
    one that speaks HTTPS does; over https://, one that wants a client certificate; ""
    otherwise."""
    said = f"{error} {_cause(error)}".lower()
    if "disconnected" not in said and "connection reset" not in said:
        return ""
    if url.startswith("http://"):
        return " (if the server has TLS on, use https:// and --ca-cert)"
    # A server with --ssl-ca-certs ends the handshake of a client without a certificate (or
    # with one its CAs did not sign) this way.
    return " (if the server wants client certificates, give yours: --client-cert)"


# ---- what went wrong, in one line ---------------------------------------------------------------


def url_problem(url: str) -> str | None:
    """Why `url` (a `--url`) cannot be a server's address; None when it can."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return f"--url {url} has no scheme: use http://{url} (https:// for a server with TLS)"
    if scheme not in ("http", "https") or not rest:
        return f"--url {url}: use http://HOST:PORT (https:// for a server with TLS)"
    import httpx

    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not one)
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        return f"--url {url}: not an address ({e}); use http://HOST:PORT"
    if not parts.hostname:
        return f"--url {url}: no host; use http://HOST:PORT"
    return None


def grpc_address_problem(address: str) -> str | None:
    """Why `address` (a `--grpc`) cannot be a gRPC target; None when it can."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("http", "https"):
        return f"--grpc takes HOST:PORT, not a URL: use --grpc {rest.rstrip('/')}"
    return None


def cannot_reach(url: str, error: BaseException) -> str:
    """The line for a server that could not be reached: the URL and the cause in a few words
    ("connection refused"), not the client library's wrapping of it."""
    return f"cannot reach {url}: {_cause(error)}{tls_hint(url, error)}"


def _cause(error: BaseException) -> str:
    """What a failed connection came down to, found along the chain of causes."""
    cause: BaseException | None = error
    for _ in range(8):  # the chain of causes is short; stop on a cycle all the same
        if cause is None:
            break
        inner = getattr(cause, "os_error", None)  # what aiohttp's connector errors wrap
        if isinstance(inner, BaseException) and inner is not cause:
            cause = inner
            continue
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"{cause} (trust its CA with --ca-cert)"
        if isinstance(cause, ssl.SSLError):
            return str(cause)
        if isinstance(cause, ConnectionError) and cause.errno:
            return os.strerror(cause.errno).lower()  # not asyncio's "Connect call failed (...)"
        if isinstance(cause, socket.gaierror) and cause.strerror:
            return cause.strerror.lower()
        if isinstance(cause, TimeoutError):
            return "timed out"
        cause = cause.__cause__ or cause.__context__
    return str(error) or type(error).__name__


def answer_error(url: str, status: str, content_type: str, body: bytes) -> str:
    """The line for an answer that is not the one wanted: `url` answered `status` ("404 Not
    Found"), with pdserve's own message when the body is its JSON error, else what kind of body
    it was (an HTML error page is not printed)."""
    message = _error_message(body)
    if message is not None:
        return f"{url} answered {status}: {message}"
    kind = content_type.split(";")[0].strip() or "untyped"
    what = f"{kind} body" if body else "empty body"
    return f"{url} answered {status} (not a pdserve server? {what})"


def response_error(url: str, resp: Any) -> str:
    """`answer_error` for an httpx response (read already, or read here)."""
    status = f"{resp.status_code} {resp.reason_phrase}"
    return answer_error(url, status, resp.headers.get("content-type", ""), resp.read())


def _error_message(body: bytes) -> str | None:
    """The message of a JSON error body: pdserve's `{"error": {"message"}}`, or FastAPI's
    `{"detail"}` (a route this server does not have); None for any other body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    message = error.get("message") if isinstance(error, dict) else data.get("detail")
    return " ".join(message.split()) if isinstance(message, str) and message else None


def grpc_error(args: argparse.Namespace, error: Any) -> str:
    """The error line for a failed gRPC call (`grpc.RpcError`) to `args.grpc`: a closed port and
    a port that speaks HTTP/1 said plainly; else the status, with a hint when a plain channel
    found the port closing on it (a TLS server does that)."""
    code, details = error.code().name, " ".join((error.details() or "").split())
    if code == "UNAVAILABLE" and "Connection refused" in details:
        return f"error: cannot reach {args.grpc}: connection refused"
    if code == "UNAVAILABLE" and _http1_reply(details):
        return (
            f"error: {args.grpc} does not speak gRPC (an HTTP port? give it as "
            f"--url http://{args.grpc})"
        )
    if code == "UNAVAILABLE" and "WRONG_VERSION_NUMBER" in details:
        return f"error: {args.grpc} does not speak TLS (drop --ca-cert and --client-cert)"
    line = f"error: {code}: {details}"
    if code == "UNAVAILABLE" and not uses_tls(args):
        line += " (if the server has TLS on, add --ca-cert)"
    elif code == "UNAVAILABLE" and "Socket closed" in details:
        line += " (if the server wants client certificates, give yours: --client-cert)"
    return line


def _http1_reply(details: str) -> bool:
    """Whether gRPC's error says the server answered in text (HTTP/1) where HTTP/2 frames were
    due: the "frame type" it read is then a byte of that text ('P' of "HTTP/1.1 400")."""
    _, found, rest = details.partition(
        "Expected SETTINGS frame as the first frame, got frame type "
    )
    digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
    return bool(found and digits) and int(digits) >= 0x20
