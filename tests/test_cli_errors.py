"""The `pdserve` clients against what is not a pdserve server: an HTTP server answering an HTML
error page or a 200 that is not pdserve's, a closed port, a URL without its scheme. Each failure
is one line on stderr that names the URL (and the status), exit status 1 (2 for a bad argument),
no HTML and no traceback. No pdserve server and no Ray: plain servers started here."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator.cli import main

HTML = (
    b"<!DOCTYPE html>\n<html><head><title>Oops</title></head>\n<body>nothing here</body></html>\n"
)

# Every command that calls an HTTP server (named by the subcommand), its arguments after --url.
HTTP_COMMANDS = {
    "generate": ["--prompt", "hi", "--max-new-tokens", "2"],
    "generate --chat": ["--prompt", "hi", "--chat"],
    "status": [],
    "bench": ["--num-prompts", "2", "--input-len", "4", "--output-len", "2"],
    "rebalance": ["--token", "t"],
    "rebalance --dump": ["--token", "t", "--dump", "/nonexistent/placement.json"],
    "scale": ["--token", "t"],
    "scale --decode": ["--token", "t", "--decode", "2"],
}


def _argv(command: str, url: str) -> list[str]:
    return [command.split()[0], "--url", url, *HTTP_COMMANDS[command]]


class _Answer(BaseHTTPRequestHandler):
    """Answers every GET and POST with `status`, `content_type` and `body` (set per server)."""

    status = 404
    content_type = "text/html"
    body = HTML

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass  # not into the stderr that the tests read


@pytest.fixture
def answering() -> Iterator[object]:
    """A function that starts a server answering (status, content_type, body); its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int, content_type: str, body: bytes) -> str:
        handler = type("Handler", (_Answer,), dict(status=status, content_type=content_type,
                                                   body=body))  # fmt: skip
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert "<html" not in (out + err).lower() and "Traceback" not in err, err
    assert out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", HTTP_COMMANDS)
def test_an_html_error_page_is_one_line(command, answering, capsys):
    url = answering(404, "text/html; charset=utf-8", HTML)
    assert main(_argv(command, url)) == 1
    line = _one_line(capsys)
    assert f"{url} answered" in line and "404 Not Found" in line, line
    assert "not a pdserve server? text/html body" in line, line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", HTTP_COMMANDS)
def test_a_200_that_is_not_pdserve_is_one_line(command, answering, capsys):
    url = answering(200, "text/html", HTML)
    assert main(_argv(command, url)) == 1
    line = _one_line(capsys)
    assert f"{url} answered" in line and "200 OK" in line and "not a pdserve server?" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["status", "bench", "rebalance"])
def test_json_that_is_not_pdserve_is_one_line(command, answering, capsys):
    url = answering(200, "application/json", b'{"hello": "world"}')
    assert main(_argv(command, url)) == 1
    line = _one_line(capsys)
    assert f"{url} answered 200 OK (not a pdserve server? application/json body)" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", HTTP_COMMANDS)
def test_pdserve_json_errors_print_their_message(command, answering, capsys):
    body = {"error": {"message": "wrong admin token", "type": "permission_error", "param": None}}
    url = answering(403, "application/json", json.dumps(body).encode())
    assert main(_argv(command, url)) == 1
    line = _one_line(capsys)
    assert f"{url} answered" in line and line.endswith("403 Forbidden: wrong admin token"), line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", HTTP_COMMANDS)
def test_a_closed_port_is_named(command, closed_port, capsys):
    url = f"http://127.0.0.1:{closed_port}"
    assert main(_argv(command, url)) == 1
    assert _one_line(capsys) == f"error: cannot reach {url}: connection refused"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", HTTP_COMMANDS)
def test_a_url_without_its_scheme_says_use_http(command, capsys):
    assert main(_argv(command, "127.0.0.1:30000")) == 2
    assert "use http://127.0.0.1:30000" in _one_line(capsys)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", HTTP_COMMANDS)
@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://[::1", "http://h:30555 x"])
def test_a_url_that_is_no_address_is_one_line(command, url, capsys):
    """(Found by an audit: a traceback from the HTTP client.)"""
    assert main(_argv(command, url)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: --url {url}: not an address"), line


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv",
    [
        ["scale", "--token", "t", "--decode", "1", "--drain-timeout", "nan"],
        ["scale", "--token", "t", "--decode", "1", "--drain-timeout", "-1"],
        ["scale", "--token", "t", "--timeout", "inf"],
        ["rebalance", "--token", "t", "--timeout", "0"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "99999999999"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "-1"],
        ["generate", "--prompt", "hi", "--temperature", "nan"],
        ["bench", "--temperature", "inf"],
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_usage_errors(argv, capsys):
    """(Found by an audit: tracebacks from the JSON encoder, httpx and protobuf.)"""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err, err


GRPC_COMMANDS = {
    "generate": ["generate", "--prompt", "hi"],
    "rebalance": ["rebalance", "--token", "t", "--timeout", "10"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", GRPC_COMMANDS)
def test_grpc_against_a_closed_port_and_an_http_port(command, closed_port, answering, capsys):
    address = f"127.0.0.1:{closed_port}"
    assert main([*GRPC_COMMANDS[command], "--grpc", address]) == 1
    assert _one_line(capsys) == f"error: cannot reach {address}: connection refused"
    address = answering(404, "text/html", HTML).removeprefix("http://")
    assert main([*GRPC_COMMANDS[command], "--grpc", address]) == 1
    line = _one_line(capsys)
    assert f"{address} does not speak gRPC" in line and f"--url http://{address}" in line, line
    assert main([*GRPC_COMMANDS[command], "--grpc", f"http://{address}"]) == 2
    assert f"use --grpc {address}" in _one_line(capsys)


def test_status_cells_for_the_prefix_cache_and_guesses():
    from orchestrator.cli.client import _guesses, _prefix_hits

    assert _prefix_hits({}) == "-" and _guesses({"num_spec_draft_tokens": 0}) == "-"
    stats = {"num_prefix_queried_tokens": 200, "num_prefix_hit_tokens": 150,
             "num_prefix_host_hit_tokens": 50}  # fmt: skip
    assert _prefix_hits(stats) == "75% (25%)"
    assert _guesses({"num_spec_draft_tokens": 40, "num_spec_accepted_tokens": 10}) == "10/40 (25%)"


def test_bench_counts_each_rank_process_from_where_it_stood():
    """`pdserve bench`'s server counts over a run: each rank's growth; a rank restarted
    during the run (a new process id) from 0, not its drop against the old process."""
    from orchestrator.bench import counts_during

    def counts(guessed: int, kept: int) -> dict[str, int]:
        return {"prefix_queried_tokens": 0, "prefix_hit_tokens": 0,
                "spec_draft_tokens": guessed, "spec_accepted_tokens": kept}  # fmt: skip

    before = {(0, 100): counts(50, 20), (1, 200): counts(900, 400)}
    after = {(0, 100): counts(80, 30), (1, 201): counts(120, 60), (2, 300): counts(5, 1)}
    ran = counts_during(before, after)
    assert ran["spec_draft_tokens"] == 30 + 120 + 5 and ran["spec_accepted_tokens"] == 10 + 60 + 1


@pytest.mark.timeout(60)
def test_down_against_an_address_where_no_ray_answers_is_one_line(closed_port, capsys):
    """(Found by an audit: Ray's retries until killed.)"""
    assert main(["down", "--address", f"127.0.0.1:{closed_port}"]) == 2
    line = capsys.readouterr().err.strip()
    assert f"127.0.0.1:{closed_port}: no Ray cluster answers there" in line, line
