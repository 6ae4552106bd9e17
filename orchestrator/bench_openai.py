"""`pdserve bench --api completions|chat`: the load generator's calls through the OpenAI routes
(`bench.py` has the rest, `bench_results.py` what it measured). Every call asks for exactly
`output_len` tokens (`ignore_eos`, as vLLM's extension), streamed with
`stream_options.include_usage` so that the last chunk counts them. TTFT is the first chunk that
carries output (a chat's first chunk, its role, does not)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from orchestrator.bench_results import RequestResult

if TYPE_CHECKING:
    from orchestrator.bench import BenchConfig


async def prompt_texts(
    session: aiohttp.ClientSession, url: str, prompts: list[list[int]]
) -> list[str]:
    """Each prompt's text (`/detokenize`), for chat messages; asked before the clock starts."""
    from orchestrator.bench import refused

    texts = []
    for ids in prompts:
        async with session.post(f"{url}/detokenize", json={"tokens": ids}) as resp:
            body = await resp.read()
            try:
                text = json.loads(body)["prompt"] if resp.status == 200 else None
            except (ValueError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise RuntimeError(refused(url, resp, body))
            texts.append(text)
    return texts


def openai_body(
    cfg: BenchConfig, input_ids: list[int], index: int, text: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": cfg.output_len, "temperature": cfg.temperature, "ignore_eos": True,
        "stream": cfg.stream,
    }  # fmt: skip
    if cfg.temperature > 0:
        body.update(top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + index)
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": text or ""}]
    else:
        body["prompt"] = input_ids
    return body


async def one_openai(
    session: aiohttp.ClientSession,
    cfg: BenchConfig,
    input_ids: list[int],
    index: int,
    text: str | None,
) -> RequestResult:
    from orchestrator.bench import refused, request_error

    route = "/v1/chat/completions" if cfg.api == "chat" else "/v1/completions"
    body = openai_body(cfg, input_ids, index, text)
    start = time.perf_counter()
    ttft: float | None = None
    usage: dict[str, Any] = {}
    try:
        async with session.post(f"{cfg.url}{route}", json=body) as resp:
            if resp.status != 200:
                return RequestResult(False, error=refused(cfg.url, resp, await resp.read()))
            if not cfg.stream:
                usage = (await resp.json())["usage"]
            else:
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[len(b"data: ") :])
                    if "error" in event:
                        return RequestResult(False, error=str(event["error"].get("message")))
                    if ttft is None and _has_output(event):
                        ttft = time.perf_counter() - start
                    usage = event.get("usage") or usage
        num_tokens = int(usage["completion_tokens"])
        num_prompt = int(usage["prompt_tokens"])
    except (aiohttp.ClientError, ValueError, KeyError) as e:
        return RequestResult(False, error=request_error(cfg.url, e))
    e2e = time.perf_counter() - start
    if cfg.stream and ttft is None:
        return RequestResult(False, error="the stream carried no output")
    return RequestResult(True, num_tokens, ttft, e2e, num_prompt_tokens=num_prompt)


def _has_output(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        delta = choice.get("delta", choice)
        if delta.get("text") or delta.get("content") or choice.get("finish_reason"):
            return True
    return False
