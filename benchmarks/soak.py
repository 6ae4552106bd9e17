"""Soak: mixed traffic against a running server, then a check that nothing was lost or leaked.

For `--duration` seconds, `--concurrency` clients send a random mix of calls: streamed and whole
`/generate` (greedy and sampled, stop strings, `n`, logprobs, prompts long enough to be
prefilled in several chunks), OpenAI completions and chat (streamed, JSON mode), clients that
hang up mid-stream, `/abort_request` of calls in flight, and malformed calls. Every answer is
checked against what its call asked for (a finish reason, no more tokens than allowed, a 400
for bad input). Then the server must go idle — no request running or waiting on any rank, no KV
page held, no transfer in flight — and still answer. Exit status 1 on any unexpected answer or
leak. With `--grpc HOST:PORT` a quarter of the clients call the gRPC API instead
(`benchmarks/soak_grpc.py`: streamed and final-only `Generate`, calls cancelled mid-stream,
the `Abort` RPC, malformed calls). Give it a server with a small KV cache
(`--kv-capacity-tokens`) so that requests queue:

    .venv/bin/pdserve serve --port 30001 --kv-capacity-tokens 16384 &
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:30001 --duration 60

With `--admin-token` it also rebalances and flushes the prefix caches as it goes, and with
`--churn decode` takes a decode instance out at once every third admin turn (the last one is
replaced), so that requests move (resume from their output) mid-flight: serve with
`--decode-instances 2` for that.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

Check = Callable[["Soak", random.Random], Awaitable[str]]  # returns the outcome's name


class Unexpected(Exception):
    """An answer the call should not have had."""


class Soak:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        info: dict[str, Any],
        long_share: float = 1.0,
    ):
        self.session, self.url, self.info = session, url, info
        self.vocab = int(info["vocab_size"])
        self.max_context = min(int(info["max_context_len"]), int(info["kv_capacity_tokens"]))
        # Long prompts: up to this share of the context (or of a smaller KV cache).
        self.long_top = max(2, min(3000, int(self.max_context * long_share) - 64))

    def prompt(self, rng: random.Random, long: bool = False) -> list[int]:
        top = self.long_top
        n = rng.randint(top // 2, top) if long else rng.randint(1, 200)
        return [rng.randrange(2, self.vocab) for _ in range(n)]

    async def post(self, route: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.session.post(self.url + route, json=body) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def stream(
        self, route: str, body: dict[str, Any], stop_after: int | None = None
    ) -> list[Any]:
        """The events of a streamed call; with `stop_after`, hang up after that many."""
        events: list[Any] = []
        async with self.session.post(self.url + route, json=body) as resp:
            if resp.status != 200:
                raise Unexpected(f"{route}: HTTP {resp.status}: {(await resp.text())[:200]}")
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
                if stop_after is not None and len(events) >= stop_after:
                    return events  # leaving the block closes the connection mid-stream
        return events


def _sampling(rng: random.Random, max_new: int) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": max_new, "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.5:
        params["temperature"] = 0.0
    else:
        params.update(
            temperature=rng.uniform(0.3, 1.5),
            top_p=rng.choice([1.0, rng.uniform(0.5, 1.0)]),
            top_k=rng.choice([-1, -1, 5, 50]),  # -1: no limit (SGLang's)
            min_p=rng.choice([0.0, 0.0, 0.1]),
            seed=rng.randrange(1 << 30),
        )
    if rng.random() < 0.3:  # penalties and a bias, greedy or not
        params.update(
            repetition_penalty=rng.choice([1.0, 1.2]),
            frequency_penalty=rng.choice([0.0, 0.5]),
            presence_penalty=rng.choice([0.0, -0.5]),
            logit_bias={str(rng.randrange(2, 100)): rng.uniform(-5, 5)},
        )
    if rng.random() < 0.2:
        params["stop"] = ["e", " the"]
    return params


def _check_meta(meta: dict[str, Any], max_new: int, where: str) -> str:
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in ("length", "stop"):
        raise Unexpected(f"{where}: finish_reason {reason!r}")
    if not 0 < int(meta["completion_tokens"]) <= max_new:
        raise Unexpected(
            f"{where}: {meta['completion_tokens']} tokens for max_new_tokens {max_new}"
        )
    return str(kind)


async def generate_stream(s: Soak, rng: random.Random) -> str:
    max_new = rng.randint(1, 96)
    body = {"input_ids": s.prompt(rng), "sampling_params": _sampling(rng, max_new), "stream": True}
    events = await s.stream("/generate", body)
    if len(events) < 2 or events[-1] != "[DONE]":
        raise Unexpected(f"/generate stream ended without [DONE]: {events[-1:]}")
    return "generate-stream " + _check_meta(events[-2]["meta_info"], max_new, "/generate stream")


async def generate_whole(s: Soak, rng: random.Random) -> str:
    max_new, n = rng.randint(1, 96), rng.choice([1, 1, 1, 2, 3])
    params = {**_sampling(rng, max_new), "n": n}
    body: dict[str, Any] = {"input_ids": s.prompt(rng), "sampling_params": params}
    if rng.random() < 0.3:
        body.update(return_logprob=True, top_logprobs_num=rng.randint(0, 3))
    status, out = await s.post("/generate", body)
    if status != 200:
        raise Unexpected(f"/generate: HTTP {status}: {out}")
    outs = out if isinstance(out, list) else [out]
    if len(outs) != n:
        raise Unexpected(f"/generate n={n}: {len(outs)} outputs")
    for o in outs:
        _check_meta(o["meta_info"], max_new, "/generate")
        if body.get("return_logprob") and len(o["meta_info"]["output_token_logprobs"]) != len(
            o["output_ids"]
        ):
            raise Unexpected("/generate: a logprob per output token expected")
    return "generate-whole"


async def long_prompt(s: Soak, rng: random.Random) -> str:
    body = {"input_ids": s.prompt(rng, long=True), "sampling_params": _sampling(rng, 8)}
    status, out = await s.post("/generate", body)
    if status != 200:
        raise Unexpected(f"/generate (long prompt): HTTP {status}: {out}")
    _check_meta(out["meta_info"], 8, "/generate (long prompt)")
    return "long-prompt"


async def hang_up(s: Soak, rng: random.Random) -> str:
    params = {**_sampling(rng, 200), "ignore_eos": True}
    body = {"input_ids": s.prompt(rng), "sampling_params": params, "stream": True}
    await s.stream("/generate", body, stop_after=rng.randint(0, 6))
    return "hang-up"


async def abort(s: Soak, rng: random.Random) -> str:
    rid = uuid.uuid4().hex
    body = {
        "rid": rid,
        "input_ids": s.prompt(rng),
        "sampling_params": {**_sampling(rng, 300), "ignore_eos": True, "stop": []},
        "stream": True,
    }
    task = asyncio.create_task(s.stream("/generate", body))
    await asyncio.sleep(rng.uniform(0.0, 0.3))
    status, found = await s.post("/abort_request", {"rid": rid})
    if status != 200:
        raise Unexpected(f"/abort_request: HTTP {status}: {found}")
    events = await task
    if len(events) < 2 or events[-1] != "[DONE]" or "meta_info" not in events[-2]:
        raise Unexpected(f"an aborted stream ended with {events[-2:]}")
    reason = (events[-2]["meta_info"].get("finish_reason") or {}).get("type")
    if reason not in ("abort", "length"):  # "length": it ended before the abort came
        raise Unexpected(f"an aborted stream ended with {reason!r}")
    return f"abort (found: {found['found']}, ended: {reason})"


async def chat_stream(s: Soak, rng: random.Random) -> str:
    max_tokens = rng.randint(1, 64)
    body: dict[str, Any] = {
        "model": s.info["model_name"],
        "messages": [{"role": "user", "content": "Say something " * rng.randint(1, 20)}],
        "max_tokens": max_tokens, "stream": True, "temperature": rng.choice([0.0, 0.8]),
    }  # fmt: skip
    if rng.random() < 0.3:
        body["response_format"] = {"type": "json_object"}
    if rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    events = await s.stream("/v1/chat/completions", body)
    if events[-1] != "[DONE]":
        raise Unexpected("chat stream ended without [DONE]")
    finishes = [
        c["finish_reason"]
        for e in events[:-1]
        for c in e.get("choices", [])
        if c.get("finish_reason")
    ]
    if len(finishes) != 1 or finishes[0] not in ("stop", "length"):
        raise Unexpected(f"chat stream finish reasons {finishes}")
    return "chat-stream" + (" json" if "response_format" in body else "")


async def completions(s: Soak, rng: random.Random) -> str:
    n = rng.randint(1, 3)
    body = {
        "model": s.info["model_name"], "prompt": [s.prompt(rng), s.prompt(rng)], "n": n,
        "max_tokens": rng.randint(1, 48), "logprobs": rng.choice([None, 2]),
        "temperature": rng.choice([0.0, 1.0]), "seed": 7,
    }  # fmt: skip
    status, out = await s.post("/v1/completions", body)
    if status != 200:
        raise Unexpected(f"/v1/completions: HTTP {status}: {out}")
    if sorted(c["index"] for c in out["choices"]) != list(range(2 * n)):
        raise Unexpected(f"/v1/completions: choice indices {[c['index'] for c in out['choices']]}")
    return "completions"


async def bad_call(s: Soak, rng: random.Random) -> str:
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/generate", {"input_ids": s.prompt(rng), "sampling_params": {"temperature": -1}}),
        ("/generate", {"input_ids": [s.vocab + 5], "sampling_params": {"max_new_tokens": 4}}),
        (
            "/generate",
            {"input_ids": s.prompt(rng), "sampling_params": {"max_new_tokens": s.max_context * 2}},
        ),
        ("/generate", {"text": "x", "sampling_params": {"regex": "("}}),
        ("/v1/chat/completions", {"messages": "not a list"}),
        ("/v1/completions", {"prompt": "x", "n": 1000}),
    ]
    route, body = rng.choice(bodies)
    status, out = await s.post(route, body)
    if status != 400:
        raise Unexpected(f"{route} {json.dumps(body)[:120]}: HTTP {status}, 400 expected: {out}")
    return "bad-call (400)"


MIX: list[tuple[Check, int]] = [
    (generate_stream, 30), (generate_whole, 15), (long_prompt, 3), (hang_up, 10), (abort, 10),
    (chat_stream, 12), (completions, 8), (bad_call, 8),
]  # fmt: skip


HTTP_ERRORS = (Unexpected, aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError)


async def _calls(
    target: Any,
    mix: Sequence[tuple[Callable[[Any, random.Random], Awaitable[str]], int]],
    errors: tuple[type[BaseException], ...],
    rng: random.Random,
    until: float,
    seen: collections.Counter[str],
    failures: list[str],
) -> None:
    """One client: calls drawn from `mix` by weight until `until`; what each answered in
    `seen`, the `errors` it raised in `failures`."""
    checks, weights = zip(*mix, strict=True)
    while time.monotonic() < until:
        check = rng.choices(checks, weights)[0]
        try:
            seen[await check(target, rng)] += 1
        except errors as e:
            failures.append(f"{check.__name__}: {type(e).__name__}: {e}")


async def _grpc_client(
    address: str,
    vocab: int,
    rng: random.Random,
    until: float,
    seen: collections.Counter[str],
    failures: list[str],
) -> None:
    import grpc
    from soak_grpc import GRPC_MIX, GrpcSoak, GrpcUnexpected  # beside this script

    s = GrpcSoak(address, vocab)
    errors = (GrpcUnexpected, grpc.aio.AioRpcError)
    try:
        await _calls(s, GRPC_MIX, errors, rng, until, seen, failures)
    finally:
        await s.close()


async def _admin(
    soak: Soak,
    token: str,
    every_s: float,
    until: float,
    seen: collections.Counter[str],
    failures: list[str],
    churn: str | None = None,
) -> None:
    """Every `every_s`: rebalance the experts (when there is an expert-parallel pool) or flush
    the prefix caches, in turn, while the traffic runs; with `churn` (a role), every third
    turn takes that role's oldest instance out at once (`/admin/scale`, drain timeout 0; the
    role's last is replaced), so that its requests move mid-flight (they must still end
    well)."""
    headers = {"Authorization": f"Bearer {token}"}
    routes = ["/admin/rebalance", "/admin/flush_cache"]
    if churn:
        routes.append("/admin/scale")
    turn = 0
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        route = routes[turn % len(routes)]
        turn += 1
        body: dict[str, Any] = {}
        if route == "/admin/scale":
            async with soak.session.get(soak.url + "/admin/pools", headers=headers) as resp:
                pools = (await resp.json())["pools"]
            names = [p["name"] for p in pools if p["role"] == churn and p["state"] == "serving"]
            if not names:
                failures.append(f"/admin/pools: no serving {churn} instance: {pools}")
                continue
            oldest = min(names, key=lambda name: int(name.rsplit("-", 1)[1]))
            body = {"remove": [oldest], "drain_timeout_s": 0}
        async with soak.session.post(soak.url + route, json=body, headers=headers) as resp:
            text = await resp.text()
        if resp.status == 409 and "no expert-parallel pool" in text:
            routes = [r if r != "/admin/rebalance" else "/admin/flush_cache" for r in routes]
        elif resp.status != 200 or (route == "/admin/scale" and not json.loads(text)["ok"]):
            failures.append(f"{route}: HTTP {resp.status}: {text[:300]}")
        else:
            seen[route] += 1
            if route == "/admin/scale":
                report = json.loads(text)
                seen["requests moved by a scale: resumed"] += report["requests_resumed"]
                seen["requests moved by a scale: retried"] += report["requests_retried"]


async def _idle(soak: Soak, timeout_s: float) -> list[str]:
    """Wait for every rank to go idle; what is still held after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with soak.session.get(soak.url + "/v1/stats") as resp:
            body = await resp.json()
        held = []
        for rank in body["ranks"]:
            st = rank.get("stats") or {}
            for key in ("num_running", "num_waiting", "num_in_transfer", "num_pages_used"):
                if st.get(key):
                    held.append(f"rank {rank['rank']}: {key} = {st[key]}")
            if not rank.get("ready"):
                held.append(f"rank {rank['rank']} not ready: {rank.get('error')}")
        if body.get("num_in_flight"):
            held.append(f"router: {body['num_in_flight']} request(s) in flight")
        if not held or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.2)


