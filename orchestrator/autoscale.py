"""Autoscaling: the router adds and removes pool instances by their load (`--max-*-instances`).

Each role whose maximum is above its starting count is watched; the starting count
(`--prefill-instances`, `--decode-instances`; one colocated) is its minimum, also for a router
that takes a deployment over after earlier scales. Every `SAMPLE_S` the router samples each role's utilization from its own accounting
(exact and current: what it sent each rank, not stats polled from the ranks) — with
`--deployment`, raised to what each rank reports holding (`with_reported`), which counts the
requests of the deployment's front routers too — over the ranks of its serving instances:

- decode and colocated: the KV tokens reserved (prompt + `max_new_tokens` of every request the
  ranks hold or queue) over the ranks' KV capacity — above 1 when requests wait for room;
- prefill: the prompt tokens queued per rank over two engine steps' worth
  (2 × `--chunked-prefill-size`) — prompts waiting longer than about two steps.

A role whose median utilization over the last `up_after_s` is at or above `target` (0.8) —
the load held for at least half of that time, so that a short burst (whose samples may run far
above 1) does not start an instance that would be ready only after it — gets one more instance (prefill only while decode is below the target: prompts also back up on the
prefill ranks while the decode side has no room for them, and more prefill would not help); one whose utilization stayed below `target × DOWN_FRACTION` for the whole of the
last `down_after_s` loses its newest instance (drained first, as `pdserve scale` does), never
below its minimum. A role's samples start again after it scaled, so each decision sees only the
capacity it then has; a scale that fails (no room in the cluster within
`--placement-timeout`) is tried again after `RETRY_S`. A manual scale meanwhile is left alone
(the autoscaler waits for it); its counts then count as the current ones, within the bounds,
and the samples start again, as after a replacement.

`decide` is the policy, a pure function; `Autoscaler` runs it on the router's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.policy import RankLoad
from orchestrator.pools import PoolSet
from orchestrator.scaling import ScaleInProgress

logger = logging.getLogger(__name__)

SAMPLE_S = 1.0
DOWN_FRACTION = 0.4  # scale down below target × this: well clear of scaling up again
RETRY_S = 60.0  # after a scale that failed


@dataclass(frozen=True)
class AutoscaleConfig:
    max_instances: Mapping[str, int]  # per role (a role missing, or at its minimum: not scaled)
    target: float = 0.8
    up_after_s: float = 30.0
    down_after_s: float = 300.0
    # The instances per role the server was started with: the minimum (a router that takes
    # a deployment over finds more after earlier scales; they do not raise it).
    min_instances: Mapping[str, int] | None = None


@dataclass
class RoleWindow:
    """One role's recent utilization samples (time, utilization), oldest first."""

    samples: deque[tuple[float, float]] = field(default_factory=deque)
    retry_at: float = 0.0  # no scale before this (after a failed one)

    def add(self, now: float, utilization: float, keep_s: float) -> None:
        self.samples.append((now, utilization))
        while self.samples and self.samples[0][0] < now - keep_s:
            self.samples.popleft()

    def since(self, now: float, seconds: float) -> list[float] | None:
        """The samples of the last `seconds`; None unless the window covers that long."""
        if not self.samples or self.samples[0][0] > now - seconds + SAMPLE_S:
            return None
        return [u for t, u in self.samples if t >= now - seconds]


def decide(
    window: RoleWindow,
    now: float,
    count: int,
    minimum: int,
    maximum: int,
    cfg: AutoscaleConfig,
    may_grow: bool = True,
) -> int:
    """+1 (one more instance), -1 (one fewer) or 0, for a role of `count` instances;
    `may_grow` false holds it from growing (prefill while decode is saturated)."""
    if now < window.retry_at:
        return 0
    recent = window.since(now, cfg.up_after_s)
    if may_grow and count < maximum and recent and statistics.median(recent) >= cfg.target:
        return 1
    longer = window.since(now, cfg.down_after_s)
    if count > minimum and longer and max(longer) < cfg.target * DOWN_FRACTION:
        return -1
    return 0


def with_reported(loads: Sequence[RankLoad], stats: Sequence[Any]) -> list[RankLoad]:
    """`loads` (this router's accounting) raised to what each rank reports holding (`stats`,
    `RankStats` or None per rank): a deployment's front routers (`orchestrator.front`) send
    the ranks requests that this router does not count."""
    out = []
    for load, st in zip(loads, stats, strict=True):
        if st is not None:
            load = load._replace(
                num_reserved_tokens=max(load.num_reserved_tokens, st.num_reserved_tokens),
                num_queued_prefill_tokens=max(
                    load.num_queued_prefill_tokens, st.num_unstarted_prompt_tokens
                ),
            )
        out.append(load)
    return out


def utilization(loads: Sequence[Any], role: str, prefill_step_tokens: int) -> float | None:
    """A role's utilization (see the module doc) from `RankTable.loads()` of its serving
    ranks; None when it has no live rank."""
    mine = [load for load in loads if load.role == role and load.alive]
    if not mine:
        return None
    if role == "prefill":
        queued = sum(load.num_queued_prefill_tokens for load in mine)
        return queued / (len(mine) * 2 * prefill_step_tokens)
    capacity = sum(load.kv_capacity_tokens for load in mine)
    return sum(load.num_reserved_tokens for load in mine) / max(1, capacity)


