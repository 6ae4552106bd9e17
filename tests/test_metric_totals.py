"""`orchestrator.cluster_metrics.Totals`: counters read from per-rank counts stay monotonic
when a rank restarts (its counts begin again at 0) or goes away (scaled down), and render as
Prometheus counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.cluster_metrics import Totals
from orchestrator.metrics import Metrics


def test_a_restarted_source_keeps_its_earlier_count():
    t = Totals("x_total", "doc", ["side"])
    t.observe("rank-0", 5, "send")
    t.observe("rank-1", 3, "send")
    assert t.value("send") == 8
    t.observe("rank-0", 1, "send")  # restarted: counts from 0 again
    assert t.value("send") == 9
    t.observe("rank-0", 4, "send")
    assert t.value("send") == 12
    assert t.value("receive") == 0


def test_a_source_no_longer_heard_from_stays_in_the_total():
    t = Totals("x_total", "doc")
    t.observe("rank-0", 2)
    t.observe("rank-1", 7)
    for _ in range(3):  # rank-1 was removed: only rank-0 reports from now on
        t.observe("rank-0", 4)
    assert t.value() == 11


def test_totals_render_as_counters_with_their_names():
    registry = CollectorRegistry()
    t = Totals("pdserve_things_total", "Things", ["pool"], registry=registry)
    t.observe("eplb", 2, "decode-0")
    (family,) = text_string_to_metric_families(generate_latest(registry).decode())
    assert family.type == "counter" and family.name == "pdserve_things"
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("pdserve_things_total", {"pool": "decode-0"}, 2.0)
    ]


def test_pool_gauges_of_pools_gone_are_dropped():
    m = Metrics()
    stats = {"balancedness": 0.9, "rebalances": 2.0, "experts_moved": 5.0, "last_pause_s": 0.1}
    m.cluster.set_eplb_stats({"decode-0": stats, "decode-1": stats})
    m.cluster.set_eplb_stats({"decode-1": {**stats, "rebalances": 3.0}})
    text = m.render().decode()
    assert 'pdserve_eplb_balancedness{pool="decode-0"}' not in text
    assert 'pdserve_eplb_rebalances_total{pool="decode-0"} 2.0' in text  # a counter stays
    assert 'pdserve_eplb_rebalances_total{pool="decode-1"} 3.0' in text
    m.cluster.set_pools([
        {"role": "decode", "state": "serving"}, {"role": "decode", "state": "draining"},
        {"role": "prefill", "state": "serving"},
    ])  # fmt: skip
    assert 'pdserve_pool_instances{role="decode",state="serving"} 1.0' in m.render().decode()
    assert 'pdserve_pool_instances{role="prefill",state="draining"} 0.0' in m.render().decode()