async def soak(
    url: str,
    duration_s: float,
    concurrency: int,
    seed: int,
    admin_token: str | None = None,
    admin_every_s: float = 5.0,
    grpc_address: str | None = None,
    long_share: float = 1.0,
    churn: str | None = None,
) -> int:
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=30)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        async with session.get(url + "/v1/stats") as resp:
            info = next(r["info"] for r in (await resp.json())["ranks"] if r.get("info"))
        s = Soak(session, url, info, long_share)
        seen: collections.Counter[str] = collections.Counter()
        failures: list[str] = []
        start = time.monotonic()
        end = start + duration_s
        # With gRPC a quarter of the clients (at least one) call the gRPC API.
        num_grpc = max(1, concurrency // 4) if grpc_address else 0
        clients = [
            _calls(s, MIX, HTTP_ERRORS, random.Random(seed * 1000 + i), end, seen, failures)
            for i in range(concurrency - num_grpc)
        ]
        if grpc_address:
            clients += [
                _grpc_client(
                    grpc_address, s.vocab, random.Random(-seed * 1000 - i - 1), end, seen, failures
                )  # fmt: skip
                for i in range(num_grpc)
            ]
        if admin_token:
            clients.append(
                _admin(s, admin_token, admin_every_s, start + duration_s, seen, failures, churn)
            )
        await asyncio.gather(*clients)
        print(f"{sum(seen.values())} calls in {time.monotonic() - start:.1f} s:")
        for name, count in sorted(seen.items()):
            print(f"  {count:6d}  {name}")
        held = await _idle(s, timeout_s=30)
        try:
            check = await generate_stream(s, random.Random(seed))
        except (Unexpected, aiohttp.ClientError) as e:
            held.append(f"the server does not answer after the soak: {e}")
        else:
            print(f"after the soak: {check}")
    for f in failures:
        print("UNEXPECTED", f)
    for h in held:
        print("LEAK", h)
    print(f"{len(failures)} unexpected answer(s), {len(held)} leak(s)")
    return 1 if failures or held else 0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--admin-token", default=os.environ.get("PDSERVE_ADMIN_TOKEN"),
                   help="also rebalance the experts and flush the prefix caches, in turn, "
                   "every --admin-every seconds (default: $PDSERVE_ADMIN_TOKEN)")  # fmt: skip
    p.add_argument("--admin-every", type=float, default=5.0)
    p.add_argument("--grpc", help="HOST:PORT of the server's gRPC API: a quarter of the "
                   "clients call it (Generate, cancelled calls, Abort, bad calls)")  # fmt: skip
    p.add_argument("--long-share", type=float, default=1.0,
                   help="long prompts take up to this share of the context or KV cache "
                   "(default 1: most of it)")  # fmt: skip
    p.add_argument("--churn", choices=["prefill", "decode", "colocated"],
                   help="with --admin-token: every third admin turn takes this role's "
                   "oldest instance out at once (drain timeout 0; the role's last is "
                   "replaced): its requests move mid-flight, resuming from their output")  # fmt: skip
    args = p.parse_args()
    if args.churn and not args.admin_token:
        p.error("--churn needs --admin-token")
    code = asyncio.run(
        soak(
            args.url.rstrip("/"),
            args.duration,
            args.concurrency,
            args.seed,
            args.admin_token,
            args.admin_every,
            args.grpc,
            args.long_share,
            args.churn,
        )
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
