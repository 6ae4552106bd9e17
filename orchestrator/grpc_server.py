"""The gRPC front end (`proto/pdserve.proto`, package `pdserve.v1`) on `grpc.aio`, in the router
process and on the router's event loop, beside `grpc.health.v1.Health` and server reflection.

Requests go through the same parsing and limits as HTTP `/generate` (`orchestrator.protocol`);
errors map to status codes (see the .proto; `orchestrator.grpc_messages` translates). A
cancelled `Generate` call closes the router's generator, which aborts the request on its ranks
and frees its KV pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.auth import api_key_refusal, bearer, same_secret
from orchestrator.config import ServeConfig, host_port
from orchestrator.front import primary_only
from orchestrator.grpc_messages import (
    call_authorization,
    generate_body,
    pb_logprobs,
    peer_host,
    status_of,
)
from orchestrator.limits import ClientLimiter
from orchestrator.metrics import Metrics
from orchestrator.pools import PoolSet
from orchestrator.protocol import prepare_call, read_generate
from orchestrator.request_fields import RequestError
from orchestrator.routed import DuplicateRequest, RouterNotReady
from orchestrator.router import Router
from orchestrator.sampling_request import choice_params
from orchestrator.scaling import ScaleError, ScaleInProgress, ServerStopping, drain_seconds
from orchestrator.streaming import interleave
from orchestrator.tracing import trace_headers
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from workers.engine.messages import TokenLogprob, short_error

logger = logging.getLogger(__name__)
SERVICE = "pdserve.v1.Generation"


class Undecodable:
    """A request whose bytes are not its message (bad UTF-8 in a string, a truncated field):
    the method refuses it with INVALID_ARGUMENT once the caller is authorized (gRPC's own
    deserializer would end the call with UNKNOWN and a traceback in the log)."""

    def __init__(self, error: str):
        self.error = error


def _tolerant(message: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as e:
            return Undecodable(str(e))

    return parse


def add_generation_service(servicer: Any, server: grpc.aio.Server) -> None:
    """`pb_grpc.add_GenerationServicer_to_server`, with deserializers that hand an
    undecodable request to the method as `Undecodable` rather than fail the call."""
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    handlers = {}
    for method in service.methods:
        make = (
            grpc.unary_stream_rpc_method_handler if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )  # fmt: skip
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {request.error}"
        )


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(
        self,
        router: Router,
        config: ServeConfig,
        eplb: Any = None,
        limiter: ClientLimiter | None = None,
        metrics: Metrics | None = None,
        pools: PoolSet | None = None,
        autoscaler: Any = None,
    ):
        self.router = router
        self.config = config
        self.eplb = eplb
        self.pools = pools  # the server's pool instances (None: it was given its ranks)
        self.autoscaler = autoscaler  # `orchestrator.autoscale.Autoscaler`, when one runs
        self.limiter = limiter or ClientLimiter(config.max_concurrent_requests_per_client)
        self.metrics = metrics or Metrics()  # the HTTP app's, so /metrics counts gRPC too

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        await self._check_api_key(context)
        await refuse_undecodable(request, context)
        arrival = time.perf_counter()
        try:
            call = await read_generate(self.router, generate_body(request))
            if call.is_batch or len(call.calls) != 1:
                raise RequestError("text: one prompt per call", "text")
            ids, sampling = prepare_call(
                self.router, self.config, call.calls[0], call.logprob_start_len
            )
            peer = peer_host(context.peer())
            self.limiter.check_call(call.n)
            slots = self.router.admit(call.n)
            trace = trace_headers(dict(context.invocation_metadata() or ()))
            streams = [
                self.limiter.wrap(
                    self.metrics.track(
                        self.router.generate(
                            ids, choice_params(sampling, i), call.calls[0].sampling.stop,
                            rid=call.rid, stream=not request.final_only, slot=slot,
                        ),
                        arrival, "grpc", peer, sampling, trace,
                    ),
                    peer,
                )
                for i, slot in enumerate(slots)
            ]  # fmt: skip
        except RequestError as e:
            await context.abort(status_of(e), e.message)
        except RouterNotReady as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        output_ids: list[list[int]] = [[] for _ in streams]
        texts: list[list[str]] = [[] for _ in streams]
        logprobs: list[list[TokenLogprob]] = [[] for _ in streams]
        prompt_logprobs: list[list[TokenLogprob | None]] = [[] for _ in streams]
        start = call.logprob_start_len
        finished = 0
        try:
            async with contextlib.aclosing(interleave(streams)) as outs:
                async for index, out in outs:
                    if out.finish_reason == "abort":  # the Abort RPC (or the HTTP side)
                        await context.abort(grpc.StatusCode.CANCELLED, "aborted")
                    if out.finish_reason == "timeout":
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, out.error)
                    if out.finish_reason == "error":
                        await context.abort(
                            grpc.StatusCode.INTERNAL, out.error or "the request failed"
                        )
                    output_ids[index] += out.token_ids
                    texts[index].append(out.text)
                    logprobs[index] += out.logprobs or ()
                    prompt_logprobs[index] = out.prompt_logprobs or prompt_logprobs[index]
                    if (out.text or out.token_ids) and not request.final_only:
                        yield pb.GenerateResponse(
                            chunk=pb.GenerateChunk(
                                token_ids=out.token_ids,
                                text=out.text,
                                logprobs=pb_logprobs(out.logprobs),
                                index=index,
                            )
                        )
                    if out.finish_reason is not None:
                        scored = prompt_logprobs[index][start:] if start >= 0 else []
                        nan = TokenLogprob(float("nan"))
                        yield pb.GenerateResponse(
                            final=pb.GenerateFinal(
                                rid=out.rid,
                                finish_reason=out.finish_reason,
                                matched_stop=""
                                if out.matched_stop is None
                                else str(out.matched_stop),
                                usage=pb.Usage(
                                    prompt_tokens=out.num_prompt_tokens,
                                    completion_tokens=out.num_output_tokens,
                                    cached_tokens=out.num_cached_tokens,
                                    spec_verify_ct=out.num_verify_steps,
                                ),
                                output_ids=output_ids[index],
                                text="".join(texts[index]),
                                logprobs=pb_logprobs(logprobs[index]),
                                index=index,
                                prompt_logprobs=pb_logprobs([lp or nan for lp in scored]),
                            )
                        )
                        finished += 1
                        if finished == len(streams):
                            return
        except ValueError as e:
            duplicate = isinstance(e, DuplicateRequest)
            code = grpc.StatusCode.ALREADY_EXISTS if duplicate else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(e))
        except RouterNotReady as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def _check_api_key(self, context: grpc.aio.ServicerContext) -> None:
        """With `--api-key`: the call's `authorization` metadata must carry it."""
        if self.config.api_key is None:
            return
        refusal = api_key_refusal(call_authorization(context), self.config.api_key)
        if refusal is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

    async def Abort(  # noqa: N802
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        await self._check_api_key(context)
        await refuse_undecodable(request, context)
        if not request.rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rid: required")
        return pb.AbortResponse(found=await self.router.abort(request.rid))

    async def _admin(self, context: grpc.aio.ServicerContext, experts: bool = True) -> None:
        """Abort unless the call carries the admin token (and, with `experts`, unless there
        is an expert-parallel pool)."""
        token = self.config.admin_token
        if token is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "admin calls are disabled: start the server with --admin-token",
            )
        given = bearer(call_authorization(context))
        if given is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing admin token: send metadata 'authorization: Bearer <token>'",
            )
        assert token is not None and given is not None
        if not same_secret(given, token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong admin token")
        if experts and self.config.front is not None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, primary_only(self.config.front)
            )
        if experts and self.eplb is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "no expert-parallel pool to rebalance"
            )

    async def _pool_set(self, context: grpc.aio.ServicerContext) -> PoolSet:
        await self._admin(context, experts=False)
        if self.config.front is not None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, primary_only(self.config.front)
            )
        if self.pools is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server was given its ranks and does not start or stop pool instances",
            )
        assert self.pools is not None
        return self.pools

    def _instances(self) -> list[pb.PoolInstance]:
        assert self.pools is not None
        return [pb.PoolInstance(**p) for p in self.pools.describe(self.router.requests_on)]

    async def Pools(  # noqa: N802
        self, request: pb.PoolsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PoolsResponse:
        pools = await self._pool_set(context)
        await refuse_undecodable(request, context)
        scaled = self.autoscaler.describe() if self.autoscaler is not None else {}
        return pb.PoolsResponse(
            pools=self._instances(), scaling=pools.scaling,
            autoscale=[
                pb.AutoscaledRole(
                    role=role, min_instances=a["min"], max_instances=a["max"],
                    instances=a["instances"], utilization=a["utilization"],
                )
                for role, a in scaled.items()
            ],
        )  # fmt: skip

    async def Scale(  # noqa: N802
        self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScaleResponse:
        pools = await self._pool_set(context)
        await refuse_undecodable(request, context)
        try:
            drain_s = drain_seconds(
                request.drain_timeout_s if request.HasField("drain_timeout_s") else None,
                self.config.scale_drain_s,
            )
            report = await pools.scale(
                self.router, self.eplb, dict(request.instances), list(request.remove), drain_s
            )
        except ScaleError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ScaleInProgress as e:
            stopping = isinstance(e, ServerStopping)
            code = grpc.StatusCode.UNAVAILABLE if stopping else grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, str(e))
        return pb.ScaleResponse(
            ok=report.ok, started=report.started, removed=report.removed,
            failed=[pb.ScaleFailure(**f) for f in report.failed],
            requests_resumed=report.requests_resumed, requests_retried=report.requests_retried,
            requests_migrated=report.requests_migrated,
            seconds=report.seconds,
            pools=self._instances(),
        )  # fmt: skip

    async def Rebalance(  # noqa: N802
        self, request: pb.RebalanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RebalanceResponse:
        await self._admin(context)
        await refuse_undecodable(request, context)
        try:
            reports = await self.eplb.rebalance.remote(list(request.pools) or None)
        except Exception as e:
            message = short_error(e)
            code = (
                grpc.StatusCode.FAILED_PRECONDITION
                if "already running" in message
                else grpc.StatusCode.INVALID_ARGUMENT
                if "unknown pools" in message
                else grpc.StatusCode.INTERNAL
            )
            await context.abort(code, message)
        # None (no error, not skipped) is the proto default: leave such fields out, and the
        # fields the proto does not carry.
        fields = pb.PoolReport.DESCRIPTOR.fields_by_name
        return pb.RebalanceResponse(
            pools=[
                pb.PoolReport(**{k: v for k, v in r.items() if v is not None and k in fields})
                for r in reports
            ]
        )

    async def ExpertStats(  # noqa: N802
        self, request: pb.ExpertStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExpertStatsResponse:
        await self._admin(context)
        await refuse_undecodable(request, context)
        pools = await self.eplb.experts.remote()
        return pb.ExpertStatsResponse(
            pools=[
                pb.PoolExperts(
                    pool=name,
                    num_ranks=p["num_ranks"],
                    balancedness=p["balancedness"] or 0.0,
                    num_rebalances=p["num_rebalances"],
                    num_experts_moved=p["num_experts_moved"],
                    phy2log=[pb.Row(values=row) for row in p["phy2log"] or []],
                    load=[pb.Row(values=row) for row in p["load"] or []],
                )
                for name, p in sorted(pools.items())
            ]
        )


class GrpcServer:
    """The gRPC server of one router; `start` and `stop` on the router's event loop."""

    def __init__(
        self,
        router: Router,
        config: ServeConfig,
        eplb: Any = None,
        limiter: ClientLimiter | None = None,
        metrics: Metrics | None = None,
        pools: PoolSet | None = None,
        autoscaler: Any = None,
    ):
        # No SO_REUSEPORT (gRPC's default on Linux): with it a second server bound to a port in
        # use starts without error and the two split the connections between them.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_generation_service(
            GenerationService(router, config, eplb, limiter, metrics, pools, autoscaler),
            self.server,
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        names = (
            pb.DESCRIPTOR.services_by_name["Generation"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server)
        assert config.grpc_port is not None
        self.where = host_port(config.host, config.grpc_port)
        self.tls = config.tls
        self.port = 0  # bound by `start`
        self.serving = False  # what the health service says
        self.router = router

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            await self._health.set(name, status)

    async def start(self) -> None:
        """Bind and serve; RuntimeError naming the address when it cannot be bound."""
        try:
            if self.tls is None:
                self.port = self.server.add_insecure_port(self.where)
            else:
                chain, key = (
                    Path(self.tls.certfile).read_bytes(),
                    Path(self.tls.keyfile).read_bytes(),
                )
                client_cas = self.tls.client_cas
                credentials = grpc.ssl_server_credentials(
                    [(key, chain)],
                    root_certificates=Path(client_cas).read_bytes() if client_cas else None,
                    require_client_auth=client_cas is not None,
                )
                self.port = self.server.add_secure_port(self.where, credentials)
        except RuntimeError:
            self.port = 0
        if not self.port:
            await self.server.stop(None)  # a server never started still holds gRPC's threads
            raise RuntimeError(f"cannot bind gRPC to {self.where} (is the port in use?)")
        await self.server.start()
        await self.set_serving(False)
        self._watch = asyncio.get_running_loop().create_task(self._watch_health())

    async def _watch_health(self) -> None:
        """Health follows the router: SERVING while it takes requests (every rank ready, or
        degraded: a rank down and others serving)."""
        serving: bool | None = None
        while True:
            now = self.router.is_serving
            if now != serving:
                await self.set_serving(now)
                serving = now
            await asyncio.sleep(0.25)

    async def stop(self, grace_s: float = 2.0) -> None:
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
