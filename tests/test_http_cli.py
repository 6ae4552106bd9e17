"""The `pdserve` CLI against the shared tiny server: `generate` (plain and `--chat`),
`status` (and a reader that goes away), and `bench` (streamed, not streamed, and with a
shared prefix that the prefill rank's cache must find)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.http_calls import _ranks


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(180)
def test_cli_generate(tiny_server):
    for extra in ([], ["--chat"]):
        p = _cli(
            "generate", "--url", tiny_server, "--prompt", "Hello", "--max-new-tokens", "6", *extra
        )
        assert p.returncode == 0, p.stderr
        assert "tokens, finish:" in p.stderr
    p = _cli("status", "--url", tiny_server)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "request(s) in flight" in lines[0] and "rank failure(s)" in lines[0], lines[0]
    assert lines[1].split()[:4] == ["pool", "dp", "rank", "node"]
    pools = sorted(line.split()[0] for line in lines[2:])
    assert pools in (["colocated-0"], ["decode-0", "prefill-0"]), p.stdout
    prompt_rank = next(line for line in lines[2:] if line.split()[0] != "decode-0")
    assert re.search(r" \d+% \(\d+%\) +- ", prompt_rank), p.stdout  # prefix hits, no guesses
    if pools != ["colocated-0"]:  # the generates above crossed: sends on one, receives on the other
        by_pool = {line.split()[0]: line for line in lines[2:]}
        # (and how many of the sends went ahead, layer by layer, when some did)
        sent = r"\b[1-9]\d* / 0 \(\d+\), [\d.]+ MB(, [1-9]\d* ahead)?$"
        assert re.search(sent, by_pool["prefill-0"]), p.stdout
        assert re.search(r"\b0 / [1-9]\d* \(\d+\), [\d.]+ MB$", by_pool["decode-0"]), p.stdout
    # A reader that goes away (`pdserve status | head -0`): no traceback, exit 0.
    cmd = [sys.executable, "-m", "orchestrator.cli", "status", "--url", tiny_server]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.timeout(240)
def test_cli_bench(tiny_server):
    args = ["--url", tiny_server, "--num-prompts", "8", "--input-len", "16", "--output-len", "8"]
    p = _cli("bench", *args, "--concurrency", "4", "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["num_requests"] == 8 and result["num_failed"] == 0
    assert result["output_tokens"] == 64 and result["input_tokens"] == 128
    assert result["output_tok_s"] > 0 and 0 < result["ttft_p50_ms"] <= result["e2e_p99_ms"]
    # The server's counts over the run: every prompt token looked up in a prefix cache (the
    # prefill rank's; the decode rank looks up what it need not be sent), no guesses.
    assert result["prefix_queried_tokens"] >= 128 and result["spec_draft_tokens"] == 0
    assert 0 <= result["prefix_hit_tokens"] <= result["prefix_queried_tokens"]
    p = _cli("bench", *args, "--concurrency", "8")
    assert p.returncode == 0, p.stderr
    labels = ("requests", "duration", "output tok/s", "total tok/s", "TTFT p50", "TPOT p50",
              "prefix cache hits")  # fmt: skip
    for label in labels:
        assert label in p.stdout
    # Plain JSON calls: the same tokens counted, no first token to time.
    p = _cli("bench", *args, "--concurrency", "4", "--no-stream", "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["num_failed"] == 0 and result["output_tokens"] == 64
    assert result["ttft_p50_ms"] is None and result["tpot_p50_ms"] is None
    assert 0 < result["e2e_p50_ms"] <= result["e2e_p99_ms"]
    # Sampled: the same counts; a bad setting is a CLI error.
    sampled = [*args, "--concurrency", "4", "--temperature", "0.8", "--top-p", "0.9", "--json"]
    p = _cli("bench", *sampled)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["output_tokens"] == 64
    p = _cli("bench", *args, "--top-p", "0")
    assert p.returncode == 1 and "--top-p" in p.stderr
    # Through the OpenAI routes, streamed and not: the same output counted.
    for api in ("completions", "chat"):
        for stream in ([], ["--no-stream"]):
            p = _cli("bench", *args, "--concurrency", "4", "--api", api, *stream, "--json")
            assert p.returncode == 0, p.stderr
            result = json.loads(p.stdout)
            assert result["num_failed"] == 0 and result["output_tokens"] == 64, result
            assert (result["ttft_p50_ms"] is None) == bool(stream)
            if api == "completions":
                assert result["input_tokens"] == 128

    # A shared system prompt of 48 tokens: counted in, and found in the prefill rank's cache.
    def hits() -> int:
        return sum(r["stats"]["num_prefix_hit_tokens"] for r in _ranks(tiny_server))

    before = hits()
    shared = [*args, "--concurrency", "1", "--shared-prefix-len", "48", "--seed", "5", "--json"]
    p = _cli("bench", *shared)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["num_failed"] == 0 and result["input_tokens"] == 8 * (48 + 16)
    assert hits() - before >= 7 * 48  # one at a time: every prompt after the first hits
