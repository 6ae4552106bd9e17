"""The HTTP front end: `create_app(router)` builds the FastAPI app serving one router.

Routes: `POST /generate` (SGLang style), `POST /v1/completions`, `POST /v1/chat/completions`,
`GET /v1/models` (OpenAI style), `GET /health`, `GET /metrics` (Prometheus), `GET /v1/stats`
(rank info and stats as JSON). Bad requests get 400 (413 for a body over the limit) with
`{"error": {"message", "type", "param"}}`; 503 while no rank can serve. A stream ends with
`data: [DONE]`; a failure after the stream started is sent as a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import asdict, replace
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.admin import ADMIN_ROUTES, add_admin_routes
from orchestrator.chat_output import (
    ChatDelta,
    ChatOutputParser,
    ChatOutputSpec,
    read_chat_output,
)
from orchestrator.config import ServeConfig
from orchestrator.limits import ClientLimiter
from orchestrator.metrics import Metrics
from orchestrator.openai_api import (
    Choice,
    CompletionBody,
    ResponseBuilder,
    best_choices,
    openai_finish_reason,
    parse_chat,
    parse_completion,
)
from orchestrator.protocol import (
    GenerateCall,
    GenerateResult,
    check_prompt_len,
    parse_generate,
    prepare_call,
)
from orchestrator.reasoning import after_reasoning, opens_reasoning, template_reasons
from orchestrator.request_fields import Fields, RequestError
from orchestrator.router import Output, Router, RouterNotReady
from orchestrator.sampling_request import choice_params, resolve_sampling
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
from orchestrator.tokenizer import ChatTemplateError
from orchestrator.tool_parser import FORMATS, MARKERS, ToolCallFormat, detect_format
from orchestrator.tools import chat_prompt
from workers.engine.grammar import xgrammar_available
from workers.engine.messages import SamplingParams, TokenLogprob

ROUTES = {
    "/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/stats",
    "/health", "/metrics", "/abort_request", "/tokenize", "/detokenize",
}  # fmt: skip
T = TypeVar("T")
_CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never received


def client_of(request: Request) -> str:
    """The client's address, the key of the per-client limits."""
    return request.client.host if request.client is not None else "unknown"


def _error_status(out: Output) -> RequestError:
    """The error a request that ended with "error" or "abort" (timeout) is answered with."""
    if out.finish_reason == "abort":
        return RequestError(out.error or "the request was aborted", None, 504, "timeout_error")
    return RequestError(out.error or "the engine failed", None, 500, "server_error")


def _refused(e: ValueError, default_param: str) -> RequestError:
    """A rank's refusal ("field: problem") as a 400 naming that field."""
    message = str(e)
    head = message.split(":", 1)[0]
    return RequestError(message, head if head.isidentifier() else default_param)


