"""The HTTP front end: `create_app(router)` builds the FastAPI app serving one router, and serves
`POST /generate` (SGLang style) itself.

Its other routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`
(OpenAI style, `orchestrator.openai_routes`), `GET /health`, `GET /metrics` (Prometheus),
`GET /v1/stats` (rank info and stats as JSON) and utilities (`orchestrator.ops_routes`), the
admin routes (`orchestrator.admin`). Bad requests get 400 (413 for a body over the limit) with
`{"error": {"message", "type", "param"}}`; 503 while no rank can serve. A stream ends with
`data: [DONE]`; a failure after the stream started is sent as a `data: {"error": ...}` event.
With `--api-key`, `orchestrator.auth.RequireApiKey` answers 401 to a call without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from orchestrator import request_log
from orchestrator.admin import ADMIN_ROUTES, add_admin_routes
from orchestrator.auth import OPEN_ROUTES, RequireApiKey
from orchestrator.config import ServeConfig
from orchestrator.eplb_watch import EplbWatch
from orchestrator.http_context import HttpContext, client_of, error_status, gather_all, refused
from orchestrator.kv_relief import KVReliefWatch
from orchestrator.limits import ClientLimiter
from orchestrator.metrics import Metrics
from orchestrator.openai_routes import OPENAI_ROUTES, add_openai_routes
from orchestrator.ops_routes import OPS_ROUTES, add_ops_routes
from orchestrator.outputs import Output
from orchestrator.peer_load import PeerLoadWatch
from orchestrator.protocol import (
    GenerateCall,
    GenerateResult,
    prepare_call,
    read_generate,
)
from orchestrator.request_fields import RequestError
from orchestrator.routed import Overloaded, RouterNotReady
from orchestrator.router import Router
from orchestrator.sampling_request import choice_params
from orchestrator.streaming import (
    SSE_DONE,
    ClientDisconnected,
    CountRequests,
    EventStream,
    interleave,
    read_json,
    sse,
    until_disconnect,
)
from orchestrator.tracing import RequestTracer, trace_headers
from workers.engine.grammar import xgrammar_available
from workers.engine.messages import SamplingParams

ROUTES = {"/generate"} | OPENAI_ROUTES | OPS_ROUTES
_CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never received


def create_app(
    router: Router,
    config: ServeConfig | None = None,
    manage_router: bool = True,
    eplb: Any = None,
    pools: Any = None,
    expert_groups: int = 1,
    front: Any = None,
) -> FastAPI:
    """The app serving `router`. With `manage_router`, the app's lifespan starts the router on
    the server's event loop and closes it at shutdown (without shutting the ranks down).
    `eplb`: the EPLB service actor (admin routes, /metrics; resynced after a restart by an
    `EplbWatch`, `expert_groups` being the model's expert groups); `pools`: the `PoolSet` of
    the pool instances the server started (admin scaling); `front`: a front router's
    `FrontWatch` (`orchestrator.front`), run while the app serves."""
    config = config or ServeConfig()
    metrics = Metrics(log_requests=config.log_requests)
    if config.log_requests:
        request_log.enable()
    if config.otlp_traces_endpoint:
        metrics.tracer = RequestTracer(
            config.otlp_traces_endpoint, config.otel_service_name, router.model_name
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await _start(app)
        except Exception as e:  # uvicorn logs it and exits; the launcher reports it
            app.state.startup_error = e
            raise
        try:
            yield
        finally:
            if front is not None:
                await front.stop()
            if app.state.autoscaler is not None:
                await app.state.autoscaler.stop()
            if app.state.eplb_watch is not None:
                await app.state.eplb_watch.stop()
            if app.state.kv_relief is not None:
                await app.state.kv_relief.stop()
            if app.state.peer_load is not None:
                await app.state.peer_load.stop()
            if app.state.grpc_server is not None:
                await app.state.grpc_server.stop()
            if manage_router:
                await router.close()
            if metrics.tracer is not None:
                await asyncio.to_thread(metrics.tracer.shutdown)

    async def _start(app: FastAPI) -> None:
        if manage_router:
            await router.start()
        # Structured output checks each constraint with xgrammar, whose import (torch,
        # transformers) takes seconds: done now, off the event loop, not on the first request.
        threading.Thread(target=xgrammar_available, name="import-xgrammar", daemon=True).start()
        if front is not None:
            front.start()
        if pools is not None and config.replace_dead_instances:
            pools.watch_dead_ranks(router, eplb)
        if eplb is not None:
            app.state.eplb_watch = EplbWatch(eplb, router, expert_groups)
            app.state.eplb_watch.start()
        if front is not None or config.deployment is not None:  # other routers may serve
            app.state.peer_load = PeerLoadWatch(router.ranks)
            app.state.peer_load.start()
        if config.kv_migration and config.kv_pressure_interval_s > 0:
            app.state.kv_relief = KVReliefWatch(
                router, config.kv_pressure_interval_s,
                busy=lambda: pools is not None and bool(pools.scaling),
            )  # fmt: skip
            app.state.kv_relief.start()
        if pools is not None and config.autoscale_bounds():
            from orchestrator.autoscale import AutoscaleConfig, Autoscaler

            app.state.autoscaler = Autoscaler(
                pools, router, eplb,
                AutoscaleConfig(
                    config.autoscale_bounds(), config.autoscale_target,
                    config.autoscale_up_after_s, config.autoscale_down_after_s,
                    config.start_counts(),
                ),
                config.engine.chunked_prefill_size, config.scale_drain_s,
            )  # fmt: skip
            app.state.autoscaler.start()
        if config.grpc_port is not None:
            from orchestrator.grpc_server import GrpcServer

            app.state.grpc_server = GrpcServer(
                router, config, eplb, app.state.limiter, metrics, pools, app.state.autoscaler
            )
            await app.state.grpc_server.start()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.router = router
    app.state.grpc_server = None
    app.state.autoscaler = None
    app.state.eplb_watch = None
    app.state.kv_relief = None
    app.state.peer_load = None
    app.state.startup_error = None
    app.state.metrics = metrics
    if config.api_key is not None:  # inside CountRequests: refusals are counted too
        app.add_middleware(RequireApiKey, api_key=config.api_key, exempt=OPEN_ROUTES | ADMIN_ROUTES)
    app.add_middleware(
        CountRequests,
        routes=ROUTES | ADMIN_ROUTES,
        count=lambda route, status: metrics.requests.labels(route, str(status)).inc(),
    )

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RouterNotReady)
    async def _not_ready(request: Request, e: RouterNotReady) -> JSONResponse:
        if not getattr(e, "logged", False):  # (one that got as far as a rank was logged)
            metrics.not_taken(request.url.path, client_of(request), str(e))
        if isinstance(e, Overloaded):
            error = RequestError(str(e), None, 503, "unavailable", code="overloaded")
            return JSONResponse(error.body(), 503, headers={"Retry-After": "1"})
        return JSONResponse(RequestError(str(e), None, 503, "unavailable").body(), 503)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=_CLIENT_CLOSED)

    limiter = ClientLimiter(config.max_concurrent_requests_per_client)
    app.state.limiter = limiter
    ctx = HttpContext(router, config, metrics, limiter)

    def prepare(call: GenerateCall, logprob_start_len: int) -> tuple[list[int], SamplingParams]:
        return prepare_call(router, config, call, logprob_start_len)

    # ---- SGLang style -----------------------------------------------------------------------

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        arrival = time.perf_counter()
        raw = await read_json(request, config.max_request_body_bytes)
        body = await read_generate(router, raw)
        # One request per prompt and choice, prompt-major (as SGLang lists them).
        jobs = [
            (ids, choice_params(sampling, j), c.sampling.stop)
            for c in body.calls
            for ids, sampling in [prepare(c, body.logprob_start_len)]
            for j in range(body.n)
        ]
        rids = [body.rid or uuid.uuid4().hex for _ in jobs]
        token_text = router.tokenizer.token_text if body.logprob_text else None
        ctx.limiter.check_call(len(jobs))
        slots = router.admit(len(jobs))
        trace = trace_headers(request.headers)

        async def one(i: int) -> GenerateResult:
            ids, sampling, stop = jobs[i]
            result = GenerateResult(rids[i], "", [], len(ids), 0, None, 0.0)
            outputs = ctx.run(
                ids, sampling, stop, client_of(request), rids[i], arrival, stream=False,
                slot=slots[i], trace=trace,
            )  # fmt: skip
            async with contextlib.aclosing(outputs) as outs:
                async for out in outs:
                    if out.finish_reason in ("error", "timeout"):
                        raise error_status(out)
                    result = result.add(out, time.perf_counter() - arrival)
            return result

        if body.stream:  # one prompt, `n` choices
            streams = [
                ctx.run(
                    ids, sampling, stop, client_of(request), rid, arrival, slot=slot, trace=trace
                )  # fmt: skip
                for (ids, sampling, stop), rid, slot in zip(jobs, rids, slots, strict=True)
            ]
            prompt = (jobs[0][0], body.logprob_start_len) if body.logprob_start_len >= 0 else None
            events = _generate_events(
                streams, rids, len(jobs[0][0]), arrival, config.incremental_streaming_output,
                token_text, prompt,
            )  # fmt: skip
            return EventStream(events, config.sse_keepalive_s)
        try:
            results = await until_disconnect(
                request, gather_all([one(i) for i in range(len(rids))])
            )
        except ValueError as e:
            raise refused(e, body.calls[0].prompt_field) from None
        start = body.logprob_start_len
        payload = [
            r.json(token_text, (job[0], start) if start >= 0 else None)
            for r, job in zip(results, jobs, strict=True)
        ]
        return JSONResponse(payload if body.is_batch or body.n > 1 else payload[0])

    add_openai_routes(app, ctx)
    add_ops_routes(app, ctx, eplb, pools)
    add_admin_routes(
        app, eplb, config.admin_token, router, pools, config.scale_drain_s, config.front
    )
    return app


async def _generate_events(
    streams: list[AsyncGenerator[Output, None]],
    rids: list[str],
    num_prompt_tokens: int,
    arrival: float,
    incremental: bool = False,
    token_text: Callable[[int], str] | None = None,
    prompt: tuple[list[int], int] | None = None,
) -> AsyncGenerator[str, None]:
    """`/generate` stream: every event carries the cumulative `text` and `output_ids`, or with
    `incremental` only what is new since the previous event (`meta_info` counts stay totals).
    With several streams (`n` > 1) their events interleave, each with its `index`."""
    results = [GenerateResult(rid, "", [], num_prompt_tokens, 0, None, 0.0) for rid in rids]
    async with contextlib.aclosing(interleave(streams)) as outs:
        try:
            async for index, out in outs:
                if out.finish_reason in ("error", "timeout"):
                    yield sse(error_status(out).body())
                    break
                latency = time.perf_counter() - arrival
                result = results[index]
                result = result.step(out, latency) if incremental else result.add(out, latency)
                results[index] = result
                if out.text or out.token_ids or out.finish_reason is not None:
                    event = result.json(token_text, prompt)
                    if len(streams) > 1:
                        event["index"] = index
                    yield sse(event)
        except ValueError as e:
            yield sse(refused(e, "input_ids").body())
        except RouterNotReady as e:
            yield sse(RequestError(str(e), None, 503, "unavailable").body())
    yield SSE_DONE
