"""Bearer credentials: the API key that guards the inference routes (`--api-key`) and the admin
token that guards `/admin/*` (`--admin-token`), on HTTP and gRPC alike.

With an API key set, every HTTP route but `/health`, `/metrics` (load balancers and Prometheus
scrapers carry no key) and the admin routes (their own token) needs `Authorization: Bearer
<key>`, and so do the gRPC `Generate` and `Abort` calls (metadata `authorization`); the health
and reflection services stay open. Without one, nothing is checked. Keys are compared in
constant time.

`client_tls` is the other side of TLS: the context the `pdserve` clients connect with."""

from __future__ import annotations

import hmac
import json
import ssl

from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.request_fields import RequestError

OPEN_ROUTES = frozenset({"/health", "/metrics"})


def bearer(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header; None without one."""
    if header is None or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip()


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def api_key_refusal(header: str | None, api_key: str) -> str | None:
    """Why a request with this `authorization` header may not use the API; None when it may."""
    given = bearer(header)
    if given is None:
        return "missing API key: send 'Authorization: Bearer <key>' (the server's --api-key)"
    if not same_secret(given, api_key):
        return "wrong API key"
    return None


class RequireApiKey:
    """ASGI middleware: answers 401 (OpenAI's error shape, `authentication_error`) to an HTTP
    request without the API key, except on `exempt` routes. CORS preflights (OPTIONS) carry no
    credentials and pass."""

    def __init__(self, app: ASGIApp, api_key: str, exempt: frozenset[str]):
        self.app = app
        self.api_key = api_key
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") == "OPTIONS"
            or scope.get("path", "") in self.exempt
        ):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        refusal = api_key_refusal(header, self.api_key)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(RequestError(refusal, None, 401, "authentication_error").body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def client_tls(
    ca_cert: str | None, client_cert: str | None = None, client_key: str | None = None
) -> ssl.SSLContext | None:
    """The TLS context a client connects with: trusting `ca_cert` (default: the system's CAs)
    and, for a server that wants client certificates (`--ssl-ca-certs`), presenting
    `client_cert` (and `client_key`, when the key is not in the same PEM file). None when
    neither file is given: the system's defaults. ValueError naming the flag of a file that
    does not load."""
    if ca_cert is None and client_cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=ca_cert)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ca-cert {ca_cert}: not a readable PEM file ({e})") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(
                f"--client-cert {client_cert}"
                + (f" / --client-key {client_key}" if client_key else "")
                + f": cannot load a PEM certificate and its private key ({e})"
            ) from None
    return context
