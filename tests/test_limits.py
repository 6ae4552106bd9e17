"""Request limits: prompt length, concurrent requests per client (HTTP 429 / gRPC
RESOURCE_EXHAUSTED), and the limiter's bookkeeping (a slot is never leaked)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import httpx
import pytest

from orchestrator.limits import ClientLimiter
from orchestrator.request_fields import RequestError
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)


async def _numbers(n: int) -> AsyncGenerator[int, None]:
    for i in range(n):
        yield i


def test_limiter_releases_on_end_close_error_and_never_started():
    limiter = ClientLimiter(2)

    async def run() -> None:
        done = limiter.wrap(_numbers(3), "a")
        assert [x async for x in done] == [0, 1, 2]
        closed = limiter.wrap(_numbers(3), "a")
        assert await closed.__anext__() == 0
        opened = limiter.wrap(_numbers(3), "a")  # a second slot while one is held
        with pytest.raises(RequestError) as err:
            limiter.wrap(_numbers(3), "a")
        assert err.value.status == 429 and "at most 2" in err.value.message
        limiter.wrap(_numbers(1), "b")  # other clients are not affected
        await closed.aclose()
        await opened.aclose()
        assert limiter.in_flight["a"] == 0

    asyncio.run(run())
    never = limiter.wrap(_numbers(3), "c")
    del never
    gc.collect()
    assert limiter.in_flight["c"] == 0
    assert ClientLimiter(None).wrap(_numbers(1), "x") is not None


def test_server_limits(launch_tiny):
    server = launch_tiny(colocated=True, max_prompt_tokens=50,
                         max_concurrent_requests_per_client=2, grpc_port=0)  # fmt: skip
    try:
        body = {"input_ids": list(range(5, 65)), "sampling_params": {"max_new_tokens": 2}}
        r = httpx.post(f"{server.url}/generate", json=body, timeout=30)
        assert r.status_code == 400 and "--max-prompt-tokens" in r.json()["error"]["message"]
        # A long text is tokenized off the router's event loop (found by an audit: a 7 MB
        # prompt held the loop 9 s), a short one on it; the limit holds for both.
        import threading

        tokenizer = server.router.tokenizer
        encode, threads = tokenizer.encode, []

        def recorded(*args: Any, **kw: Any) -> Any:
            threads.append(threading.current_thread().name)
            return encode(*args, **kw)

        tokenizer.encode = recorded
        try:
            for route, key in (("/generate", "text"), ("/v1/completions", "prompt")):
                ran: list[list[str]] = []
                for text in ("hello " * 40, "hello " * 12_000):
                    call = {key: text, "max_tokens": 2} if key == "prompt" else {key: text}
                    threads.clear()
                    r = httpx.post(f"{server.url}{route}", json=call, timeout=60)
                    assert r.status_code == 400, r.text
                    assert "--max-prompt-tokens" in r.json()["error"]["message"]
                    ran.append(list(threads))
                (short,), (long,) = ran  # each tokenized once
                loop_thread = next(t for t in threading.enumerate() if t.name == short)
                assert long != short and loop_thread.is_alive(), (route, ran)
        finally:
            tokenizer.encode = encode

        async def streams() -> list[int]:
            slow = {"input_ids": list(range(5, 40)), "stream": True,
                    "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}  # fmt: skip
            async with httpx.AsyncClient(timeout=60) as client:
                held = [client.stream("POST", f"{server.url}/generate", json=slow)
                        for _ in range(2)]  # fmt: skip
                responses = [await h.__aenter__() for h in held]
                third = await client.post(f"{server.url}/generate", json=slow)
                with grpc.insecure_channel(server.grpc_address) as channel:
                    stub = pb_grpc.GenerationStub(channel)
                    request = pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]),
                                                 sampling=pb.SamplingParams(max_new_tokens=2))  # fmt: skip
                    with pytest.raises(grpc.RpcError) as err:
                        list(stub.Generate(request, timeout=30))
                    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                for h in held:
                    await h.__aexit__(None, None, None)
                return [r.status_code for r in responses] + [third.status_code]

        assert asyncio.run(streams()) == [200, 200, 429]
        # The slots came back when the streams closed.
        r = httpx.post(f"{server.url}/generate", json={"input_ids": [5, 6, 7],
                       "sampling_params": {"max_new_tokens": 2}}, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        # A call of more outputs than a client may have in flight at all is a 400, not a 429
        # to retry (found by an audit); one of as many is served.
        calls = [
            ("/generate", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2,
                                                                        "n": 3}}),
            ("/generate", {"text": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 2}}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 3}),
        ]  # fmt: skip
        for route, call in calls:
            r = httpx.post(f"{server.url}{route}", json=call, timeout=30)
            assert r.status_code == 400, r.text
            assert "more than the 2 requests a client may" in r.json()["error"]["message"]
        two = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "n": 2}}
        assert httpx.post(f"{server.url}/generate", json=two, timeout=30).status_code == 200
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            request = pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]),
                                         sampling=pb.SamplingParams(max_new_tokens=2, n=3))  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()


def test_server_sheds_load_past_max_queued_requests(launch_tiny):
    """With `--max-queued-requests 2`, two requests waiting for their first token (their KV
    transfer held back by fault injection: a disaggregated request's first token comes with
    it) make the next ones 503 `overloaded` with Retry-After, on every route and on gRPC;
    once they are gone, requests are served again."""
    import ray

    server = launch_tiny(
        max_queued_requests=2, grpc_port=0, allow_fault_injection=True, transfer_timeout_s=120.0
    )
    try:
        ranks = httpx.get(f"{server.url}/v1/stats", timeout=30).json()["ranks"]
        decode = server.ranks[[r["info"]["role"] for r in ranks].index("decode")]
        ray.get(decode.inject_fault.remote("withhold_receive", 2))
        body = {"input_ids": list(range(5, 40)), "stream": True,
                "sampling_params": {"max_new_tokens": 8}}  # fmt: skip

        async def shed() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                # A burst of six streams at once: two are admitted, four refused with the
                # status (not a 200 whose stream carries the refusal).
                burst = [client.stream("POST", "/generate", json=body) for _ in range(6)]
                answers = await asyncio.gather(*(b.__aenter__() for b in burst))
                assert sorted(a.status_code for a in answers) == [200, 200, 503, 503, 503, 503]
                held = [b for b, a in zip(burst, answers, strict=True) if a.status_code == 200]
                for b, a in zip(burst, answers, strict=True):
                    if a.status_code == 503:
                        assert a.headers["retry-after"] == "1"
                        await b.__aexit__(None, None, None)
                assert server.router.num_queued == 2
                chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                for route, call in [
                    ("/generate", {**body, "stream": False}),
                    ("/generate", body),
                    ("/v1/chat/completions", chat),
                    ("/v1/chat/completions", {**chat, "stream": True}),
                ]:
                    r = await client.post(route, json=call)
                    assert r.status_code == 503, (route, r.text)
                    assert r.headers["retry-after"] == "1"
                    error = r.json()["error"]
                    assert error["code"] == "overloaded", error
                    assert "--max-queued-requests 2" in error["message"]
                with grpc.insecure_channel(server.grpc_address) as channel:
                    request = pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]),
                                                 sampling=pb.SamplingParams(max_new_tokens=2))  # fmt: skip
                    with pytest.raises(grpc.RpcError) as err:
                        list(pb_grpc.GenerationStub(channel).Generate(request, timeout=30))
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "overloaded" in (err.value.details() or "")
                stats = (await client.get("/v1/stats")).json()
                assert stats["num_waiting_first_token"] == 2 and stats["num_shed"] == 9
                metrics = (await client.get("/metrics")).text
                assert "pdserve_requests_shed_total 9.0" in metrics
                assert "pdserve_requests_waiting_first_token 2.0" in metrics
                # The waiting ones leave (their clients go): room again.
                for h in held:
                    await h.__aexit__(None, None, None)
                for _ in range(1000):
                    if server.router.num_queued == 0 and server.router.num_in_flight == 0:
                        break
                    await asyncio.sleep(0.01)
                assert server.router.num_queued == 0 and server.router.num_in_flight == 0

        asyncio.run(shed())
        # A request of more outputs than the cap is admitted as a whole when there is room.
        call = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "n": 3}}
        r = httpx.post(f"{server.url}/generate", json=call, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 3, r.text
        assert server.router.num_queued == 0
    finally:
        server.stop()
