"""Prometheus metrics of one server (app), in their own registry."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from orchestrator.cluster_metrics import ClusterMetrics
from orchestrator.outputs import Output
from orchestrator.request_log import EndedRequest, log_request
from orchestrator.routed import RouterNotReady
from orchestrator.tracing import RequestTracer
from workers.engine.messages import SamplingParams

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
_TPOT_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


class Metrics:
    def __init__(self, log_requests: bool = False) -> None:
        self.log_requests = log_requests  # a line per ended request (`orchestrator.request_log`)
        self.tracer: RequestTracer | None = None  # a span per ended request, when set
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds", "Time to first token",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds", "Time between output tokens (after the first)",
            buckets=_TPOT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds", "Request latency, arrival to last token",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.finished = Counter(
            "pdserve_request_finish",
            "Requests ended, by finish reason (stop, length, abort, timeout, error)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.cluster = ClusterMetrics(r)  # the ranks', pools' and router's state

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(
        self,
        outputs: AsyncGenerator[Output, None],
        arrival_s: float,
        api: str = "",
        client: str = "",
        sampling: SamplingParams | None = None,
        trace: Mapping[str, str] | None = None,
        rid: str = "",
    ) -> AsyncGenerator[Output, None]:
        """Pass `outputs` through (closing it when closed), recording TTFT, per-token latency,
        tokens and e2e latency, and at the end a log line with `log_requests` and a span with
        a `tracer` (`api`: the route or `grpc`; `client`: its address; `sampling`: its
        parameters, for the span; `trace`: the caller's trace context; `rid`: the client's id,
        if it gave one). `arrival_s` is the arrival time on `time.perf_counter`'s clock."""
        last_s: float | None = None
        first_s: float | None = None
        ended = False
        last_out: Output | None = None  # its token counts, for a span of a client gone
        refusal: tuple[str, str] | None = None  # (finish, error) of a request not taken

        def ended_request(finish: str, end_s: float, out: Output | None) -> EndedRequest:
            return EndedRequest(
                rid, api, client, finish, arrival_s, end_s, first_s,
                num_prompt_tokens=out.num_prompt_tokens if out else None,
                num_cached_tokens=out.num_cached_tokens if out else None,
                num_output_tokens=out.num_output_tokens if out else None,
                error=out.error if out else None,
                max_new_tokens=sampling.max_new_tokens if sampling else None,
                temperature=sampling.temperature if sampling else None,
                top_p=sampling.top_p if sampling else None,
            )  # fmt: skip

        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    now = time.perf_counter()
                    rid, last_out = out.rid, out
                    n = len(out.token_ids)
                    if n and last_s is None:
                        self.ttft.observe(now - arrival_s)
                        n -= 1  # tokens that came with the first one arrived with no gap
                        first_s = last_s = now
                    if n and last_s is not None:
                        per_token = (now - last_s) / n
                        for _ in range(n):
                            self.tpot.observe(per_token)
                        last_s = now
                    if out.finish_reason is not None:
                        ended = True
                        self.finished.labels(out.finish_reason).inc()
                        self.e2e.observe(now - arrival_s)
                        self.prompt_tokens.inc(out.num_prompt_tokens)
                        self.generation_tokens.inc(out.num_output_tokens)
                        if self.log_requests or self.tracer is not None:
                            req = ended_request(out.finish_reason, now, out)
                            if self.log_requests:
                                log_request(req)
                            self._trace(req, trace)
                    yield out
        except RouterNotReady as e:  # no rank could take it (a 503)
            refusal = ("unavailable", str(e))
            e.logged = True  # type: ignore[attr-defined]  # (the 503's handler logs the others)
            raise
        except ValueError as e:  # a rank refused it (a 400)
            refusal = ("refused", str(e))
            raise
        finally:
            if not ended:  # the client left, or the request was not taken (no rid yet)
                now = time.perf_counter()
                finish, error = refusal if refusal is not None else ("gone", None)
                if self.log_requests:  # (the log line of one gone has no token counts)
                    log_request(
                        EndedRequest(rid, api, client, finish, arrival_s, now, first_s, error=error)
                    )
                if self.tracer is not None:
                    span = ended_request(finish, now, last_out)
                    span.error = error or span.error
                    self._trace(span, trace)

    def not_taken(self, api: str, client: str, error: str) -> None:
        """A request no rank could take, refused before it started (a 503: none up, the
        server draining, `--max-queued-requests`): its log line and span, finish
        `unavailable`."""
        if not self.log_requests and self.tracer is None:
            return
        now = time.perf_counter()
        req = EndedRequest("", api, client, "unavailable", now, now, error=error)
        if self.log_requests:
            log_request(req)
        self._trace(req, None)

    def _trace(self, req: EndedRequest, trace: Mapping[str, str] | None) -> None:
        """`req`'s span, with a tracer (`--otlp-traces-endpoint`)."""
        if self.tracer is None:
            return
        try:
            self.tracer.record(req, trace)
        except Exception as e:  # a span must never fail a request
            logger.warning("tracing: no span for request %s: %s", req.rid, e)
