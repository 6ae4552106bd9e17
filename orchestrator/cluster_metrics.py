"""The cluster's side of a server's Prometheus metrics: the ranks' stats (KV pages, prefix
cache, speculative decoding, preemption, KV transfers, garbage collection), the pools'
instances and utilization, the router's retries and moves, and the EPLB service's counters,
all read from their sources when `/metrics` is scraped (`orchestrator.ops_routes`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from workers import gc_pauses
from workers.engine.rank_reports import TRANSFER_FIELDS, RankStats

POOL_STATES = ("starting", "serving", "draining")


class Totals(Collector):
    """A Prometheus counter whose values are read from counts kept elsewhere — each rank's
    stats, the router's, the EPLB service's — by `source` (a process that counts since it
    started: a rank, the router). The total stays monotonic as a counter must: when a source's
    count goes down it started again (a rank restarted), and its earlier count is kept; a
    source that is not heard from any more (a rank whose instance was scaled down) keeps its
    last count in the total."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ):
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._ended: dict[tuple[str, ...], float] = {}  # labels -> counts of ended sources
        self._last: dict[tuple[tuple[str, ...], str], float] = {}  # (labels, source) -> count
        if registry is not None:
            registry.register(self)

    def observe(self, source: str, value: float, *labels: str) -> None:
        """`source`'s count now (for these label values)."""
        key = (labels, source)
        last = self._last.get(key, 0.0)
        if value < last:  # the source started counting again
            self._ended[labels] = self._ended.get(labels, 0.0) + last
        self._last[key] = value

    def value(self, *labels: str) -> float:
        return self._ended.get(labels, 0.0) + sum(
            v for (lab, _), v in self._last.items() if lab == labels
        )

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels in sorted({lab for lab, _ in self._last} | set(self._ended)):
            family.add_metric(list(labels), self.value(*labels))
        return [family]