def create_app(
    router: Router,
    config: ServeConfig | None = None,
    manage_router: bool = True,
    eplb: Any = None,
) -> FastAPI:
    """The app serving `router`. With `manage_router`, the app's lifespan starts the router on
    the server's event loop and closes it at shutdown (without shutting the ranks down).
    `eplb`: the EPLB service actor (admin routes, /metrics)."""
    config = config or ServeConfig()
    metrics = Metrics()

    @functools.cache
    def tool_format() -> ToolCallFormat:
        if config.tool_call_parser != "auto":
            return FORMATS[config.tool_call_parser]
        return detect_format(router.tokenizer.chat_template)

    @functools.cache
    def splits_reasoning() -> bool:
        if config.reasoning_parser == "auto":
            return template_reasons(router.tokenizer.chat_template)
        return config.reasoning_parser == "deepseek_r1"

    @functools.cache
    def marker_ids() -> dict[str, int]:
        return router.tokenizer.marker_ids(MARKERS)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_router:
            await router.start()
        # Structured output checks each constraint with xgrammar, whose import (torch,
        # transformers) takes seconds: done now, off the event loop, not on the first request.
        threading.Thread(target=xgrammar_available, name="import-xgrammar", daemon=True).start()
        grpc_server = None
        if config.grpc_port is not None:
            from orchestrator.grpc_server import GrpcServer

            grpc_server = GrpcServer(router, config, eplb, app.state.limiter)
            await grpc_server.start()
            app.state.grpc_port = grpc_server.port
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            if manage_router:
                await router.close()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.router = router
    app.state.grpc_port = None
    app.state.metrics = metrics
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
        return JSONResponse(RequestError(str(e), None, 503, "unavailable").body(), 503)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=_CLIENT_CLOSED)

    limiter = ClientLimiter(config.max_concurrent_requests_per_client)
    app.state.limiter = limiter

    def run(
        ids: list[int],
        sampling: SamplingParams,
        stop: tuple[str, ...],
        client: str,
        rid: str | None = None,
        arrival_s: float | None = None,
        stream: bool = True,
    ) -> AsyncGenerator[Output, None]:
        """The request's outputs; takes one of `client`'s slots (429 when none is left).
        `stream=False`: the caller uses only the whole output (see `Router.generate`)."""
        arrival = time.perf_counter() if arrival_s is None else arrival_s
        generated = router.generate(ids, sampling, stop, rid=rid, stream=stream)
        outputs = metrics.track(generated, arrival)
        return limiter.wrap(outputs, client)

    def prepare(call: GenerateCall) -> tuple[list[int], SamplingParams]:
        return prepare_call(router, config, call)

    # ---- SGLang style -----------------------------------------------------------------------

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        arrival = time.perf_counter()
        body = parse_generate(await read_json(request, config.max_request_body_bytes))
        # One request per prompt and choice, prompt-major (as SGLang lists them).
        jobs = [
            (ids, choice_params(sampling, j), c.sampling.stop)
            for c in body.calls
            for ids, sampling in [prepare(c)]
            for j in range(body.n)
        ]
        rids = [body.rid or uuid.uuid4().hex for _ in jobs]
        token_text = router.tokenizer.token_text if body.logprob_text else None

        async def one(i: int) -> GenerateResult:
            ids, sampling, stop = jobs[i]
            result = GenerateResult(rids[i], "", [], len(ids), 0, None, 0.0)
            outputs = run(ids, sampling, stop, client_of(request), rids[i], arrival, stream=False)
            async with contextlib.aclosing(outputs) as outs:
                async for out in outs:
                    if out.finish_reason in ("error", "abort"):
                        raise _error_status(out)
                    result = result.add(out, time.perf_counter() - arrival)
            return result

        if body.stream:  # one prompt, `n` choices
            streams = [
                run(ids, sampling, stop, client_of(request), rid, arrival)
                for (ids, sampling, stop), rid in zip(jobs, rids, strict=True)
            ]
            prompt = (jobs[0][0], body.logprob_start_len) if body.logprob_start_len >= 0 else None
            events = _generate_events(
                streams, rids, len(jobs[0][0]), arrival, config.incremental_streaming_output,
                token_text, prompt,
            )  # fmt: skip
            return EventStream(events)
        try:
            results = await until_disconnect(request, _all([one(i) for i in range(len(rids))]))
        except ValueError as e:
            raise _refused(e, body.calls[0].prompt_field) from None
        start = body.logprob_start_len
        payload = [
            r.json(token_text, (job[0], start) if start >= 0 else None)
            for r, job in zip(results, jobs, strict=True)
        ]
        return JSONResponse(payload if body.is_batch or body.n > 1 else payload[0])

    # ---- OpenAI style -------------------------------------------------------------------------

    async def openai(request: Request, chat: bool) -> Response:
        arrival = time.perf_counter()
        raw = await read_json(request, config.max_request_body_bytes)
        req = parse_chat(raw, tool_format(), marker_ids()) if chat else parse_completion(raw)
        # (ids, text) of each prompt; text only for an echo.
        prompts: list[tuple[list[int], str]] = []
        spec = ChatOutputSpec()  # how a chat's answer is read (completions: as it is)
        if req.messages is not None:
            try:
                text = chat_prompt(
                    router.tokenizer, req.messages, req.tools, tool_format(),
                    extra=req.template_kwargs,
                )  # fmt: skip
            except ChatTemplateError as e:
                raise RequestError(f"messages: {e}", "messages") from None
            opened = opens_reasoning(text)
            reasoning = splits_reasoning() and req.separate_reasoning
            spec = ChatOutputSpec(
                tool_format() if req.calls_tools else None,
                req.tools.parallel if req.tools is not None else True,
                reasoning, reasoning and opened,
            )  # fmt: skip
            constraint = req.sampling.constraint
            if opened and constraint is not None:  # the model thinks first, free
                req = replace(
                    req, sampling=replace(req.sampling, constraint=after_reasoning(constraint))
                )
            prompts.append((router.tokenizer.encode(text, add_special_tokens=False), text))
        for p in req.prompts:
            if isinstance(p, str):
                prompts.append((router.tokenizer.encode(p), p))
            else:
                prompts.append((p, router.tokenizer.decode(p) if req.echo else ""))
        jobs = []  # (ids, sampling, echo) per choice, prompt-major
        for ids, text in prompts:
            check_prompt_len(ids, config, req.prompt_field)
            sampling = resolve_sampling(
                ids, req.sampling, router.limits, config.default_max_new_tokens, req.prompt_field
            )
            echo = (ids, text) if req.echo else None
            if req.candidates > req.n:  # the best are picked by their logprobs
                sampling = replace(sampling, logprobs=True)
            jobs += [(ids, choice_params(sampling, i), echo) for i in range(req.candidates)]
        token_text = router.tokenizer.token_text if req.sampling.logprobs else None
        builder = ResponseBuilder(chat, req.model or router.model_name, token_text)
        streams = [
            run(
                ids, sampling, req.sampling.stop, client_of(request), arrival_s=arrival,
                stream=req.stream,
            )
            for ids, sampling, _ in jobs
        ]  # fmt: skip
        echoes = [echo for _, _, echo in jobs]
        if req.stream:
            return EventStream(_openai_events(streams, builder, req, echoes, spec))

        async def collect(
            outputs: AsyncGenerator[Output, None], echo: tuple[list[int], str] | None
        ) -> Choice:
            parts: list[str] = [echo[1]] if echo is not None else []
            token_ids: list[int] = list(echo[0]) if echo is not None else []
            logprobs: list[TokenLogprob | None] = []
            total = 0.0  # the output tokens' logprobs
            async with contextlib.aclosing(outputs) as outs:
                async for out in outs:
                    if out.prompt_logprobs is not None and echo is not None:
                        logprobs[:0] = out.prompt_logprobs
                    parts.append(out.text)
                    token_ids += out.token_ids
                    logprobs += out.logprobs or ()
                    total += sum(lp.logprob for lp in out.logprobs or ())
                    if out.finish_reason is not None:
                        if openai_finish_reason(out) is None:
                            raise _error_status(out)
                        text = "".join(parts)
                        score = total / max(1, out.num_output_tokens)
                        if spec.plain:
                            return Choice(text, out, token_ids, logprobs, score=score)
                        thought, content, calls = read_chat_output(spec, text)
                        return Choice(content, out, token_ids, logprobs, calls, thought, score)
            raise RuntimeError("the request ended without a finish reason")

        try:
            choices = await until_disconnect(
                request, _all([collect(s, e) for s, e in zip(streams, echoes, strict=True)])
            )
        except ValueError as e:
            raise _refused(e, req.prompt_field) from None
        generated = sum(c.finish.num_output_tokens for c in choices)
        choices = best_choices(choices, req.candidates, req.n)
        return JSONResponse(builder.response(choices, req.n, generated))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await openai(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": router.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
        }  # fmt: skip
        if router.is_ready:
            card["max_model_len"] = router.limits.max_context_len
        return {"object": "list", "data": [card]}

    # ---- operations ---------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if router.is_ready:
            return JSONResponse({"status": "ok"})
        if router.draining:
            detail = f"shutting down; {router.num_in_flight} request(s) in flight"
            return JSONResponse({"status": "draining", "detail": detail}, status_code=503)
        errors = [e for e in router.rank_errors if e]
        status = {"status": "failed", "detail": errors} if errors else {"status": "loading"}
        return JSONResponse(status, status_code=503)

    add_admin_routes(app, eplb, config.admin_token, router)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.set_rank_stats(await router.stats())
        metrics.set_router_stats(router.num_retries, router.num_rank_failures, router.draining)
        if eplb is not None:
            with contextlib.suppress(Exception):
                metrics.set_eplb_stats(await asyncio.wait_for(eplb.stats.remote(), 5))
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- utilities ---------------------------------------------------------------------------

    @app.post("/abort_request")
    async def abort_request(request: Request) -> JSONResponse:
        """SGLang's: abort a request in flight by `rid`; `found` says whether there was one."""
        f = Fields(await read_json(request, config.max_request_body_bytes))
        rid = f.get_str("rid")
        if not rid:
            raise RequestError("rid: required", "rid")
        return JSONResponse({"rid": rid, "found": await router.abort(rid)})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """vLLM's: `prompt` (text) or `messages` (through the chat template, with `tools` and
        `chat_template_kwargs`) → token ids."""
        body = await read_json(request, config.max_request_body_bytes)
        f = Fields(body)
        if f.has("messages"):
            keys = ("messages", "tools", "chat_template_kwargs")
            chat = parse_chat({k: body.get(k) for k in keys})
            assert chat.messages is not None
            try:
                text = chat_prompt(
                    router.tokenizer, chat.messages, chat.tools, tool_format(),
                    f.get_bool("add_generation_prompt", True), chat.template_kwargs,
                )  # fmt: skip
            except ChatTemplateError as e:
                raise RequestError(f"messages: {e}", "messages") from None
            ids = router.tokenizer.encode(text, add_special_tokens=False)
        else:
            prompt = f.get_str("prompt")
            if prompt is None:
                raise RequestError("prompt: a prompt (or messages) is required", "prompt")
            ids = router.tokenizer.encode(prompt, f.get_bool("add_special_tokens", True))
        limits = router.limits
        return JSONResponse(
            {"tokens": ids, "count": len(ids), "max_model_len": limits.max_context_len}
        )

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        """vLLM's: `tokens` (ids) → `prompt` (text, special tokens kept)."""
        f = Fields(await read_json(request, config.max_request_body_bytes))
        ids = f.token_ids("tokens")
        if ids is None:
            raise RequestError("tokens: a list of token ids is required", "tokens")
        vocab = router.limits.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"tokens: {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return JSONResponse({"prompt": router.tokenizer.decode(ids, skip_special_tokens=False)})

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        rank_stats = await router.stats()
        ranks = []
        for i, (info, st) in enumerate(zip(router.infos, rank_stats, strict=True)):
            entry: dict[str, Any] = {"rank": i, "ready": info is not None and st is not None}
            entry["error"] = router.rank_errors[i]
            entry["info"] = asdict(info) if info is not None else None
            entry["stats"] = {**asdict(st), "num_pages_used": st.num_pages_used} if st else None
            ranks.append(entry)
        return {
            "model": router.model_name,
            "num_in_flight": router.num_in_flight,
            "draining": router.draining,
            "num_retries": router.num_retries,
            "num_rank_failures": router.num_rank_failures,
            "ranks": ranks,
        }

    return app


