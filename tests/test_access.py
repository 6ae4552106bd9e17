"""Who may call a server, and how: with `--api-key` the inference routes (HTTP and gRPC) need
`Authorization: Bearer <key>` while health, metrics and the admin routes (their own token) do
not; with `--ssl-certfile` / `--ssl-keyfile` HTTP and gRPC are served over TLS. The CLI clients
send the key and trust `--ca-cert`. The server here does both, with a self-signed certificate
for 127.0.0.1 made by the test."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.disagg_calls import _metric

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-api-key-1"
ADMIN = "admin-token-1"


def make_self_signed(directory: Path, name: str = "server") -> tuple[str, str]:
    """A certificate for 127.0.0.1 / localhost and its key, as PEM files: (cert, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdserve test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(launch_tiny, cert):
    srv = launch_tiny(
        colocated=True, api_key=KEY, admin_token=ADMIN, grpc_port=0, log_requests=True,
        ssl_certfile=cert[0], ssl_keyfile=cert[1],
    )  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


def _trust(cert: tuple[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert[0])


def _channel(server: Any, cert: tuple[str, str]) -> Any:
    import grpc

    roots = Path(cert[0]).read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(server.grpc_address, credentials)


@contextlib.contextmanager
def _request_log() -> Iterator[list[dict[str, Any]]]:
    """The request-log records made inside the block, parsed."""
    records: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(record.getMessage()))

    handler = Keep()
    logger = logging.getLogger("pdserve.requests")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_inference_routes_refuse_a_missing_or_wrong_key_and_serve_the_right_one(server, cert):
    import httpx

    gen = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    calls = [
        ("POST", "/generate", gen),
        ("POST", "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}),
        ("POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        ("POST", "/tokenize", {"prompt": "hello"}),
        ("POST", "/detokenize", {"tokens": [5, 6]}),
        ("POST", "/abort_request", {"rid": "nobody"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/stats", None),
    ]  # fmt: skip
    refused = [
        ({}, "missing API key"),
        ({"Authorization": f"Basic {KEY}"}, "missing API key"),
        (_bearer("sk-wrong-key-00"), "wrong API key"),
        (_bearer(ADMIN), "wrong API key"),  # the admin token is not an API key
    ]
    assert server.url.startswith("https://")
    with pytest.raises(httpx.HTTPError):  # TLS only: plain HTTP gets nowhere
        httpx.get(server.url.replace("https://", "http://") + "/health", timeout=10)
    with httpx.Client(base_url=server.url, timeout=60, verify=_trust(cert)) as client:
        for method, route, body in calls:
            for headers, why in refused:
                resp = client.request(method, route, json=body, headers=headers)
                assert resp.status_code == 401, (route, headers, resp.text)
                assert resp.headers["www-authenticate"] == "Bearer"
                error = resp.json()["error"]
                assert error["type"] == "authentication_error" and why in error["message"]
            resp = client.request(method, route, json=body, headers=_bearer(KEY))
            assert resp.status_code == 200, (route, resp.text)
        with _request_log() as lines:
            out = client.post("/generate", json=gen, headers=_bearer(KEY)).json()
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            client.post("/v1/chat/completions", json=chat, headers=_bearer(KEY))
        assert len(out["output_ids"]) == 3
        assert [(r["api"], r["output_tokens"], r["client"]) for r in lines] == [
            ("/generate", 3, "127.0.0.1"),
            ("/v1/chat/completions", 2, "127.0.0.1"),
        ]
        assert lines[0]["rid"] == out["meta_info"]["id"] and lines[0]["prompt_tokens"] == 3
        # Health and metrics stay open (load balancers, Prometheus); refusals are counted.
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert 'pdserve_requests_total{route="/generate",status="401"} 4.0' in metrics.text
        # The admin routes take the admin token, not the API key.
        assert client.post("/admin/flush_cache", headers=_bearer(ADMIN)).status_code == 200
        assert client.post("/admin/flush_cache", headers=_bearer(KEY)).status_code == 403
        # Unknown routes do not tell whether they exist without the key.
        assert client.get("/nowhere").status_code == 401
        assert client.get("/nowhere", headers=_bearer(KEY)).status_code == 404


def test_grpc_calls_need_the_key_and_health_does_not(server, cert):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=[5, 6, 7]),
        sampling=pb.SamplingParams(max_new_tokens=3, temperature=0.0),
    )
    with _channel(server, cert) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for metadata in ([], [("authorization", "Bearer sk-wrong-key-00")]):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(request, timeout=30, metadata=metadata))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
            assert "API key" in (e.value.details() or "")
            with pytest.raises(grpc.RpcError) as e:
                stub.Abort(pb.AbortRequest(rid="x"), timeout=30, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = [("authorization", f"Bearer {KEY}")]
        with _request_log() as lines:
            responses = list(stub.Generate(request, timeout=60, metadata=ok))
        final = responses[-1].final
        assert final.usage.completion_tokens == 3
        # gRPC requests count in /metrics and the request log like HTTP ones.
        assert [(r["rid"], r["api"], r["finish"], r["output_tokens"]) for r in lines] == [
            (final.rid, "grpc", "length", 3)
        ]
        tls = _trust(cert)
        assert _metric(server.url, "pdserve_request_finish_total", tls, reason="length") >= 1
        assert _metric(server.url, "pdserve_generation_tokens_total", tls) >= 3
        assert not stub.Abort(pb.AbortRequest(rid="x"), timeout=30, metadata=ok).found
        # Open without the key. (It follows the router's readiness within 0.25 s: ask as a
        # probe would, until it says SERVING.)
        with grpc.insecure_channel(server.grpc_address) as plain:  # TLS only
            with pytest.raises(grpc.RpcError) as e:
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        health_stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while True:
            health = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            if health.status == health_pb2.HealthCheckResponse.SERVING:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.05)


def test_cli_clients_send_the_key_and_trust_the_ca_cert(server, cert, capsys):
    from orchestrator.cli import main

    prompt = ["--prompt", "hello", "--max-new-tokens", "3"]
    trust = ["--ca-cert", cert[0]]
    assert main(["generate", "--url", server.url, *trust, *prompt]) == 1
    assert "answered 401" in capsys.readouterr().err
    assert main(["generate", "--url", server.url, "--api-key", KEY, *trust, *prompt]) == 0
    assert "[3 tokens" in capsys.readouterr().err
    # Without --ca-cert the self-signed certificate is not trusted: a clear error.
    assert main(["generate", "--url", server.url, "--api-key", KEY, *prompt]) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    grpc_at = ["--grpc", server.grpc_address]
    assert main(["generate", *grpc_at, *trust, *prompt]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["generate", *grpc_at, "--api-key", KEY, *trust, *prompt]) == 0
    assert main(["status", "--url", server.url, *trust]) == 1
    assert "answered 401" in capsys.readouterr().err
    assert main(["status", "--url", server.url, "--api-key", KEY, *trust]) == 0
    bench = ["bench", "--url", server.url, "--num-prompts", "2", "--input-len", "4",
             "--output-len", "2", "--concurrency", "2", *trust]  # fmt: skip
    assert main(bench) == 1
    assert "answered 401" in capsys.readouterr().err
    assert main([*bench, "--api-key", KEY]) == 0
    assert main([*bench[:-2], "--api-key", KEY]) == 1  # untrusted certificate
    assert "certificate" in capsys.readouterr().err.lower()
    assert main(["status", "--url", server.url, "--ca-cert", "/nonexistent.pem"]) == 2
    assert "--ca-cert /nonexistent.pem" in capsys.readouterr().err
    # Plain HTTP or gRPC against the TLS server: the error says what to try.
    plain = server.url.replace("https://", "http://")
    assert main(["status", "--url", plain, "--api-key", KEY]) == 1
    assert "use https:// and --ca-cert" in capsys.readouterr().err
    assert main(["generate", *grpc_at, "--api-key", KEY, *prompt]) == 1
    assert "add --ca-cert" in capsys.readouterr().err


def test_api_key_settings_are_checked(tmp_path, monkeypatch):
    from orchestrator.cli.serve import _is_loopback
    from orchestrator.config import ServeConfig
    from orchestrator.serve_file import load_serve_file
    from orchestrator.tls import TlsFiles

    with pytest.raises(ValueError, match="--api-key must be at least 8 characters"):
        ServeConfig(api_key="short")
    with pytest.raises(ValueError, match="must differ"):
        ServeConfig(api_key="same-secret", admin_token="same-secret")
    path = tmp_path / "serve.yaml"
    path.write_text("api_key_env: MY_PDSERVE_KEY\n")
    monkeypatch.setenv("MY_PDSERVE_KEY", "from-the-environment")
    assert load_serve_file(path)["api_key"] == "from-the-environment"
    monkeypatch.delenv("MY_PDSERVE_KEY")
    assert load_serve_file(path)["api_key"] is None
    cert, key = make_self_signed(tmp_path, "a")
    other_cert, _ = make_self_signed(tmp_path, "b")
    assert ServeConfig(ssl_certfile=cert, ssl_keyfile=key).tls == TlsFiles(cert, key)
    with pytest.raises(ValueError, match="go together"):
        ServeConfig(ssl_certfile=cert)
    with pytest.raises(ValueError, match="no such file"):
        ServeConfig(ssl_certfile=cert, ssl_keyfile=str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="cannot load them"):  # a key of another certificate
        ServeConfig(ssl_certfile=other_cert, ssl_keyfile=key)
    mutual = ServeConfig(ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=other_cert)
    assert mutual.tls == TlsFiles(cert, key, other_cert)
    with pytest.raises(ValueError, match="needs TLS"):
        ServeConfig(ssl_ca_certs=other_cert)
    with pytest.raises(ValueError, match="--ssl-ca-certs: empty"):
        ServeConfig(ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs="")
    with pytest.raises(ValueError, match="--ssl-ca-certs: no such file"):
        ServeConfig(ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=str(tmp_path / "no.pem"))
    with pytest.raises(ValueError, match="--ssl-ca-certs .*(cannot load|holds no)"):
        ServeConfig(ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=key)  # a key, no cert
    path.write_text(f"ssl_certfile: {cert}\nssl_keyfile: {key}\nssl_ca_certs: {other_cert}\n")
    assert load_serve_file(path)["ssl_ca_certs"] == other_cert
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")


def test_a_grpc_port_in_use_is_refused_not_shared():
    """gRPC turns SO_REUSEPORT on by default: a second server on a port in use would start and
    take half of the connections. Ours refuses the port, naming it."""
    import asyncio
    import socket
    from types import SimpleNamespace

    from orchestrator.config import ServeConfig
    from orchestrator.grpc_server import GrpcServer

    router = SimpleNamespace(is_ready=True)

    async def run() -> None:  # a gRPC aio server runs on an event loop (as the app's does)
        taken = GrpcServer(router, ServeConfig(grpc_port=0))  # type: ignore[arg-type]
        await taken.start()
        try:
            second = GrpcServer(router, ServeConfig(grpc_port=taken.port))  # type: ignore[arg-type]
            with pytest.raises(RuntimeError, match=f"cannot bind gRPC to 127.0.0.1:{taken.port}"):
                await second.start()
        finally:
            await taken.stop()
        with socket.socket() as plain:  # a port some other program holds
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            port = plain.getsockname()[1]
            with pytest.raises(RuntimeError, match="is the port in use"):
                await GrpcServer(router, ServeConfig(grpc_port=port)).start()  # type: ignore[arg-type]

    asyncio.run(run())


def test_the_server_reports_why_it_did_not_start():
    """A front end that fails at startup (here: the gRPC port is taken) is reported with its
    cause, not as an HTTP server that failed to start."""
    import socket

    from orchestrator.config import ServeConfig
    from orchestrator.launcher import ServerThread
    from orchestrator.server import create_app

    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        config = ServeConfig(grpc_port=port)
        app = create_app(object(), config, manage_router=False)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=f"failed to start: cannot bind gRPC .*:{port}"):
            ServerThread(app, "127.0.0.1", 0, log_level="critical").start()
        # The HTTP port itself taken: uvicorn exits; the message says where.
        app = create_app(object(), ServeConfig(), manage_router=False)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port} \\(is the port in use"):
            ServerThread(app, "127.0.0.1", port, log_level="critical").start()


@pytest.fixture(scope="module")
def mutual(launch_tiny, cert, tmp_path_factory):
    """A server that wants client certificates (`--ssl-ca-certs`), and the client certificate
    it trusts and one it does not: (server, trusted (cert, key), stranger (cert, key))."""
    directory = tmp_path_factory.mktemp("mtls")
    client, stranger = make_self_signed(directory, "client"), make_self_signed(directory, "x")
    srv = launch_tiny(
        colocated=True, grpc_port=0, ssl_certfile=cert[0], ssl_keyfile=cert[1],
        ssl_ca_certs=client[0],
    )  # fmt: skip
    try:
        yield srv, client, stranger
    finally:
        srv.stop()


def test_mutual_tls_serves_only_clients_with_a_trusted_certificate(mutual, cert, capsys):
    import grpc
    import httpx

    from orchestrator.auth import client_tls
    from orchestrator.cli import main
    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    server, client, stranger = mutual
    gen = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    # HTTP: no certificate, or one the server does not trust, gets no answer at all (not even
    # /health: the handshake fails before any route).
    for who in (None, stranger):
        tls = client_tls(cert[0], *(who or (None, None)))
        with pytest.raises(httpx.HTTPError):
            httpx.post(server.url + "/generate", json=gen, verify=tls, timeout=30)
    tls = client_tls(cert[0], *client)
    out = httpx.post(server.url + "/generate", json=gen, verify=tls, timeout=60).json()
    assert len(out["output_ids"]) == 3
    # gRPC, the same.
    request = pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=[5, 6, 7]),
        sampling=pb.SamplingParams(max_new_tokens=3, temperature=0.0),
    )
    roots = Path(cert[0]).read_bytes()
    for who in (None, stranger):
        keys = {}
        if who is not None:
            keys = {"private_key": Path(who[1]).read_bytes(),
                    "certificate_chain": Path(who[0]).read_bytes()}  # fmt: skip
        credentials = grpc.ssl_channel_credentials(roots, **keys)
        with grpc.secure_channel(server.grpc_address, credentials) as channel:
            with pytest.raises(grpc.RpcError) as e:
                list(pb_grpc.GenerationStub(channel).Generate(request, timeout=30))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    credentials = grpc.ssl_channel_credentials(
        roots, Path(client[1]).read_bytes(), Path(client[0]).read_bytes()
    )
    with grpc.secure_channel(server.grpc_address, credentials) as channel:
        responses = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=60))
    assert list(responses[-1].final.output_ids) == out["output_ids"]
    # The CLI clients present --client-cert (its key in --client-key, or in the same file).
    trust = ["--ca-cert", cert[0]]
    mine = ["--client-cert", client[0], "--client-key", client[1]]
    prompt = ["--prompt", "hello", "--max-new-tokens", "3"]
    for where in (["--url", server.url], ["--grpc", server.grpc_address]):
        assert main(["generate", *where, *trust, *prompt]) == 1  # no certificate: a hint
        assert "give yours: --client-cert" in capsys.readouterr().err
    assert main(["generate", "--url", server.url, *trust, *mine, *prompt]) == 0
    assert main(["generate", "--grpc", server.grpc_address, *trust, *mine, *prompt]) == 0
    combined = Path(client[0]).parent / "client-both.pem"
    combined.write_text(Path(client[0]).read_text() + Path(client[1]).read_text())
    assert main(["status", "--url", server.url, *trust, "--client-cert", str(combined)]) == 0
    bench = ["bench", "--url", server.url, "--num-prompts", "2", "--input-len", "4",
             "--output-len", "2", "--concurrency", "2", *trust, *mine]  # fmt: skip
    assert main(bench) == 0
    capsys.readouterr()
    assert main(["status", "--url", server.url, *trust, "--client-key", client[1]]) == 2
    assert "--client-key goes with --client-cert" in capsys.readouterr().err
    assert main(["status", "--url", server.url, *trust, "--client-cert", cert[1]]) == 2
    assert "--client-cert" in capsys.readouterr().err  # a key file is no certificate
