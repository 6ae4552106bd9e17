"""Admin routes: expert rebalancing through the EPLB service, behind a bearer token.

- `POST /admin/rebalance` — body (optional) `{"pools": [names], "placements": {name: phy2log}}`;
  replies `{"pools": [report, ...]}` (balancedness before/after on the recorded window, experts
  and bytes moved, each phase's seconds, the pause). 409 while another rebalance runs.
- `GET /admin/experts` — per pool: placement (`phy2log`), recorded load, balancedness.
- `POST /admin/flush_cache` — every rank forgets its prefix cache (requests in flight keep
  their pages); replies `{"num_pages_freed": n}`.
- `GET /admin/pools` — the pool instances: name, role, state (starting, serving, draining),
  ranks, requests on them; and whether a scale runs.
- `POST /admin/scale` — body `{"prefill": n, "decode": m}` (a colocated server: `"colocated"`),
  `"remove": [names]`, `"drain_timeout_s"` (default `--scale-drain-timeout`): start and drain
  pool instances (`orchestrator.scaling`); replies when done with what started, what was removed,
  what failed (`ok` false then), the requests a drain timeout moved, the seconds, and the
  pools. 409 while another scale runs.

`Authorization: Bearer <token>` is required: missing → 401, wrong → 403. Without a token set
(`pdserve serve --admin-token` or `PDSERVE_ADMIN_TOKEN`) the routes answer 404: admin is off.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from orchestrator.auth import bearer, same_secret
from orchestrator.front import primary_only
from orchestrator.pools import PoolSet
from orchestrator.request_fields import RequestError
from orchestrator.scaling import ScaleError, ScaleInProgress, ServerStopping, drain_seconds
from orchestrator.streaming import read_json
from workers.engine.messages import short_error

ADMIN_ROUTES = {
    "/admin/rebalance", "/admin/experts", "/admin/flush_cache", "/admin/pools", "/admin/scale"
}  # fmt: skip


def check_token(request: Request, token: str | None) -> None:
    if token is None:
        raise RequestError(
            "admin routes are disabled: start the server with --admin-token (or set "
            "PDSERVE_ADMIN_TOKEN)", None, 404, "not_found",
        )  # fmt: skip
    given = bearer(request.headers.get("authorization"))
    if given is None:
        raise RequestError(
            "missing admin token: send 'Authorization: Bearer <token>'", None, 401,
            "authentication_error",
        )  # fmt: skip
    if not same_secret(given, token):
        raise RequestError("wrong admin token", None, 403, "permission_error")


def _no_service(front: str | None) -> RequestError:
    if front is not None:
        return RequestError(primary_only(front), None, 409, "conflict")
    return RequestError(
        "no expert-parallel pool to rebalance (pools of one rank hold every expert; start "
        "with --prefill-dp/--decode-dp/--dp > 1)", None, 409, "conflict",
    )  # fmt: skip


def add_admin_routes(
    app: FastAPI,
    eplb: Any,
    token: str | None,
    router: Any = None,
    pools: PoolSet | None = None,
    drain_timeout_s: float = 600.0,
    front: str | None = None,
) -> None:
    """`eplb`: the `EPLBService` actor handle, or None when no pool is expert-parallel;
    `router`: the `Router` (cache flush, scaling); `pools`: the pool instances the server
    started (None: it was given its ranks, and cannot scale them); `front`: the deployment
    this server is a front router of (`orchestrator.front`)."""

    def _pools() -> PoolSet:
        if front is not None:
            raise RequestError(primary_only(front), None, 409, "conflict")
        if pools is None or router is None:
            raise RequestError(
                "this server was given its ranks and does not start or stop pool instances",
                None, 409, "conflict",
            )  # fmt: skip
        return pools

    @app.get("/admin/pools")
    async def list_pools(request: Request) -> JSONResponse:
        check_token(request, token)
        own = _pools()
        autoscaler = request.app.state.autoscaler
        return JSONResponse({
            "pools": own.describe(router.requests_on), "scaling": own.scaling,
            "autoscale": autoscaler.describe() if autoscaler is not None else None,
        })  # fmt: skip

    @app.post("/admin/scale")
    async def scale(request: Request) -> JSONResponse:
        check_token(request, token)
        own = _pools()
        body = await read_json(request, 1 << 20) if await request.body() else {}
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object", None)
        unknown = sorted(set(body) - {*own.counts(), "remove", "drain_timeout_s"})
        if unknown:
            allowed = ", ".join([*sorted(own.counts()), "remove", "drain_timeout_s"])
            raise RequestError(f"{unknown[0]}: unknown field (this server takes {allowed})",
                               unknown[0])  # fmt: skip
        remove = body.get("remove", [])
        if not (isinstance(remove, list) and all(isinstance(n, str) for n in remove)):
            raise RequestError("remove must be a list of pool instance names", "remove")
        counts = {k: v for k, v in body.items() if k not in ("remove", "drain_timeout_s")}
        try:
            drain_s = drain_seconds(body.get("drain_timeout_s"), drain_timeout_s)
            report = await own.scale(router, eplb, counts, remove, drain_s)
        except ScaleError as e:
            raise RequestError(str(e), e.field) from None
        except ScaleInProgress as e:
            status = 503 if isinstance(e, ServerStopping) else 409
            raise RequestError(str(e), None, status, "conflict") from None
        return JSONResponse(
            {**asdict(report), "ok": report.ok, "pools": own.describe(router.requests_on)}
        )

    @app.post("/admin/flush_cache")
    async def flush_cache(request: Request) -> JSONResponse:
        check_token(request, token)
        if router is None:
            raise RequestError("no router to flush through", None, 409, "conflict")
        return JSONResponse({"num_pages_freed": await router.flush_prefix_cache()})

    @app.post("/admin/rebalance")
    async def rebalance(request: Request) -> JSONResponse:
        check_token(request, token)
        body = await read_json(request, 1 << 26) if await request.body() else {}
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object", None)
        pools = body.get("pools")
        placements = body.get("placements")
        if pools is not None and not (
            isinstance(pools, list) and all(isinstance(p, str) for p in pools)
        ):
            raise RequestError("pools must be a list of pool names", "pools")
        if placements is not None and not isinstance(placements, dict):
            raise RequestError("placements must map pool names to phy2log lists", "placements")
        if eplb is None:
            raise _no_service(front)
        try:
            reports = await eplb.rebalance.remote(pools, False, placements)
        except Exception as e:
            if _restarting(e):
                raise _service_restarting() from None
            message = short_error(e)
            if "already running" in message:
                raise RequestError(message, None, 409, "conflict") from None
            if isinstance(_root(e), ValueError):
                field = "placements" if "placements:" in message else "pools"
                raise RequestError(message, field) from None
            raise RequestError(message, None, 500, "server_error") from None
        return JSONResponse({"pools": reports})

    @app.get("/admin/experts")
    async def experts(request: Request) -> JSONResponse:
        check_token(request, token)
        if eplb is None:
            raise _no_service(front)
        try:
            pools = await asyncio.wait_for(eplb.experts.remote(), 60)
        except Exception as e:
            if _restarting(e):
                raise _service_restarting() from None
            raise
        return JSONResponse({"pools": pools})


def _restarting(e: BaseException) -> bool:
    """Whether `e` says the EPLB service's actor is down (Ray restarts it)."""
    import ray.exceptions

    return isinstance(e, ray.exceptions.ActorUnavailableError | ray.exceptions.ActorDiedError)


def _service_restarting() -> RequestError:
    return RequestError(
        "the EPLB service is restarting (its process died); retry in a few seconds",
        None, 503, "unavailable",
    )  # fmt: skip


def _root(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
