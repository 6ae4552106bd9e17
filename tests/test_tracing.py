"""`--otlp-traces-endpoint`: a real server exports a span per request over OTLP/HTTP to a
collector on loopback (a plain HTTP server here that decodes the OTLP protobuf). A request with
a W3C `traceparent` (HTTP header, gRPC metadata) joins the caller's trace as a child of its
span; one without starts a trace of its own; the attributes hold the request's token counts
as the response gave them, its finish reason and times; a request whose client left ends a
span too."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import pytest

from orchestrator.config import ServeConfig
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
GRPC_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


class _Collector:
    """An OTLP/HTTP traces receiver on loopback: every span it got, decoded."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        spans: list[dict[str, Any]] = []
        self.spans = spans
        self.paths: list[str] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                paths.append(self.path)
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            spans.append({
                                "service": service.get("service.name"),
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "status": span.status.code,
                                "events": {e.name: e.time_unix_nano for e in span.events},
                                "attrs": {a.key: _value(a.value) for a in span.attributes},
                            })  # fmt: skip
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} of {count} spans came"
            time.sleep(0.1)
        return list(self.spans)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def test_requests_become_spans_in_their_callers_traces(launch_tiny):
    collector = _Collector()
    server = launch_tiny(colocated=True, grpc_port=0, otlp_traces_endpoint=collector.url,
                         otel_service_name="pdserve-test")  # fmt: skip
    try:
        url = server.url
        header = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        chat = httpx.post(url + "/v1/chat/completions", headers=header, timeout=60, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12,
            "temperature": 0.0, "ignore_eos": True,
        }).json()  # fmt: skip
        generate = httpx.post(url + "/generate", timeout=60, json={
            "input_ids": list(range(5, 30)), "sampling_params": {"max_new_tokens": 7},
        }).json()  # fmt: skip
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            request = pb.GenerateRequest(
                input_ids=pb.TokenIds(ids=[3, 4, 5, 6]),
                sampling=pb.SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True),
            )
            metadata = (("traceparent", f"00-{GRPC_TRACE_ID}-{PARENT_ID}-01"),)
            list(stub.Generate(request, metadata=metadata, timeout=60))
        # A client that leaves mid-stream: its span ends too ("gone").
        body = {"input_ids": list(range(5, 40)), "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}  # fmt: skip
        with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        spans = collector.wait_for(4)
    finally:
        server.stop()
    assert set(collector.paths) == {"/v1/traces"}
    by_api = {s["attrs"]["pdserve.api"] + ("-gone" if s["attrs"]["gen_ai.response.finish_reasons"]
              == ["gone"] else ""): s for s in spans}  # fmt: skip
    assert set(by_api) == {"/v1/chat/completions", "/generate", "grpc", "/generate-gone"}, spans
    assert {s["service"] for s in spans} == {"pdserve-test"}

    span = by_api["/v1/chat/completions"]
    assert (span["trace_id"], span["parent_id"]) == (TRACE_ID, PARENT_ID)
    attrs = span["attrs"]
    assert span["name"] == f"chat {attrs['gen_ai.request.model']}" and span["kind"] == 2  # SERVER
    assert attrs["gen_ai.usage.input_tokens"] == chat["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == chat["usage"]["completion_tokens"] == 12
    assert attrs["gen_ai.response.finish_reasons"] == [chat["choices"][0]["finish_reason"]]
    assert attrs["gen_ai.request.max_tokens"] == 12 and attrs["gen_ai.request.temperature"] == 0
    assert span["status"] != 2  # not ERROR
    assert span["start"] < span["events"]["first_token"] <= span["end"]
    assert 0 < attrs["pdserve.ttft_s"] <= (span["end"] - span["start"]) / 1e9

    span = by_api["/generate"]
    assert span["parent_id"] == "" and span["trace_id"] not in (TRACE_ID, GRPC_TRACE_ID)
    assert span["attrs"]["gen_ai.response.id"] == generate["meta_info"]["id"]
    assert span["attrs"]["gen_ai.usage.output_tokens"] == 7
    assert span["name"].startswith("text_completion ")

    span = by_api["grpc"]
    assert (span["trace_id"], span["parent_id"]) == (GRPC_TRACE_ID, PARENT_ID)
    assert span["attrs"]["gen_ai.usage.output_tokens"] == 5

    span = by_api["/generate-gone"]
    assert "first_token" in span["events"] and span["parent_id"] == ""
    assert span["attrs"]["gen_ai.usage.output_tokens"] >= 1  # what it had when it left
    assert span["attrs"]["gen_ai.usage.input_tokens"] == 35


def test_a_traces_endpoint_must_be_an_http_url() -> None:
    with pytest.raises(ValueError, match="--otlp-traces-endpoint must be an http"):
        ServeConfig(otlp_traces_endpoint="collector:4317")
    config = ServeConfig(otlp_traces_endpoint="https://collector:4318/v1/traces")
    assert config.otlp_traces_endpoint == "https://collector:4318/v1/traces"