async def _all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `coros` concurrently; if one fails (or this is cancelled), cancel the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


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
                if out.finish_reason in ("error", "abort"):
                    yield sse(_error_status(out).body())
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
            yield sse(_refused(e, "input_ids").body())
        except RouterNotReady as e:
            yield sse(RequestError(str(e), None, 503, "unavailable").body())
    yield SSE_DONE


async def _openai_events(
    streams: list[AsyncGenerator[Output, None]],
    builder: ResponseBuilder,
    req: CompletionBody,
    echoes: list[tuple[list[int], str] | None] | None = None,
    spec: ChatOutputSpec | None = None,
) -> AsyncGenerator[str, None]:
    """OpenAI stream: a role chunk per choice (chat), text-delta chunks, a chunk with
    `finish_reason` per choice (the choices of `n` > 1 and of a batch of prompts interleave,
    each chunk with its `index`), the usage chunk when `stream_options.include_usage`, then
    `[DONE]`. `echoes` (per choice, its prompt's ids and text): each choice's first chunk is
    its prompt. A chat with tools or reasoning (`spec`): each choice's text goes through a
    `ChatOutputParser`, its chunks carry `reasoning_content`, content and `tool_calls`
    deltas."""
    echoed: set[int] = set()
    parsers: list[ChatOutputParser] | None = None
    if spec is not None and not spec.plain:
        parsers = [ChatOutputParser(spec) for _ in streams]
    if builder.chat:
        for index in range(len(streams)):
            yield sse(builder.chunk("", role=True, index=index))
    n = req.n
    completion_tokens = [0] * len(streams)
    prompt_tokens = [0] * (len(streams) // n)  # per prompt (its choices are n in a row)
    cached_tokens = [0] * (len(streams) // n)
    async with contextlib.aclosing(interleave(streams)) as outs:
        try:
            async for index, out in outs:
                echo = echoes[index] if echoes else None
                if echo is not None and index not in echoed and out.finish_reason != "error":
                    echoed.add(index)  # the prompt first, with its logprobs when asked
                    ids, text = echo
                    yield sse(builder.chunk(text, index=index, token_ids=ids,
                                            token_logprobs=out.prompt_logprobs))  # fmt: skip
                lps = out.token_ids, out.logprobs
                parts = ChatDelta("", out.text, [])
                if parsers is not None:
                    parts = parsers[index].feed(out.text, final=out.finish_reason is not None)
                thought, text, calls = parts
                if out.finish_reason is None:
                    if any(parts) or (out.logprobs and builder.token_text is not None):
                        yield sse(builder.chunk(text, index=index, token_ids=lps[0],
                                                token_logprobs=lps[1], tool_calls=calls,
                                                reasoning=thought))  # fmt: skip
                    continue
                called = parsers is not None and parsers[index].called
                finish = openai_finish_reason(out, called)
                if finish is None:
                    yield sse(_error_status(out).body())
                    break
                yield sse(builder.chunk(text, finish, index=index, token_ids=lps[0],
                                        token_logprobs=lps[1], tool_calls=calls,
                                        reasoning=thought))  # fmt: skip
                prompt_tokens[index // n] = out.num_prompt_tokens
                cached_tokens[index // n] = max(cached_tokens[index // n], out.num_cached_tokens)
                completion_tokens[index] = out.num_output_tokens
            else:
                if req.include_usage:
                    usage = builder.usage(
                        sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
                    )
                    yield sse(builder.chunk(None, usage=usage))
        except ValueError as e:
            yield sse(_refused(e, req.prompt_field).body())
        except RouterNotReady as e:
            yield sse(RequestError(str(e), None, 503, "unavailable").body())
    yield SSE_DONE
