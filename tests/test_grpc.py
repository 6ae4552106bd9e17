"""The gRPC API (`pdserve.v1`) through a real server on loopback with the stock grpcio client:
streaming generate, abort, cancellation, health, reflection, admin calls and status codes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)
TOKEN = "grpc-admin-token"


@pytest.fixture(scope="module")
def server(launch_tiny):
    from workers.engine.config import EngineConfig

    engine = EngineConfig(page_size=16, kv_capacity_tokens=2048, device="cpu",
                          num_redundant_experts=4)  # fmt: skip
    srv = launch_tiny(colocated=True, num_ranks=2, engine=engine, admin_token=TOKEN, grpc_port=0,
                      allow_fault_injection=True)  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb_grpc.GenerationStub(channel)


def _request(ids: list[int], n: int, final_only: bool = False, **kw: Any) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)
    return pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=ids), sampling=sampling, final_only=final_only
    )


def _refused(stub: Any, request: pb.GenerateRequest, words: str) -> None:
    """The call fails INVALID_ARGUMENT with a message containing `words`."""
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert words in (err.value.details() or "")


def _pages_used(url: str) -> int:
    ranks = httpx.get(f"{url}/v1/stats", timeout=30).json()["ranks"]
    return sum(r["stats"]["num_pages_used"] for r in ranks)


def _wait_pages_free(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while _pages_used(url):
        assert time.monotonic() < deadline, "KV pages still held"
        time.sleep(0.1)


def test_streaming_generate_matches_http(server, stub):
    prompt = list(range(11, 60))
    replies = list(stub.Generate(_request(prompt, 12), timeout=60))
    chunks = [r.chunk for r in replies if r.HasField("chunk")]
    final = replies[-1].final
    assert replies[-1].HasField("final") and len(chunks) >= 1
    tokens = [t for c in chunks for t in c.token_ids]
    assert list(final.output_ids) == tokens and len(tokens) == 12
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == len(prompt) and final.usage.completion_tokens == 12
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                      "ignore_eos": True}}  # fmt: skip
    http = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert http["output_ids"] == tokens
    assert "".join(c.text for c in chunks) == http["text"] == final.text
    # `final_only`: one message, the same tokens and text.
    whole = list(stub.Generate(_request(prompt, 12, final_only=True), timeout=60))
    assert len(whole) == 1 and whole[0].HasField("final")
    assert list(whole[0].final.output_ids) == tokens and whole[0].final.text == http["text"]
    assert whole[0].final.usage.completion_tokens == 12
    # A text prompt works too.
    text = list(stub.Generate(pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(
        max_new_tokens=3, temperature=0.0)), timeout=60))  # fmt: skip
    assert text[-1].final.usage.completion_tokens >= 1


def test_logprobs_and_penalties_over_grpc(server, stub):
    prompt = [9, 9, 9, 4, 4, 4, 9, 9]
    penalties = {"frequency_penalty": 1.2, "presence_penalty": 0.4, "repetition_penalty": 1.3}
    request = _request(prompt, 10, **penalties)
    request.return_logprob, request.top_logprobs_num = True, 2
    replies = list(stub.Generate(request, timeout=60))
    chunks = [r.chunk for r in replies if r.HasField("chunk")]
    final = replies[-1].final
    assert [len(c.logprobs) for c in chunks] == [len(c.token_ids) for c in chunks]
    assert len(final.logprobs) == len(final.output_ids) == 10
    streamed = [lp.logprob for c in chunks for lp in c.logprobs]
    assert streamed == [lp.logprob for lp in final.logprobs]
    for lp in final.logprobs:  # the model's own ranking, before the penalties
        assert len(lp.top) == 2 and lp.top[0].logprob >= max(lp.top[1].logprob, lp.logprob)
    body = {
        "input_ids": prompt, "return_logprob": True,
        "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True,
                            **penalties},
    }  # fmt: skip
    http = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert http["output_ids"] == list(final.output_ids)
    got = [e[0] for e in http["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx([lp.logprob for lp in final.logprobs], abs=1e-5)
    bad = _request(prompt, 3)
    bad.top_logprobs_num = 3
    _refused(stub, bad, "return_logprob")


def test_n_choices_and_prompt_logprobs_over_grpc(server, stub):
    """`n`: each chunk and final carries its index, the choices equal HTTP's `n` (seeds
    seed, seed + 1, ...); `logprob_start_len`: the final's prompt logprobs equal HTTP's."""
    import math

    prompt = [31, 32, 33, 34, 35, 36]
    request = _request(prompt, 8, seed=11)
    request.sampling.n, request.sampling.temperature = 3, 1.0
    request.return_logprob, request.logprob_start_len = True, 2
    replies = list(stub.Generate(request, timeout=60))
    finals = {r.final.index: r.final for r in replies if r.HasField("final")}
    assert sorted(finals) == [0, 1, 2] and replies[-1].HasField("final")
    for i, final in finals.items():
        chunks = [r.chunk for r in replies if r.HasField("chunk") and r.chunk.index == i]
        assert [t for c in chunks for t in c.token_ids] == list(final.output_ids)
        assert len(final.prompt_logprobs) == len(prompt) - 2  # from position 2 on
    body = {
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 2,
        "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3,
                            "ignore_eos": True},
    }  # fmt: skip
    http = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert [h["output_ids"] for h in http] == [list(finals[i].output_ids) for i in range(3)]
    assert len({tuple(f.output_ids) for f in finals.values()}) > 1  # the seeds differ
    expected = [e[0] for e in http[0]["meta_info"]["input_token_logprobs"]]
    assert [lp.logprob for lp in finals[0].prompt_logprobs] == pytest.approx(expected, abs=1e-5)
    whole = _request(prompt, 4)
    whole.return_logprob, whole.logprob_start_len = True, 0
    final = list(stub.Generate(whole, timeout=60))[-1].final
    assert math.isnan(final.prompt_logprobs[0].logprob) and len(final.prompt_logprobs) == 6
    bad = _request(prompt, 3)
    bad.logprob_start_len = 1
    _refused(stub, bad, "logprob_start_len")
    past = _request(prompt, 3)
    past.return_logprob, past.logprob_start_len = True, len(prompt)
    _refused(stub, past, "logprob_start_len")
    many = _request(prompt, 3)
    many.sampling.n = 17
    _refused(stub, many, "n")


def test_structured_output_over_grpc(server, stub):
    """The `constraint` oneof: the same tokens as HTTP's field of that name, on an
    expert-parallel pool; a bad one is INVALID_ARGUMENT naming it."""
    import regex

    prompt = [21, 22, 23]
    pattern = r"(yes|no), [a-z]{2,6}\."
    final = list(stub.Generate(_request(prompt, 30, regex=pattern), timeout=60))[-1].final
    assert final.finish_reason == "stop" and regex.fullmatch(pattern, final.text)
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 30, "temperature": 0,
                                                      "ignore_eos": True, "regex": pattern}}  # fmt: skip
    http = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert http["output_ids"] == list(final.output_ids)
    obj = list(stub.Generate(_request(prompt, 40, json_object=True), timeout=60))[-1].final
    assert obj.text.startswith("{")
    _refused(stub, _request(prompt, 3, json_schema='{"type": 5}'), "json_schema")
    _refused(stub, _request(prompt, 3, regex="[^\\s\\S]"), "no output can match")
    # `json_object: false` is no constraint (proto3 still marks the oneof as set).
    free = list(stub.Generate(_request(prompt, 6), timeout=60))[-1].final
    unset = list(stub.Generate(_request(prompt, 6, json_object=False), timeout=60))[-1].final
    assert list(unset.output_ids) == list(free.output_ids)
    biased = _request(prompt, 4)
    biased.sampling.logit_bias[321] = 100.0
    assert list(list(stub.Generate(biased, timeout=60))[-1].final.output_ids) == [321] * 4
    biased.sampling.logit_bias[321] = 101.0
    _refused(stub, biased, "logit_bias")


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=3)),
         grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (_request([5, 6], 3, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (_request([5, 6], 1_000_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds"),
        (_request([5, 99_999], 3), grpc.StatusCode.INVALID_ARGUMENT, "input_ids"),
    ],
)  # fmt: skip
def test_errors_map_to_status_codes(stub, request_, code, words):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, timeout=30))
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()


def test_an_undecodable_request_is_invalid_argument_not_unknown(server):
    """Bytes that are not a `GenerateRequest` (a string field of invalid UTF-8): found by an
    audit to end with UNKNOWN and a traceback in the server's log."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        generate = channel.unary_stream(
            "/pdserve.v1.Generation/Generate",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(generate(b"\x12\x01\xff", timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not a valid message" in (err.value.details() or "")


def test_cancelled_call_and_deadline_free_the_pages(server, stub):
    call = stub.Generate(_request(list(range(3, 200)), 1500), timeout=60)
    first = next(call)
    assert first.HasField("chunk")
    call.cancel()
    _wait_pages_free(server.url)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(_request(list(range(3, 200)), 1500), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_pages_free(server.url)


def test_abort_rpc_ends_the_stream(server, stub):
    request = _request(list(range(3, 100)), 1500)
    request.rid = "grpc-abort-me"
    call = stub.Generate(request, timeout=60)
    next(call)
    assert stub.Abort(pb.AbortRequest(rid="grpc-abort-me"), timeout=30).found
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert not stub.Abort(pb.AbortRequest(rid="no-such-request"), timeout=30).found
    _wait_pages_free(server.url)


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "pdserve.v1.Generation"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_admin_calls_need_the_token(stub):
    for metadata, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong-token"),), grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Rebalance(pb.RebalanceRequest(), metadata=metadata, timeout=30)
        assert err.value.code() == code
    auth = (("authorization", f"Bearer {TOKEN}"),)
    stats = stub.ExpertStats(pb.ExpertStatsRequest(), metadata=auth, timeout=60)
    (pool,) = stats.pools
    assert pool.pool == "colocated-0" and pool.num_ranks == 2 and len(pool.phy2log) > 0
    reply = stub.Rebalance(pb.RebalanceRequest(), metadata=auth, timeout=120)
    assert [r.pool for r in reply.pools] == ["colocated-0"] and reply.pools[0].ok
    with pytest.raises(grpc.RpcError) as err:
        stub.Rebalance(pb.RebalanceRequest(pools=["nope"]), metadata=auth, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_rebalance_is_refused(server, stub):
    import ray

    list(stub.Generate(_request(list(range(3, 50)), 4), timeout=60))  # some load to plan on
    ray.get(server.ranks[0].inject_fault.remote("eplb_stall_load", 1))
    auth = (("authorization", f"Bearer {TOKEN}"),)
    first: list[Any] = []
    thread = threading.Thread(
        target=lambda: first.append(
            stub.Rebalance(pb.RebalanceRequest(), metadata=auth, timeout=120)
        )
    )
    thread.start()
    time.sleep(1.0)
    with pytest.raises(grpc.RpcError) as err:
        stub.Rebalance(pb.RebalanceRequest(), metadata=auth, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already running" in err.value.details()
    thread.join()
    assert first and first[0].pools[0].pool == "colocated-0"


def test_cli_over_grpc(server):
    base = [sys.executable, "-m", "orchestrator.cli"]
    p = subprocess.run([*base, "generate", "--grpc", server.grpc_address, "--prompt", "Hello",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0 and "finish:" in p.stderr, p.stderr
    p = subprocess.run([*base, "rebalance", "--grpc", server.grpc_address, "--token", TOKEN],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0 and "colocated-0" in p.stdout, p.stderr
    p = subprocess.run([*base, "rebalance", "--grpc", server.grpc_address, "--token", "bad-token"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 1 and "PERMISSION_DENIED" in p.stderr


@pytest.mark.timeout(240)
def test_soak_over_grpc_and_http_leaves_nothing_held(server):
    """`benchmarks/soak.py --grpc`: gRPC calls (streamed, final-only, cancelled, aborted, bad)
    beside HTTP ones and admin rebalances on the expert-parallel pool, every answer checked,
    then every rank idle with no KV page held (the script exits 1 otherwise)."""
    root = Path(__file__).resolve().parents[1]
    args = ["--url", server.url, "--grpc", server.grpc_address, "--duration", "10",
            "--concurrency", "4", "--admin-token", TOKEN, "--admin-every", "3"]  # fmt: skip
    p = subprocess.run(
        [sys.executable, "benchmarks/soak.py", *args], cwd=root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(root)}, timeout=200,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "0 unexpected answer(s), 0 leak(s)" in p.stdout
    assert "grpc-generate" in p.stdout and "/admin/rebalance" in p.stdout, p.stdout


def test_stubs_are_generated_from_the_proto():
    pytest.importorskip("grpc_tools")
    # In a subprocess: protoc's in-process run does not mix with the grpc/protobuf state of a
    # long test session.
    p = subprocess.run([sys.executable, "-m", "proto.generate", "--check"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, f"stale stubs, run python -m proto.generate:\n{p.stderr}"


def test_server_timeout_and_dead_rank_status_codes(launch_tiny):
    import ray

    # 1500 tokens take the tiny model over 0.5 s even on a fast host (~0.4 ms a step alone).
    server = launch_tiny(colocated=True, grpc_port=0, request_timeout_s=0.25,
                         rank_restart_wait_s=0)  # fmt: skip
    try:
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(_request(list(range(3, 40)), 1500), timeout=60))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "timed out after 0.25 s" in err.value.details()
            ray.kill(server.ranks[0], no_restart=False)
            deadline = time.monotonic() + 30
            while True:  # the router notices the death when the rank's stream ends
                try:
                    list(stub.Generate(_request([5, 6, 7], 2), timeout=30))
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        assert "rank" in (e.details() or "")
                        break
                    # In flight when it died, or timed out before the router noticed.
                    assert e.code() in (
                        grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ), e
                assert time.monotonic() < deadline, "never UNAVAILABLE while the rank restarts"
                time.sleep(0.05)
    finally:
        server.stop()