class Autoscaler:
    """Runs `decide` per role every `SAMPLE_S` and scales through `PoolSet.scale`."""

    def __init__(
        self,
        pools: PoolSet,
        router: Any,
        eplb: Any,
        cfg: AutoscaleConfig,
        prefill_step_tokens: int,
        drain_timeout_s: float,
    ):
        counts = pools.counts()
        self.pools, self.router, self.eplb, self.cfg = pools, router, eplb, cfg
        least = cfg.min_instances or {}
        # (Not lowered to what a take-over found: the deployment's own minimum stays.)
        self.minimum = {role: max(1, least.get(role, n)) for role, n in counts.items()}
        self._counts = counts  # at the last sample: samples start again when they change
        self.maximum = {role: max(counts[role], cfg.max_instances.get(role, 0)) for role in counts}
        self.prefill_step_tokens = prefill_step_tokens
        self.drain_timeout_s = drain_timeout_s
        self.windows = {role: RoleWindow() for role in counts}
        self.last: dict[str, float | None] = dict.fromkeys(counts)  # the latest utilization
        self.num_up_by = dict.fromkeys(counts, 0)  # the instances it added, by role
        self.num_down_by = dict.fromkeys(counts, 0)
        self._task: asyncio.Task[None] | None = None
        self._scaling: asyncio.Task[None] | None = None  # its scale that runs
        # Manual scales keep within the bounds too.
        pools.bounds.update({r: (self.minimum[r], self.maximum[r]) for r in self.roles})

    @property
    def num_up(self) -> int:
        return sum(self.num_up_by.values())

    @property
    def num_down(self) -> int:
        return sum(self.num_down_by.values())

    @property
    def roles(self) -> list[str]:
        """The roles it may scale."""
        return [r for r in self.minimum if self.maximum[r] > self.minimum[r]]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="autoscaler")

    async def stop(self) -> None:
        for task in (self._task, self._scaling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._scaling = None

    def describe(self) -> dict[str, Any]:
        """Per role scaled: bounds, instances, utilization now (for `/admin/pools`)."""
        counts, loads = self.pools.counts(), self.router.ranks.loads()
        return {
            role: {"min": self.minimum[role], "max": self.maximum[role],
                   "instances": counts.get(role, 0),
                   "utilization": utilization(loads, role, self.prefill_step_tokens),
                   "scaled_up": self.num_up_by[role], "scaled_down": self.num_down_by[role]}
            for role in self.roles
        }  # fmt: skip

    async def _run(self) -> None:
        keep_s = max(self.cfg.up_after_s, self.cfg.down_after_s) + SAMPLE_S
        while True:
            await asyncio.sleep(SAMPLE_S)
            if self.router.draining or self.pools.stopped:
                return
            loads = self.router.ranks.loads()
            if self.pools.deployment is not None:  # it may have front routers
                loads = with_reported(loads, await self.router.ranks.stats())
            now = time.monotonic()
            for role in self.minimum:
                self.last[role] = utilization(loads, role, self.prefill_step_tokens)
            if self.pools.scaling or (self._scaling and not self._scaling.done()):
                continue  # a scale (its own or an admin's) runs: the load will change
            counts = self.pools.counts()
            if counts != self._counts:  # an admin's scale or a replacement: judge afresh
                self._counts = counts
                for w in self.windows.values():
                    w.samples.clear()
            for role in self.roles:
                u = self.last[role]
                if u is None:
                    continue
                window = self.windows[role]
                window.add(now, u, keep_s)
                count = counts[role]
                # Prompts back up on the prefill ranks while the decode side has no room for
                # them: more prefill would not help then.
                decode = self.last.get("decode")
                may_grow = role != "prefill" or decode is None or decode < self.cfg.target
                step = decide(window, now, count, self.minimum[role], self.maximum[role],
                              self.cfg, may_grow)  # fmt: skip
                if step:  # in a task of its own: the samples go on meanwhile
                    self._scaling = asyncio.get_running_loop().create_task(
                        self._scale(role, count + step, u), name=f"autoscale-{role}"
                    )
                    break  # one change at a time; the others' samples still count

    async def _scale(self, role: str, count: int, u: float) -> None:
        window = self.windows[role]
        logger.info("autoscaling %s to %d instance(s) (utilization %.2f)", role, count, u)
        try:
            report = await self.pools.scale(
                self.router, self.eplb, {role: count}, (), self.drain_timeout_s
            )
        except ScaleInProgress:
            return
        except Exception as e:
            logger.error("autoscaling %s failed: %s", role, e)
            window.retry_at = time.monotonic() + RETRY_S
            return
        if self.router.draining or self.pools.stopping:
            return  # the server stops: what did not start was cancelled
        if report.failed:
            logger.error("autoscaling %s: %s (trying again in %.0f s)", role, report.failed,
                         RETRY_S)  # fmt: skip
            window.retry_at = time.monotonic() + RETRY_S
        self.num_up_by[role] += len(report.started)
        self.num_down_by[role] += len(report.removed)
        for w in self.windows.values():
            w.samples.clear()  # the capacity changed: judge it afresh
