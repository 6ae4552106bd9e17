"""Autoscaling (`orchestrator.autoscale`): the policy as a pure function, the utilization it
reads, the flags' checks, and a real server that adds a decode instance under a load that
fills its KV cache and removes it once the load is gone."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import httpx
import pytest

from orchestrator.autoscale import (
    DOWN_FRACTION,
    SAMPLE_S,
    AutoscaleConfig,
    RoleWindow,
    decide,
    utilization,
    with_reported,
)
from orchestrator.config import ServeConfig
from orchestrator.policy import RankLoad
from tests.disagg_calls import _greedy, _metric, _wait_all_pages_free
from tests.test_disagg import _stream_all

CFG = AutoscaleConfig({"decode": 4}, target=0.8, up_after_s=10.0, down_after_s=60.0)


def _window(values: list[float], start: float = 0.0) -> RoleWindow:
    w = RoleWindow()
    for i, u in enumerate(values):
        w.add(start + i * SAMPLE_S, u, keep_s=1000)
    return w


def test_scales_up_once_the_target_holds_for_most_of_the_window():
    high = _window([0.9] * 12)
    assert decide(high, now=11.0, count=1, minimum=1, maximum=4, cfg=CFG) == 1
    assert decide(high, now=11.0, count=4, minimum=1, maximum=4, cfg=CFG) == 0  # at the max
    short = _window([0.9] * 5)  # not yet up_after_s of samples
    assert decide(short, now=4.0, count=1, minimum=1, maximum=4, cfg=CFG) == 0
    spiky = _window([0.0] * 8 + [3.0])  # one burst: most of the window is what counts
    assert decide(spiky, now=8.0, count=1, minimum=1, maximum=4, cfg=CFG) == 0
    mean_over = _window([0.5, 1.1] * 6)
    assert decide(mean_over, now=11.0, count=1, minimum=1, maximum=4, cfg=CFG) == 1


def test_scales_down_only_when_the_whole_window_stays_low_and_above_the_minimum():
    low = CFG.target * DOWN_FRACTION * 0.9
    quiet = _window([low] * 61)
    assert decide(quiet, now=60.0, count=2, minimum=1, maximum=4, cfg=CFG) == -1
    assert decide(quiet, now=60.0, count=1, minimum=1, maximum=4, cfg=CFG) == 0
    one_busy_second = _window([low] * 30 + [CFG.target * DOWN_FRACTION] + [low] * 30)
    assert decide(one_busy_second, now=60.0, count=2, minimum=1, maximum=4, cfg=CFG) == 0
    young = _window([0.0] * 30)
    assert decide(young, now=29.0, count=2, minimum=1, maximum=4, cfg=CFG) == 0


def test_no_decision_while_a_failed_scale_backs_off():
    w = _window([2.0] * 12)
    w.retry_at = 50.0
    assert decide(w, now=11.0, count=1, minimum=1, maximum=4, cfg=CFG) == 0
    assert decide(w, now=50.0, count=1, minimum=1, maximum=4, cfg=CFG) == 0  # window too old
    w.add(50.0, 2.0, keep_s=1000)
    assert decide(w, now=50.0, count=1, minimum=1, maximum=4, cfg=CFG) == 1


def test_utilization_of_each_role_from_the_router_accounting():
    loads = [
        RankLoad("prefill", True, 1000, num_queued_prefill_tokens=3000),
        RankLoad("prefill", True, 1000, num_queued_prefill_tokens=1000),
        RankLoad("prefill", False, 1000, num_queued_prefill_tokens=9999),  # dead or draining
        RankLoad("decode", True, 1000, num_reserved_tokens=900),
        RankLoad("decode", True, 3000, num_reserved_tokens=100),
    ]
    assert utilization(loads, "prefill", prefill_step_tokens=1000) == pytest.approx(1.0)
    assert utilization(loads, "decode", prefill_step_tokens=1000) == pytest.approx(0.25)
    assert utilization(loads, "colocated", prefill_step_tokens=1000) is None


def test_the_ranks_reports_raise_the_accounting_to_what_front_routers_sent():
    from workers.engine.rank_reports import RankStats

    def held(reserved: int, unstarted: int) -> RankStats:
        return RankStats(0, 0, 0, 0, 0, 0, num_reserved_tokens=reserved,
                         num_unstarted_prompt_tokens=unstarted)  # fmt: skip

    loads = [
        RankLoad("prefill", True, 1000, num_queued_prefill_tokens=500),
        RankLoad("decode", True, 1000, num_reserved_tokens=300),
        RankLoad("decode", True, 1000, num_reserved_tokens=700),
    ]
    # Front routers' requests on the first two ranks; the third answered no stats.
    raised = with_reported(loads, [held(0, 2500), held(900, 0), None])
    assert utilization(raised, "prefill", prefill_step_tokens=1000) == pytest.approx(1.25)
    assert utilization(raised, "decode", prefill_step_tokens=1000) == pytest.approx(0.8)
    # What the router counts and the rank has not reported yet still counts.
    assert with_reported(loads, [held(0, 100), held(200, 0), None]) == loads


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_decode_instances": 0}, "--max-decode-instances must be in [1, 256]"),
        ({"decode_instances": 3, "max_decode_instances": 2}, "below the instances it starts"),
        ({"max_instances": 2}, "--max-instances does not apply to a disaggregated"),
        ({"colocated": True, "max_prefill_instances": 2}, "does not apply to a colocated"),
        ({"autoscale_target": 0.0}, "--autoscale-target"),
        ({"autoscale_target": float("nan")}, "--autoscale-target"),
        ({"autoscale_up_after_s": -1.0}, "--autoscale-up-after"),
        ({"autoscale_down_after_s": float("inf")}, "--autoscale-down-after"),
    ],
)
def test_autoscale_settings_are_checked(fields: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServeConfig(**fields)  # type: ignore[arg-type]


def test_a_server_adds_a_decode_instance_under_load_and_drops_it_when_idle(launch_tiny):
    from workers.engine.config import EngineConfig

    token = "admin-token-autoscale"
    engine = EngineConfig(page_size=16, kv_capacity_tokens=1024, device="cpu",
                          preload_structured_output=False)  # fmt: skip
    server = launch_tiny(
        engine=engine, admin_token=token, max_decode_instances=2, autoscale_up_after_s=1.0,
        autoscale_down_after_s=2.0,
    )  # fmt: skip
    url, auth = server.url, {"Authorization": f"Bearer {token}"}

    def pools() -> dict[str, Any]:
        return httpx.get(f"{url}/admin/pools", headers=auth, timeout=30).json()

    try:
        answer = pools()
        assert answer["autoscale"] == {
            "decode": {"min": 1, "max": 2, "instances": 1, "utilization": 0.0,
                       "scaled_up": 0, "scaled_down": 0}
        }  # fmt: skip
        prompts = [[(5 * i + k) % 900 + 3 for k in range(40)] for i in range(6)]
        want = asyncio.run(_stream_all(url, prompts[:2], 8))
        # Each request reserves 40 + 400 tokens: six of them want 2.6x the decode KV cache.
        stop = threading.Event()
        errors: list[str] = []

        def load() -> None:
            body = lambda p: {"input_ids": p, "sampling_params": _greedy(400)}  # noqa: E731
            with httpx.Client(timeout=240) as client:
                for p in itertools.cycle(prompts):
                    if stop.is_set():
                        return
                    r = client.post(f"{url}/generate", json=body(p))
                    if r.status_code != 200:
                        errors.append(r.text)

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while "decode-1" not in {p["name"] for p in pools()["pools"] if p["state"] == "serving"}:
            assert time.monotonic() < deadline, pools()
            time.sleep(0.2)
        assert _metric(url, "pdserve_pool_utilization", role="decode") > 0
        time.sleep(2.0)  # both instances serve under the load
        stop.set()
        for t in threads:
            t.join(240)
        assert not errors, errors[:3]
        autoscaler = server.http.app.state.autoscaler
        deadline = time.monotonic() + 90
        while autoscaler.num_down < 1:
            assert time.monotonic() < deadline, pools()
            time.sleep(0.2)
        assert {p["name"] for p in pools()["pools"]} == {"prefill-0", "decode-0"}
        assert (autoscaler.num_up, autoscaler.num_down) == (1, 1)
        scaled = pools()["autoscale"]["decode"]
        assert (scaled["scaled_up"], scaled["scaled_down"]) == (1, 1)
        assert _metric(url, "pdserve_pool_instances_started_total", role="decode") == 1
        assert _metric(url, "pdserve_pool_instances_removed_total", role="decode") == 1
        assert asyncio.run(_stream_all(url, prompts[:2], 8)) == want
        _wait_all_pages_free(url)
    finally:
        server.stop()


def test_prefill_does_not_grow_while_decode_is_saturated():
    cfg = AutoscaleConfig({"prefill": 4}, target=0.8, up_after_s=10.0)
    busy = _window([2.0] * 12)
    assert decide(busy, 11.0, 1, 1, 4, cfg, may_grow=False) == 0
    assert decide(busy, 11.0, 1, 1, 4, cfg, may_grow=True) == 1


def test_the_autoscaled_roles_are_listed_over_http_and_grpc(launch_tiny, capsys):
    import grpc

    from orchestrator.cli import main
    from proto import pdserve_pb2 as pb
    from proto import pdserve_pb2_grpc as pb_grpc

    token = "admin-token-autoscale"
    server = launch_tiny(admin_token=token, grpc_port=0, max_decode_instances=3,
                         autoscale_up_after_s=600.0)  # fmt: skip
    try:
        assert main(["scale", "--url", server.url, "--token", token]) == 0
        out = capsys.readouterr().out
        assert "decode: autoscaled between 1 and 3 instances; utilization 0.00" in out, out
        assert "prefill: autoscaled" not in out
        with grpc.insecure_channel(server.grpc_address) as channel:
            reply = pb_grpc.GenerationStub(channel).Pools(
                pb.PoolsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=30
            )
        (role,) = reply.autoscale
        assert (role.role, role.min_instances, role.max_instances, role.instances) == (
            "decode", 1, 3, 1
        )  # fmt: skip
        assert role.HasField("utilization") and role.utilization == 0.0
        assert main(["scale", "--grpc", server.grpc_address, "--token", token]) == 0
        assert "decode: autoscaled between 1 and 3" in capsys.readouterr().out
        # A manual scale keeps within the autoscaler's bounds.
        auth = {"Authorization": f"Bearer {token}"}
        resp = httpx.post(f"{server.url}/admin/scale", json={"decode": 4}, headers=auth)
        assert resp.status_code == 400 and "between 1 and 3" in resp.text, resp.text
        assert resp.json()["error"]["param"] == "decode"
    finally:
        server.stop()


def test_a_burst_shorter_than_half_the_window_does_not_scale_up():
    burst = _window([0.0] * 8 + [50.0] * 4)  # requests queued far past capacity, briefly
    assert decide(burst, now=11.0, count=1, minimum=1, maximum=4, cfg=CFG) == 0
    held = _window([0.0] * 5 + [0.9] * 7)  # over half the window at the target
    assert decide(held, now=11.0, count=1, minimum=1, maximum=4, cfg=CFG) == 1


class _Pools:
    """A `PoolSet` as the autoscaler reads it."""

    def __init__(self, counts: dict[str, int]):
        self.now = dict(counts)
        self.bounds: dict[str, tuple[int, int]] = {}
        self.scaling = self.stopped = False
        self.deployment = None

    def counts(self) -> dict[str, int]:
        return dict(self.now)


def test_the_minimum_is_the_count_the_server_started_with_after_a_take_over():
    """A router that takes over a deployment autoscaled to 3 decode instances (it started with
    1): the minimum stays 1, so that it may scale back down. (Found by an audit: it became 3,
    and with 4 found the role was no longer autoscaled at all.)"""
    from orchestrator.autoscale import Autoscaler

    cfg = AutoscaleConfig({"decode": 4}, min_instances=ServeConfig().start_counts())
    for found in (3, 4):
        pools = _Pools({"prefill": 1, "decode": found})
        scaler = Autoscaler(pools, None, None, cfg, 2048, 30.0)  # type: ignore[arg-type]
        assert scaler.minimum == {"prefill": 1, "decode": 1} and scaler.roles == ["decode"]
        assert pools.bounds == {"decode": (1, 4)}
    # Without the starting counts (or below them), what it found.
    scaler = Autoscaler(_Pools({"decode": 2}), None, None, CFG, 2048, 30.0)  # type: ignore[arg-type]
    assert scaler.minimum == {"decode": 2}


def test_the_samples_start_again_when_the_counts_change_by_another_hand(monkeypatch):
    """An admin's scale (or a replacement) changes a role's count: the samples taken at the
    old capacity are dropped, so that the next decision sees only the new one. (Found by an
    audit: a scale from 2 to 4 was followed by a fifth instance on the old samples.)"""
    import orchestrator.autoscale as autoscale

    monkeypatch.setattr(autoscale, "SAMPLE_S", 0.01)
    pools = _Pools({"decode": 2})
    load = RankLoad("decode", True, 1000, num_reserved_tokens=900)  # utilization 0.9
    router = type(
        "R", (), {"draining": False, "ranks": type("T", (), {"loads": lambda self: [load]})()}
    )()
    slow = AutoscaleConfig({"decode": 8}, up_after_s=3600.0, down_after_s=3600.0)
    scaler = autoscale.Autoscaler(pools, router, None, slow, 2048, 30.0)  # type: ignore[arg-type]

    async def run() -> None:
        scaler.start()
        window = scaler.windows["decode"]
        for _ in range(200):
            if len(window.samples) >= 5:
                break
            await asyncio.sleep(0.01)
        assert len(window.samples) >= 5
        pools.now = {"decode": 4}
        changed = time.monotonic()
        await asyncio.sleep(0.1)
        assert window.samples and window.samples[0][0] >= changed  # afresh
        await scaler.stop()

    asyncio.run(run())
