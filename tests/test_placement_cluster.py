"""Pools on a Ray cluster of two nodes (two raylets on this machine, `ray.cluster_utils`): the
prefill pool and the decode pool land on different nodes, and KV crosses between them.

Runs in a subprocess: a process can join one Ray cluster only, and the rest of the suite shares
the session's single-node instance."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import httpx, ray
    from ray.cluster_utils import Cluster
    from orchestrator.launcher import launch
    from tests.conftest import tiny_serve_config
    from workers.model.tiny import ensure_tiny_checkpoint

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    model_dir = ensure_tiny_checkpoint()
    from pathlib import Path
    server = launch(tiny_serve_config(Path(model_dir)), model_dir=Path(model_dir))
    try:
        ranks = httpx.get(f"{server.url}/v1/stats").json()["ranks"]
        body = {"input_ids": list(range(5, 70)), "sampling_params":
                {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}}
        r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
        out = {"nodes": [[x["info"]["role"], x["info"]["node_id"]] for x in ranks],
               "status": r.status_code, "output_ids": r.json().get("output_ids"),
               "num_nodes": len([n for n in ray.nodes() if n["Alive"]])}
    finally:
        server.stop()
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.timeout(240)
def test_prefill_and_decode_pools_land_on_different_nodes(tiny_server):
    import httpx

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=220,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["num_nodes"] == 2
    nodes = dict(out["nodes"])
    assert set(nodes) == {"prefill", "decode"}
    assert nodes["prefill"] != nodes["decode"], out
    assert out["status"] == 200 and len(out["output_ids"]) == 8, out
    # The same greedy tokens as the single-node server of the rest of the suite.
    body = {
        "input_ids": list(range(5, 70)),
        "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True},
    }
    ref = httpx.post(f"{tiny_server}/generate", json=body, timeout=60).json()["output_ids"]
    assert out["output_ids"] == ref
