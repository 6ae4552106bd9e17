"""The soak's gRPC calls (`benchmarks/soak.py --grpc HOST:PORT`): streamed `Generate` calls,
calls cancelled mid-stream, calls ended by the `Abort` RPC, and malformed ones, each answer
checked. The leak check after the soak covers what they leave on the ranks."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import grpc

from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc


class GrpcUnexpected(Exception):
    """An answer the call should not have had."""


class GrpcSoak:
    def __init__(self, address: str, vocab: int):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.vocab = vocab

    def request(self, rng: random.Random, max_new: int, rid: str = "") -> pb.GenerateRequest:
        ids = [rng.randrange(2, self.vocab) for _ in range(rng.randint(1, 200))]
        sampling: dict[str, Any] = {"max_new_tokens": max_new, "ignore_eos": rng.random() < 0.5}
        if rng.random() < 0.5:
            sampling["temperature"] = 0.0
        else:
            sampling.update(temperature=rng.uniform(0.3, 1.5), top_p=rng.uniform(0.5, 1.0),
                            seed=rng.randrange(1 << 30))  # fmt: skip
        if rng.random() < 0.3:
            sampling.update(repetition_penalty=1.2, presence_penalty=0.5)
        return pb.GenerateRequest(
            rid=rid, input_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**sampling),
            final_only=rng.random() < 0.3,
        )  # fmt: skip

    async def close(self) -> None:
        await self.channel.close()


async def grpc_generate(s: GrpcSoak, rng: random.Random) -> str:
    max_new = rng.randint(1, 96)
    request = s.request(rng, max_new)
    finals = [r.final async for r in s.stub.Generate(request, timeout=120) if r.HasField("final")]
    if len(finals) != 1:
        raise GrpcUnexpected(f"Generate: {len(finals)} finals")
    final = finals[0]
    if final.finish_reason not in ("stop", "length"):
        raise GrpcUnexpected(f"Generate: finish_reason {final.finish_reason!r}")
    if not 0 < final.usage.completion_tokens <= max_new:
        raise GrpcUnexpected(f"Generate: {final.usage.completion_tokens} tokens of {max_new}")
    return "grpc-generate" + (" final-only" if request.final_only else "")


async def grpc_cancel(s: GrpcSoak, rng: random.Random) -> str:
    request = s.request(rng, 300)
    request.sampling.ignore_eos = True
    request.final_only = False
    call = s.stub.Generate(request, timeout=120)
    keep = rng.randint(0, 5)
    async for _ in call:
        if keep == 0:
            break
        keep -= 1
    call.cancel()
    return "grpc-cancel"


async def grpc_abort(s: GrpcSoak, rng: random.Random) -> str:
    rid = uuid.uuid4().hex
    request = s.request(rng, 300, rid=rid)
    request.sampling.ignore_eos = True
    call = s.stub.Generate(request, timeout=120)

    async def drain() -> None:
        async for _ in call:
            pass

    task = asyncio.create_task(drain())
    await asyncio.sleep(rng.uniform(0.0, 0.3))
    found = (await s.stub.Abort(pb.AbortRequest(rid=rid), timeout=30)).found
    try:
        await task
    except grpc.aio.AioRpcError as e:
        if e.code() is not grpc.StatusCode.CANCELLED:
            message = f"an aborted call ended with {e.code().name}: {e.details()}"
            raise GrpcUnexpected(message) from None
        return "grpc-abort (cancelled)"
    if found:  # the abort found it running, yet the call ended normally: it finished first
        return "grpc-abort (finished first)"
    return "grpc-abort (not found)"


async def grpc_bad(s: GrpcSoak, rng: random.Random) -> str:
    request = s.request(rng, 8)
    request.sampling.temperature = -1.0
    try:
        async for _ in s.stub.Generate(request, timeout=30):
            pass
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
            return "grpc-bad (INVALID_ARGUMENT)"
        raise GrpcUnexpected(f"a bad call ended with {e.code().name}: {e.details()}") from None
    raise GrpcUnexpected("a call with temperature -1 was served")


GRPC_MIX = [(grpc_generate, 10), (grpc_cancel, 4), (grpc_abort, 4), (grpc_bad, 2)]
