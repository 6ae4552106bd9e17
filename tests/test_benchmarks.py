"""The benchmark scripts run end to end on a small setting (they are what the GPU sessions
run first: a broken script there costs device time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.kernels import cpu as cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_offline_benchmark_prints_engine_and_transformers_rows() -> None:
    out = _run(
        "benchmarks/offline.py", "--batch", "1", "2", "--input-len", "8", "--output-len", "3",
        "--threads", "1",
    )  # fmt: skip
    lines = out.splitlines()
    attention = "cpu" if cpu_kernels.available() else "torch"
    assert f"decode attention {attention}" in lines[0] and "copy" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["batch"])
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 7 for r in rows)
    assert "transformers 3 tokens per run:" in out
    hf_rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])][2:]
    assert len(hf_rows) == 2 and all(float(r[-1]) > 0 for r in hf_rows)  # the ratio


def test_ep_pool_benchmark_runs_a_pool_of_one() -> None:
    out = _run(
        "benchmarks/ep_pool.py", "--ranks", "1", "--batch", "2", "--input-len", "8",
        "--output-len", "3",
    )  # fmt: skip
    assert "EP pool of 1, two-batch overlap off" in out
    assert "EP pool of 1, two-batch overlap on" in out
    assert "unavailable" not in out


def test_soak_mixed_traffic_leaves_nothing_held(tiny_server) -> None:
    """`benchmarks/soak.py` against the shared server: streamed and whole calls, hang-ups,
    aborts, bad calls, long prompts on a small KV cache, every answer checked, then every rank
    idle with no page held (the script exits 1 otherwise).

    Long prompts fill most of the 2048-token caches of both ranks of the disaggregated pair:
    before prefill ranks took pages back from prompts without decode pages (`Scheduler.park`),
    the two ranks could hold each other up until `--transfer-timeout`."""
    out = _run(
        "benchmarks/soak.py", "--url", tiny_server, "--duration", "12", "--concurrency", "6",
    )  # fmt: skip
    assert "0 unexpected answer(s), 0 leak(s)" in out, out
    assert "abort (found: True, ended: abort)" in out and "hang-up" in out, out


def test_prefix_tiers_benchmark_reports_what_the_cache_found(tiny_server) -> None:
    """`benchmarks/prefix_tiers.py` on a load the shared server's KV cache holds whole: the
    second round finds every full page of each context cached."""
    out = _run(
        "benchmarks/prefix_tiers.py", "--url", tiny_server, "--num-contexts", "3",
        "--context-len", "48", "--question-len", "4", "--output-len", "2", "--rounds", "2",
        "--seed", "7",
    )  # fmt: skip
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(tiny_server)]
    assert [r[1] for r in rows] == ["1", "2"], out
    assert float(rows[1][2]) >= 0.8, out  # 48 of 52 tokens a prompt: 3 of its 16-token pages


def test_front_routers_benchmark_prints_both_rows(ray_session) -> None:
    """`benchmarks/front_routers.py` on this session's Ray: one router against a primary and
    a front router, both rows printed with each router's CPU per 1k tokens."""
    import ray

    out = _run(
        "benchmarks/front_routers.py", "--address", ray.get_runtime_context().gcs_address,
        "--num-prompts", "8", "--input-len", "8", "--output-len", "4", "--concurrency", "4",
        "--rounds", "1",
    )  # fmt: skip
    assert "primary alone" in out and "primary + front, half each" in out, out
    assert "failed" not in out, out


def test_pick_benchmark_prints_its_three_rows() -> None:
    out = _run("benchmarks/pick.py", "--ranks", "8", "--picks", "10")
    rows = [line for line in out.splitlines() if line.endswith(" ms")]
    assert [r.split(":")[0] for r in rows] == [
        "pick, no affinity",
        "pick, with affinity",
        "loads()",
    ]
