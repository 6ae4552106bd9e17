"""The OpenAI-style routes: `POST /v1/completions`, `POST /v1/chat/completions` (whole or
streamed) and `GET /v1/models`. Bodies are read by `orchestrator.openai_request`, answers built by
`orchestrator.openai_response`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from orchestrator.chat_output import (
    ChatDelta,
    ChatOutputParser,
    ChatOutputSpec,
    read_chat_output,
)
from orchestrator.http_context import HttpContext, client_of, error_status, gather_all, refused
from orchestrator.openai_request import CompletionBody, parse_chat, parse_completion
from orchestrator.openai_response import (
    Choice,
    ResponseBuilder,
    best_choices,
    openai_finish_reason,
)
from orchestrator.outputs import Output
from orchestrator.protocol import check_prompt_len, encode_all_off_loop, encode_off_loop
from orchestrator.reasoning import after_reasoning, opens_reasoning
from orchestrator.request_fields import RequestError
from orchestrator.routed import RouterNotReady
from orchestrator.sampling_request import choice_params, parse_off_loop, resolve_sampling
from orchestrator.streaming import (
    SSE_DONE,
    EventStream,
    interleave,
    read_json,
    sse,
    until_disconnect,
)
from orchestrator.tokenizer import ChatTemplateError
from orchestrator.tools import chat_prompt
from orchestrator.tracing import trace_headers
from workers.engine.messages import TokenLogprob

OPENAI_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models"}


def add_openai_routes(app: FastAPI, ctx: HttpContext) -> None:
    router = ctx.router

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _openai(ctx, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _openai(ctx, request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": router.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
        }  # fmt: skip
        if router.ranks.all_loaded:
            card["max_model_len"] = router.limits.max_context_len
        return {"object": "list", "data": [card]}


async def _openai(ctx: HttpContext, request: Request, chat: bool) -> Response:
    router, config = ctx.router, ctx.config
    arrival = time.perf_counter()
    raw = await read_json(request, config.max_request_body_bytes)
    req = await (
        parse_off_loop(parse_chat, raw, ctx.tool_format, ctx.marker_ids) if chat
        else parse_off_loop(parse_completion, raw)
    )  # fmt: skip
    if req.model and req.model not in ctx.model_names:
        raise RequestError(
            f"model: the model `{req.model[:200]}` does not exist; this server serves "
            f"`{router.model_name}`", "model", 404, "not_found_error", code="model_not_found",
        )  # fmt: skip
    # (ids, text) of each prompt; text only for an echo.
    prompts: list[tuple[list[int], str]] = []
    spec = ChatOutputSpec()  # how a chat's answer is read (completions: as it is)
    if req.messages is not None:
        try:  # (in a thread: a template over megabytes of messages takes a while)
            text = await asyncio.to_thread(
                chat_prompt, router.tokenizer, req.messages, req.tools, ctx.tool_format,
                req.add_generation_prompt, req.template_kwargs,
            )  # fmt: skip
        except ChatTemplateError as e:
            raise RequestError(f"messages: {e}", "messages") from None
        opened = opens_reasoning(text)
        reasoning = ctx.splits_reasoning and req.separate_reasoning
        spec = ChatOutputSpec(
            ctx.tool_format if req.calls_tools else None,
            req.tools.parallel if req.tools is not None else True,
            reasoning, reasoning and opened,
        )  # fmt: skip
        constraint = req.sampling.constraint
        if opened and constraint is not None:  # the model thinks first, free
            req = replace(
                req, sampling=replace(req.sampling, constraint=after_reasoning(constraint))
            )
        prompts.append((await encode_off_loop(router.tokenizer, text, False), text))
    texts = [p for p in req.prompts if isinstance(p, str)]
    encoded = iter(await encode_all_off_loop(router.tokenizer, texts))
    for p in req.prompts:
        if isinstance(p, str):
            prompts.append((next(encoded), p))
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
    builder = ResponseBuilder(chat, router.model_name, token_text, router.tokenizer.hidden_ids)
    ctx.limiter.check_call(len(jobs))
    slots = router.admit(len(jobs))
    trace = trace_headers(request.headers)
    streams = [
        ctx.run(
            ids, sampling, req.sampling.stop, client_of(request), arrival_s=arrival,
            stream=req.stream, api=request.url.path, slot=slot, trace=trace,
        )
        for (ids, sampling, _), slot in zip(jobs, slots, strict=True)
    ]  # fmt: skip
    echoes = [echo for _, _, echo in jobs]
    if req.stream:
        events = _openai_events(streams, builder, req, echoes, spec)
        return EventStream(events, config.sse_keepalive_s)
    try:
        choices = await until_disconnect(
            request,
            gather_all([_collect(s, e, spec) for s, e in zip(streams, echoes, strict=True)]),
        )
    except ValueError as e:
        raise refused(e, req.prompt_field) from None
    generated = sum(c.finish.num_output_tokens for c in choices)
    choices = best_choices(choices, req.candidates, req.n)
    return JSONResponse(builder.response(choices, req.n, generated))


async def _collect(
    outputs: AsyncGenerator[Output, None],
    echo: tuple[list[int], str] | None,
    spec: ChatOutputSpec,
) -> Choice:
    """One choice of a non-streamed call, read from its whole output (`echo`: its prompt's
    ids and text, put first)."""
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
                    raise error_status(out)
                text = "".join(parts)
                score = total / max(1, out.num_output_tokens)
                if spec.plain:
                    return Choice(text, out, token_ids, logprobs, score=score)
                thought, content, calls = read_chat_output(spec, text)
                return Choice(content, out, token_ids, logprobs, calls, thought, score)
    raise RuntimeError("the request ended without a finish reason")


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
                    yield sse(error_status(out).body())
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
            yield sse(refused(e, req.prompt_field).body())
        except RouterNotReady as e:
            yield sse(RequestError(str(e), None, 503, "unavailable").body())
    yield SSE_DONE
