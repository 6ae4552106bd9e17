"""The operations routes: `GET /health`, `GET /metrics` (Prometheus), `GET /v1/stats` (rank info
and stats as JSON), and the utilities `POST /abort_request` (SGLang's), `POST /tokenize` and
`POST /detokenize` (vLLM's)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.autoscale import utilization
from orchestrator.http_context import HttpContext
from orchestrator.openai_request import parse_chat
from orchestrator.protocol import encode_off_loop
from orchestrator.request_fields import Fields, RequestError
from orchestrator.sampling_request import parse_off_loop
from orchestrator.streaming import read_json
from orchestrator.tokenizer import ChatTemplateError
from orchestrator.tools import chat_prompt

OPS_ROUTES = {"/health", "/metrics", "/v1/stats", "/abort_request", "/tokenize", "/detokenize"}


def add_ops_routes(app: FastAPI, ctx: HttpContext, eplb: Any = None, pools: Any = None) -> None:
    """`eplb`: the EPLB service actor, whose stats `/metrics` adds when there is one; `pools`:
    the `PoolSet` of the server's pool instances (None: it was given its ranks)."""
    router, config, metrics = ctx.router, ctx.config, ctx.metrics
    front = config.front

    @app.api_route("/health", methods=["GET", "HEAD"])  # (HEAD: some load balancers probe so)
    async def health() -> JSONResponse:
        if router.is_ready:
            return JSONResponse({"status": "ok"})
        if router.draining:
            detail = f"shutting down; {router.num_in_flight} request(s) in flight"
            return JSONResponse({"status": "draining", "detail": detail}, status_code=503)
        errors = [e for e in router.rank_errors if e]
        if router.is_serving:  # a rank is down, the others serve: stay in the load balancer
            return JSONResponse({"status": "degraded", "detail": errors})
        status = {"status": "failed", "detail": errors} if errors else {"status": "loading"}
        return JSONResponse(status, status_code=503)

    # One scrape at a time: counts read by an earlier scrape and applied after a later one's
    # would look like a rank that restarted, and the totals would jump (found by an audit).
    scraping = asyncio.Lock()

    @app.get("/metrics")
    async def prometheus() -> Response:
        async with scraping:
            return await _scrape()

    async def _scrape() -> Response:
        metrics.cluster.set_rank_stats(await router.stats(), router.ranks.final_stats)
        loads, step = router.ranks.loads(), config.engine.chunked_prefill_size
        roles = {load.role for load in loads if load.role}
        metrics.cluster.set_utilization({role: utilization(loads, role, step) for role in roles})
        if pools is not None:
            metrics.cluster.set_pools(pools.describe())
            metrics.cluster.set_scale_counts(
                pools.num_started, pools.num_removed, pools.num_replaced
            )
        metrics.cluster.set_router_stats(
            router.num_retries, router.num_resumed, router.num_rank_failures, router.draining,
            router.num_queued, router.num_shed, router.num_waiting, router.num_waited,
            router.num_migrated, router.moves.num_relieved,
        )  # fmt: skip
        if eplb is not None:
            with contextlib.suppress(Exception):
                metrics.cluster.set_eplb_stats(await asyncio.wait_for(eplb.stats.remote(), 5))
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        rank_stats = await router.stats()
        ranks = []
        for i, (info, st) in enumerate(zip(router.infos, rank_stats, strict=True)):
            if i in router.ranks.removed:  # its pool instance was scaled down
                continue
            entry: dict[str, Any] = {"rank": i, "ready": info is not None and st is not None}
            entry["error"] = router.rank_errors[i]
            entry["draining"] = i in router.ranks.closed  # its pool instance is scaled down
            entry["info"] = asdict(info) if info is not None else None
            entry["stats"] = {**asdict(st), "num_pages_used": st.num_pages_used} if st else None
            # This router's view for its picks: its own requests, and the other routers'
            # (a deployment's, at the last look: `orchestrator.peer_load`).
            peer = router.ranks.peer_load[i]
            entry["load"] = {
                "reserved_tokens": router.ranks.reserved_tokens[i],
                "queued_prefill_tokens": router.ranks.queued_prefill_tokens[i],
                "running": router.ranks.running[i],
                "peer_reserved_tokens": peer.reserved_tokens,
                "peer_unstarted_prompt_tokens": peer.unstarted_prompt_tokens,
                "peer_requests": peer.requests,
            }
            ranks.append(entry)
        return {
            "model": router.model_name,
            "num_in_flight": router.num_in_flight,
            "draining": router.draining,
            "num_retries": router.num_retries,
            "num_resumed": router.num_resumed,
            "num_migrated": router.num_migrated,
            # of the requests asked to move, those asked because their rank's KV ran out
            "num_kv_pressure_moves": router.moves.num_relieved,
            "num_rank_failures": router.num_rank_failures,
            "num_waiting_first_token": router.num_queued,
            "num_waiting_for_rank": router.num_waiting,
            "num_waited_for_rank": router.num_waited,
            "num_shed": router.num_shed,
            "ranks": ranks,
            "pools": pools.describe(router.requests_on) if pools is not None else None,
            # `--deployment`: the name its pools run under (they outlive this router)
            "deployment": pools.deployment if pools is not None else None,
            # `--front`: the deployment this router serves beside its primary, and its tag
            "front": {"deployment": front, "tag": router.tag} if front is not None else None,
        }

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
        if f.has("messages") and f.has("prompt"):
            raise RequestError("prompt, messages: give one of them, not both", "prompt")
        if f.has("messages"):
            keys = ("messages", "tools", "chat_template_kwargs")
            # (Off the loop: `tools` make a grammar, whose check may take long.)
            chat = await parse_off_loop(parse_chat, {k: body.get(k) for k in keys})
            assert chat.messages is not None
            try:
                text = chat_prompt(
                    router.tokenizer, chat.messages, chat.tools, ctx.tool_format,
                    f.get_bool("add_generation_prompt", True), chat.template_kwargs,
                )  # fmt: skip
            except ChatTemplateError as e:
                raise RequestError(f"messages: {e}", "messages") from None
            ids = await encode_off_loop(router.tokenizer, text, False)
        else:
            prompt = f.get_str("prompt")
            if prompt is None:
                raise RequestError("prompt: a prompt (or messages) is required", "prompt")
            ids = await encode_off_loop(
                router.tokenizer, prompt, f.get_bool("add_special_tokens", True)
            )
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
