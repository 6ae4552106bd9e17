"""How long a router restart takes with `--deployment` (the pools taken over) against a fresh
start (the pools started and the model loaded), on one machine.

A Ray head runs in this process; `pdserve serve --address <it> --deployment NAME` starts, is
killed (SIGKILL) once it serves, and is started again: printed, the time from launching the
process to "serving" for the first start and for the take-over, each with the greedy tokens of
one request (the same before and after), then the deployment is removed (`pdserve down`).
Extra arguments go to `pdserve serve` (e.g. `--model DIR --prefill-dp 2`); default: the
built-in tiny model, colocated.

    .venv/bin/python benchmarks/takeover.py
    .venv/bin/python benchmarks/takeover.py --model /models/DeepSeek-V2-Lite
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import ray


def _serve(gcs: str, name: str, extra: list[str]) -> tuple[subprocess.Popen[str], str, float]:
    began = time.monotonic()
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--address", gcs, "--port", "0",
           "--deployment", name, *(extra or ["--colocated"])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "serving" in line and " on http://" in line:
            return proc, line.rsplit(" on ", 1)[1].strip(), time.monotonic() - began
        if "error" in line or "cannot" in line:
            print(line, end="", file=sys.stderr)
    raise RuntimeError(f"pdserve serve exited with {proc.wait()}")


def _greedy(url: str) -> list[int]:
    body = {"input_ids": list(range(5, 40)),
            "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
    return list(httpx.post(f"{url}/generate", json=body, timeout=600).json()["output_ids"])


def main() -> int:
    extra = sys.argv[1:]
    # Room for any topology on a small machine (ranks then share cores, as a local
    # `pdserve serve` arranges too).
    ray.init(logging_level="ERROR", num_cpus=max(16, os.cpu_count() or 1))
    gcs = ray.get_runtime_context().gcs_address
    name = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        proc, url, fresh_s = _serve(gcs, name, extra)
        before = _greedy(url)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc, url, takeover_s = _serve(gcs, name, extra)
        after = _greedy(url)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "down", "--address", gcs,
                        "--deployment", name, "--force"], capture_output=True, timeout=120)  # fmt: skip
        ray.shutdown()
    print(f"pdserve serve {' '.join(extra) or '--colocated'} (launch to serving)")
    print(f"  fresh start (pools started, model loaded): {fresh_s:6.1f} s")
    print(f"  take-over after SIGKILL (--deployment):     {takeover_s:6.1f} s")
    print(f"  same greedy tokens after the take-over: {before == after}")
    return 0 if before == after else 1


if __name__ == "__main__":
    sys.exit(main())
