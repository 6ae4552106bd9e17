"""`pdserve serve --otlp-traces-endpoint URL`: a span per request, exported over OTLP/HTTP.

Each request that ends (or whose client leaves) becomes one span, made when it ends with the
times it had: from its arrival to its end, an event at its first token. A request that comes
with a W3C `traceparent` header (HTTP) or metadata key (gRPC) joins that trace as a child of
the caller's span, so a client's own trace shows the time spent here. The attributes follow
OpenTelemetry's generative-AI conventions (`gen_ai.*`: operation, model, response id, finish
reason, input and output tokens, max tokens, temperature, top-p) plus pdserve's own
(`pdserve.*`: the route, the client address, prompt tokens served from the prefix cache, time
to first token, and the error of a failed request). A request ended by an error or a timeout
has the span status ERROR. Prompts and outputs are never recorded.

Spans leave from a batching thread of the OpenTelemetry SDK (`BatchSpanProcessor`), never
from the event loop; a collector that is down loses spans (the SDK logs it), not requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from orchestrator.request_log import EndedRequest

logger = logging.getLogger(__name__)

# Headers (HTTP) and metadata keys (gRPC) that carry a caller's trace context.
TRACE_HEADERS = ("traceparent", "tracestate")


def trace_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The trace-context entries of a request's headers or metadata (None without any)."""
    found = {k: v for k in TRACE_HEADERS if (v := headers.get(k))}
    return found or None


class RequestTracer:
    """Makes and exports the request spans (see the module doc)."""

    def __init__(
        self,
        endpoint: str,
        service_name: str = "pdserve",
        model: str = "",
        schedule_delay_s: float = 1.0,
        exporter: Any = None,
    ):
        """`exporter`: the span exporter (default: OTLP over HTTP to `endpoint`)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=5)
        self.model = model
        # A provider of its own, not the process's global one: tests start several servers.
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_s * 1000)
        )
        self.tracer = self.provider.get_tracer("pdserve")
        self.propagator = TraceContextTextMapPropagator()

    def record(self, req: EndedRequest, headers: Mapping[str, str] | None = None) -> None:
        """Make `req`'s span (a child of the trace in `headers` when there is one)."""
        # perf_counter times to the wall clock the span needs, through one reading of each.
        wall_ns, perf_s = time.time_ns(), time.perf_counter()

        def at(perf: float) -> int:
            return wall_ns - int((perf_s - perf) * 1e9)

        parent = self.propagator.extract(dict(headers)) if headers else None
        operation = "chat" if req.api.endswith("chat/completions") else "text_completion"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.system": "pdserve",
            "gen_ai.request.model": self.model,
            "gen_ai.response.id": req.rid,
            "gen_ai.response.finish_reasons": [req.finish],
            "pdserve.api": req.api,
            "pdserve.client": req.client,
        }
        optional = {
            "gen_ai.usage.input_tokens": req.num_prompt_tokens,
            "gen_ai.usage.output_tokens": req.num_output_tokens,
            "gen_ai.request.max_tokens": req.max_new_tokens,
            "gen_ai.request.temperature": req.temperature,
            "gen_ai.request.top_p": req.top_p,
            "pdserve.cached_tokens": req.num_cached_tokens,
            "pdserve.ttft_s": req.ttft_s,
            "pdserve.error": req.error,
        }  # fmt: skip
        attributes.update({k: v for k, v in optional.items() if v is not None})
        span = self.tracer.start_span(
            f"{operation} {self.model}".strip(), context=parent, kind=SpanKind.SERVER,
            attributes=attributes, start_time=at(req.arrival_s),
        )  # fmt: skip
        if req.first_token_s is not None:
            span.add_event("first_token", timestamp=at(req.first_token_s))
        if req.finish in ("error", "timeout", "refused", "unavailable"):
            span.set_status(Status(StatusCode.ERROR, req.error or req.finish))
        span.end(end_time=at(req.end_s))

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Export what is left and stop — for `timeout_s` at most: a collector that is down
        or slow must not hold up the server's stop (the exporter's own timeout and retries
        are longer)."""
        done = threading.Event()

        def stop() -> None:
            try:
                self.provider.shutdown()
            except Exception as e:
                logger.warning("tracing: the last spans were not exported: %s", e)
            done.set()

        threading.Thread(target=stop, name="tracing-shutdown", daemon=True).start()
        if not done.wait(timeout_s):
            logger.warning("tracing: the collector did not take the last spans within %g s; "
                           "stopping without them", timeout_s)  # fmt: skip
