"""What a load-generator run (`orchestrator.bench`) measured: each request's result
(`RequestResult`: its TTFT, end-to-end latency and TPOT) and the run's summary (`BenchResult`:
throughput, p50 / p99 latencies, what the server's ranks counted meanwhile), printed as a table or
one JSON object. Pure arithmetic on the timings: no I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    num_output_tokens: int = 0
    ttft_s: float | None = 0.0  # None: not streamed
    e2e_s: float = 0.0
    error: str | None = None
    num_prompt_tokens: int | None = None  # as the server counted them (None: as sent)

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(frozen=True)
class BenchResult:
    num_requests: int
    num_failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    output_tok_s: float
    total_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    first_error: str | None = None
    # The server's ranks during the run (`/v1/stats` before and after, whatever traffic
    # it served; a rank that restarted counts from its restart, one removed not at all):
    # prompt tokens looked up in and found in the prefix caches (a request resumed after a
    # failure is looked up again), tokens guessed and kept by speculative decoding. None
    # when the stats could not be read.
    prefix_queried_tokens: int | None = None
    prefix_hit_tokens: int | None = None
    spec_draft_tokens: int | None = None
    spec_accepted_tokens: int | None = None

    def to_json(self) -> str:
        """One JSON object; latencies that were not measured (not streamed) are null."""
        fields = asdict(self)
        for k, v in fields.items():
            if isinstance(v, float) and math.isnan(v):
                fields[k] = None
        return json.dumps(fields)

    def table(self) -> str:
        def pair(p50: float, p99: float, digits: int) -> str:
            if math.isnan(p50):
                return "n/a (not streamed)"
            return f"{p50:.{digits}f} / {p99:.{digits}f} ms"

        rows = [
            ("requests", f"{self.num_requests - self.num_failed} ok, {self.num_failed} failed"),
            ("duration", f"{self.duration_s:.2f} s"),
            ("input tokens", str(self.input_tokens)),
            ("output tokens", str(self.output_tokens)),
            ("output tok/s", f"{self.output_tok_s:.1f}"),
            ("total tok/s", f"{self.total_tok_s:.1f}"),
            ("TTFT p50 / p99", pair(self.ttft_p50_ms, self.ttft_p99_ms, 1)),
            ("TPOT p50 / p99", pair(self.tpot_p50_ms, self.tpot_p99_ms, 2)),
            ("e2e p50 / p99", f"{self.e2e_p50_ms:.1f} / {self.e2e_p99_ms:.1f} ms"),
        ]
        if self.prefix_queried_tokens:
            hits = (self.prefix_hit_tokens or 0) / self.prefix_queried_tokens
            rows.append(("prefix cache hits", f"{hits:.1%} of prompt tokens looked up"))
        if self.spec_draft_tokens:
            kept, guessed = self.spec_accepted_tokens or 0, self.spec_draft_tokens
            rows.append(("guesses kept", f"{kept} of {guessed} ({kept / guessed:.1%})"))
        if self.first_error:
            rows.append(("first error", self.first_error))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: Sequence[RequestResult], input_len: int, duration_s: float) -> BenchResult:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.num_output_tokens for r in ok)
    in_tokens = sum(input_len if r.num_prompt_tokens is None else r.num_prompt_tokens for r in ok)
    ms = 1000.0
    ttft = [r.ttft_s * ms for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s * ms for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s * ms for r in ok]
    errors = [r.error for r in results if not r.ok]
    return BenchResult(
        num_requests=len(results),
        num_failed=len(results) - len(ok),
        duration_s=duration_s,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        output_tok_s=out_tokens / duration_s if duration_s > 0 else 0.0,
        total_tok_s=(in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50),
        tpot_p99_ms=percentile(tpot, 99),
        e2e_p50_ms=percentile(e2e, 50),
        e2e_p99_ms=percentile(e2e, 99),
        first_error=errors[0] if errors else None,
    )