class ClusterMetrics:
    """Gauges and totals of what the server's parts report, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self._eplb_pools: set[str] = set()  # the pools of the last EPLB reading
        self.running = Gauge(
            "pdserve_num_running_requests", "Requests in the running batch", registry=r
        )
        self.queued = Gauge(
            "pdserve_num_queued_requests", "Requests waiting for admission", registry=r
        )
        self.pages_used = Gauge("pdserve_kv_pages_used", "KV cache pages in use", registry=r)
        self.pages_free = Gauge("pdserve_kv_pages_free", "KV cache pages free", registry=r)
        self.pages_cached = Gauge(
            "pdserve_kv_pages_cached", "Free KV pages that still hold a cached prefix", registry=r
        )
        self.pages_held = Gauge(
            "pdserve_kv_pages_held",
            "KV pages in use by no request: failed receives' pages held until their sending rank "
            "cannot write them any more",
            registry=r,
        )
        self.prefix_queried = Totals(
            "pdserve_prefix_cache_queried_tokens_total",
            "Prompt tokens looked up in the ranks' prefix caches", registry=r,
        )  # fmt: skip
        self.prefix_hits = Totals(
            "pdserve_prefix_cache_hit_tokens_total",
            "Prompt tokens found in the ranks' prefix caches (not computed again)",
            registry=r,
        )
        self.prefix_host_hits = Totals(
            "pdserve_prefix_cache_host_hit_tokens_total",
            "Of the prompt tokens found in the prefix caches, those found in the host tier "
            "(--prefix-cache-host-space) and copied back",
            registry=r,
        )
        self.prefix_host_pages = Gauge(
            "pdserve_prefix_cache_host_pages",
            "KV pages in the prefix caches' host tier now",
            registry=r,
        )
        self.spec_drafted = Totals(
            "pdserve_spec_draft_tokens_total",
            "Speculative decoding (--speculative-ngram): tokens guessed", registry=r,
        )  # fmt: skip
        self.spec_accepted = Totals(
            "pdserve_spec_accepted_tokens_total",
            "Of the tokens guessed, those the model's own choices confirmed (output without a "
            "step of their own)",
            registry=r,
        )
        self.transfer_skipped = Totals(
            "pdserve_kv_transfer_skipped_tokens_total",
            "Prompt tokens whose KV the decode ranks' prefix caches held (not transferred)",
            registry=r,
        )
        self.kv_parked = Totals(
            "pdserve_kv_parked_total",
            "Computed prompts whose pages a prefill rank took back for a prompt with decode pages "
            "reserved (computed again once their own decode pages are)",
            registry=r,
        )
        self.preemptions = Totals(
            "pdserve_preemptions_total",
            "Running requests put back in the queue for lack of KV pages (their KV swapped to "
            "host memory, or recomputed later)",
            registry=r,
        )
        self.kv_swapped_out = Totals(
            "pdserve_kv_swapped_out_total",
            "Of the preempted requests, those whose KV went to host memory (--kv-swap-space): "
            "they resume without computing their tokens again",
            registry=r,
        )
        self.kv_swapped_tokens = Gauge(
            "pdserve_kv_swapped_tokens",
            "Tokens of preempted requests' KV held in host memory now",
            registry=r,
        )
        self.kv_transfers = Totals(
            "pdserve_kv_transfers_total",
            "KV transfers ended on the ranks, by side (send: prefill ranks, receive: "
            "decode ranks) and outcome (ok, failed)",
            ["side", "outcome"], registry=r,
        )  # fmt: skip
        self.kv_transfer_bytes = Totals(
            "pdserve_kv_transfer_bytes_total", "KV bytes moved by the successful transfers, by side",
            ["side"], registry=r,
        )  # fmt: skip
        self.kv_transfer_seconds = Totals(
            "pdserve_kv_transfer_seconds_total",
            "Seconds of the successful transfers from start to end, by side (a receive's include "
            "the wait for its prompt; divide by the ok count for the mean)",
            ["side"], registry=r,
        )  # fmt: skip
        self.kv_transfers_ahead = Totals(
            "pdserve_kv_transfers_written_ahead_total",
            "Successful sends whose layers a prefill rank wrote to the decode rank as it computed "
            "them (the rest: all layers after the prefill; see --disable-kv-write-ahead)",
            registry=r,
        )
        self.ranks_ready = Gauge("pdserve_ranks_ready", "Engine ranks ready to serve", registry=r)
        self.pool_utilization = Gauge(
            "pdserve_pool_utilization",
            "Load of a role's serving ranks as the autoscaler sees it: decode/colocated, KV "
            "tokens reserved over capacity; prefill, queued prompt tokens over two steps' worth",
            ["role"], registry=r,
        )  # fmt: skip
        self.pool_started = Totals(
            "pdserve_pool_instances_started_total",
            "Pool instances started while serving (pdserve scale, the autoscaler), by role",
            ["role"], registry=r,
        )  # fmt: skip
        self.pool_removed = Totals(
            "pdserve_pool_instances_removed_total",
            "Pool instances drained and removed while serving, by role", ["role"], registry=r,
        )  # fmt: skip
        self.pool_replaced = Totals(
            "pdserve_pool_instances_replaced_total",
            "Pool instances replaced because a rank of theirs was dead for good, by role",
            ["role"], registry=r,
        )  # fmt: skip
        self.pool_instances = Gauge(
            "pdserve_pool_instances",
            "Pool instances by role and state (starting, serving, draining: see pdserve scale)",
            ["role", "state"], registry=r,
        )  # fmt: skip
        self.retries = Totals(
            "pdserve_request_retries_total",
            "Requests re-run on another rank (pair) after a failure before their first token",
            registry=r,
        )
        self.resumed = Totals(
            "pdserve_requests_resumed_total",
            "Requests that went on on another rank (pair) from the output they had, after "
            "their rank failed or was scaled down",
            registry=r,
        )
        self.migrated = Totals(
            "pdserve_requests_migrated_total",
            "Requests that moved to another rank with their KV (their instance was scaled "
            "down, one joined, or their rank's KV ran out), nothing computed again",
            registry=r,
        )
        self.kv_pressure_moves = Totals(
            "pdserve_kv_pressure_moves_total",
            "Requests asked to move to another rank with their KV because their rank's KV ran "
            "out (--kv-pressure-interval)",
            registry=r,
        )
        self.rank_failures = Totals(
            "pdserve_rank_failures_total", "Times an engine rank was found dead or failed",
            registry=r,
        )  # fmt: skip
        self.draining = Gauge(
            "pdserve_draining", "1 while the server drains its requests to shut down", registry=r
        )
        self.waiting_first_token = Gauge(
            "pdserve_requests_waiting_first_token",
            "Requests in flight without their first token yet (queued on a rank, or in prefill)",
            registry=r,
        )
        self.waiting_for_rank = Gauge(
            "pdserve_requests_waiting_for_rank",
            "Requests whose rank failed, with no other to go on on, waiting for a rank to come "
            "back (--rank-restart-wait)",
            registry=r,
        )
        self.waited_for_rank = Totals(
            "pdserve_requests_waited_for_rank_total",
            "Requests that waited for a rank to come back (its restart, or the replacement of "
            "its instance) because no other could take them on",
            registry=r,
        )
        self.shed = Totals(
            "pdserve_requests_shed_total",
            "Requests refused with 503 because --max-queued-requests were waiting",
            registry=r,
        )
        self.eplb_balancedness = Gauge(
            "pdserve_eplb_balancedness",
            "Mean/max per-rank expert load over the recorded window, per pool (NaN: no load yet)",
            ["pool"],
            registry=r,
        )  # fmt: skip
        self.eplb_rebalances = Totals(
            "pdserve_eplb_rebalances_total", "Expert rebalances done, per pool", ["pool"],
            registry=r,
        )  # fmt: skip
        self.eplb_experts_moved = Totals(
            "pdserve_eplb_experts_moved_total", "Expert slots moved by rebalances, per pool",
            ["pool"], registry=r,
        )  # fmt: skip
        self.gc_seconds = Totals(
            "pdserve_gc_seconds_total",
            "Seconds spent in Python's garbage collector, per process (router, rank-N)",
            ["process"], registry=r,
        )  # fmt: skip
        self.router_cpu = Totals(
            "pdserve_router_cpu_seconds_total",
            "CPU seconds of this router's process, all its threads (near one a second: the "
            "router is the limit; add front routers, --front)",
            registry=r,
        )  # fmt: skip
        self.gc_longest = Gauge(
            "pdserve_gc_longest_pause_seconds",
            "The longest garbage collection pause so far, per process (router, rank-N)",
            ["process"], registry=r,
        )  # fmt: skip
        self.eplb_pause = Gauge(
            "pdserve_eplb_last_pause_seconds", "Pause of the last rebalance's execute phase",
            ["pool"], registry=r,
        )  # fmt: skip

    def set_rank_stats(
        self, stats: Sequence[RankStats | None], final: Mapping[int, RankStats] | None = None
    ) -> None:
        """Each rank's stats by index (None: not ready, not answering, or removed); `final`:
        the removed ranks' last stats, whose counts stay in the totals."""
        live = [s for s in stats if s is not None]
        self.ranks_ready.set(len(live))
        self.running.set(sum(s.num_running for s in live))
        self.queued.set(sum(s.num_waiting for s in live))
        self.pages_used.set(sum(s.num_pages_used for s in live))
        self.pages_free.set(sum(s.num_pages_free for s in live))
        self.pages_cached.set(sum(s.num_pages_cached for s in live))
        self.pages_held.set(sum(s.num_pages_held for s in live))
        self.kv_swapped_tokens.set(sum(s.num_swapped_tokens for s in live))
        self.prefix_host_pages.set(sum(s.num_host_cached_pages for s in live))
        router = gc_pauses.PROCESS
        self.gc_seconds.observe("router", router.seconds, "router")
        self.router_cpu.observe("router", time.process_time())
        self.gc_longest.labels("router").set(router.longest_s)
        for i, s in [*enumerate(stats), *(final or {}).items()]:
            if s is None:
                continue
            rank = f"rank-{i}"
            self.prefix_queried.observe(rank, s.num_prefix_queried_tokens)
            self.prefix_hits.observe(rank, s.num_prefix_hit_tokens)
            self.prefix_host_hits.observe(rank, s.num_prefix_host_hit_tokens)
            self.spec_drafted.observe(rank, s.num_spec_draft_tokens)
            self.spec_accepted.observe(rank, s.num_spec_accepted_tokens)
            self.transfer_skipped.observe(rank, s.num_transfer_skipped_tokens)
            self.kv_parked.observe(rank, s.num_parked)
            self.preemptions.observe(rank, s.num_preemptions)
            self.kv_swapped_out.observe(rank, s.num_swapped_out)
            for side, fields in TRANSFER_FIELDS.items():
                ok, failed, moved, took = (getattr(s.transfers, f) for f in fields)
                self.kv_transfers.observe(rank, ok, side, "ok")
                self.kv_transfers.observe(rank, failed, side, "failed")
                self.kv_transfer_bytes.observe(rank, moved, side)
                self.kv_transfer_seconds.observe(rank, took, side)
            self.kv_transfers_ahead.observe(rank, s.transfers.sent_ahead)
            self.gc_seconds.observe(rank, s.gc_seconds, rank)
            self.gc_longest.labels(rank).set(s.gc_longest_pause_s)

    def set_utilization(self, by_role: dict[str, float | None]) -> None:
        for role, u in by_role.items():
            if u is not None:
                self.pool_utilization.labels(role).set(u)

    def set_scale_counts(
        self,
        started: Mapping[str, int],
        removed: Mapping[str, int],
        replaced: Mapping[str, int] | None = None,
    ) -> None:
        for role, n in started.items():
            self.pool_started.observe("router", n, role)
        for role, n in removed.items():
            self.pool_removed.observe("router", n, role)
        for role, n in (replaced or {}).items():
            self.pool_replaced.observe("router", n, role)

    def set_pools(self, pools: Sequence[dict[str, Any]]) -> None:
        """The pool instances (`PoolSet.describe`)."""
        counts: dict[tuple[str, str], int] = {}
        for p in pools:
            counts[p["role"], p["state"]] = counts.get((p["role"], p["state"]), 0) + 1
        for role in {p["role"] for p in pools}:
            for state in POOL_STATES:
                self.pool_instances.labels(role, state).set(counts.get((role, state), 0))

    def set_router_stats(
        self,
        retries: int,
        resumed: int,
        rank_failures: int,
        draining: bool,
        queued: int,
        shed: int,
        waiting_for_rank: int = 0,
        waited_for_rank: int = 0,
        migrated: int = 0,
        kv_pressure_moves: int = 0,
    ) -> None:
        self.retries.observe("router", retries)
        self.migrated.observe("router", migrated)
        self.kv_pressure_moves.observe("router", kv_pressure_moves)
        self.resumed.observe("router", resumed)
        self.rank_failures.observe("router", rank_failures)
        self.draining.set(int(draining))
        self.waiting_first_token.set(queued)
        self.shed.observe("router", shed)
        self.waiting_for_rank.set(waiting_for_rank)
        self.waited_for_rank.observe("router", waited_for_rank)

    def set_eplb_stats(self, stats: dict[str, dict[str, float]]) -> None:
        """The EPLB service's counters per pool; a pool scaled down (`removed`) keeps its
        counters and loses its gauges."""
        serving = {pool for pool, st in stats.items() if not st.get("removed")}
        for pool, st in stats.items():
            self.eplb_rebalances.observe("eplb", st["rebalances"], pool)
            self.eplb_experts_moved.observe("eplb", st["experts_moved"], pool)
            if pool in serving:
                self.eplb_balancedness.labels(pool).set(st["balancedness"])
                self.eplb_pause.labels(pool).set(st["last_pause_s"])
        for pool in self._eplb_pools - serving:  # scaled down: no reading any more
            self.eplb_balancedness.remove(pool)
            self.eplb_pause.remove(pool)
        self._eplb_pools = serving
