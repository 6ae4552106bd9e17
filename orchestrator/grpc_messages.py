"""What the gRPC front end (`orchestrator.grpc_server`) translates between `proto/pdserve.proto`
and the server's own terms: a `GenerateRequest` into the body of an HTTP `/generate` call (so
that both APIs validate alike), token logprobs into their messages, a `RequestError` into a
status code, and a call's metadata (its `authorization`, its peer's address). No server here."""

from __future__ import annotations

from typing import Any

import grpc

from orchestrator.request_fields import RequestError
from proto import pdserve_pb2 as pb
from workers.engine.grammar import JSON_OBJECT_SCHEMA
from workers.engine.messages import TokenLogprob


def status_of(e: RequestError) -> grpc.StatusCode:
    if e.code == "context_length_exceeded":
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        401: grpc.StatusCode.UNAUTHENTICATED,
        403: grpc.StatusCode.PERMISSION_DENIED,
        404: grpc.StatusCode.NOT_FOUND,
        409: grpc.StatusCode.FAILED_PRECONDITION,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        429: grpc.StatusCode.RESOURCE_EXHAUSTED,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
    }.get(e.status, grpc.StatusCode.INTERNAL)


def generate_body(request: pb.GenerateRequest) -> dict[str, Any]:
    """The request as an SGLang `/generate` body, so that both APIs validate alike."""
    body: dict[str, Any] = {}
    if request.rid:
        body["rid"] = request.rid
    if request.priority:
        body["priority"] = request.priority
    prompt = request.WhichOneof("prompt")
    if prompt == "text":
        body["text"] = request.text
    elif prompt == "input_ids":
        body["input_ids"] = list(request.input_ids.ids)
    sp = request.sampling
    params: dict[str, Any] = {}
    for name in (
        "max_new_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "min_new_tokens",
        "frequency_penalty", "presence_penalty", "repetition_penalty", "n",
    ):  # fmt: skip
        if sp.HasField(name):
            params[name] = getattr(sp, name)
    if sp.stop:
        params["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        params["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.ignore_eos:
        params["ignore_eos"] = True
    if sp.logit_bias:
        params["logit_bias"] = {str(t): bias for t, bias in sp.logit_bias.items()}
    constraint = sp.WhichOneof("constraint")
    if constraint == "json_object":
        if sp.json_object:  # set to false: no constraint (proto3 still marks the oneof)
            params["json_schema"] = JSON_OBJECT_SCHEMA  # the same grammar
    elif constraint is not None:
        params[constraint] = getattr(sp, constraint)
    body["sampling_params"] = params
    if request.return_logprob:
        body["return_logprob"] = True
        body["top_logprobs_num"] = request.top_logprobs_num
        body["logprob_start_len"] = (
            request.logprob_start_len if request.HasField("logprob_start_len") else -1
        )
    elif request.top_logprobs_num:
        body["top_logprobs_num"] = request.top_logprobs_num  # refused: needs return_logprob
    elif request.HasField("logprob_start_len"):
        raise RequestError("logprob_start_len: needs return_logprob", "logprob_start_len")
    return body


def pb_logprobs(logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            logprob=lp.logprob, top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in lp.top]
        )
        for lp in logprobs or ()
    ]


def call_authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The call's `authorization` metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5678` / `ipv6:[::1]:5678` → the address without the port."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer
