"""The EPLB service: a Ray actor that keeps the expert load of every expert-parallel pool even.

It gathers each rank's recorded expert load into a window per pool, plans a new placement per
pool (prefill and decode pools separately; `rebalance_experts_incremental` from the current
placement, so few experts move), and drives the ranks through the three phases of
`workers.ep.rebalance` — load (disk → host), prepare (host → device), execute (at a step
boundary, every rank together). Serving goes on through load and prepare; execute is the pause.
A failure in any phase (a rank dies, a file is missing, a rank does not arm in time) aborts the
rebalance on every rank of the pool: the old placement stays.

A rebalance that would stage more expert weights on a rank than `max_staging_bytes` goes in
rounds of whole layers (`staging_rounds`), each through the three phases with a pause of its
own: every layer's placement is complete by itself, so a pool between two rounds (or left
there by a failure) serves with some layers placed anew and the others as before.

Triggers: `rebalance()` (the admin command) and, with `interval_s`, a periodic one that is
skipped while the window's balancedness is at least `min_balancedness` (the window is halved
then: older load fades, each interval by half).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import ray
import torch

from eplb.algorithm import balancedness
from eplb.incremental import num_moves, rebalance_experts_incremental
from workers.engine.messages import short_error

logger = logging.getLogger(__name__)
_MISSING = object()  # a pool a saved placement file has no entry for


@dataclass(frozen=True)
class PoolHandle:
    """One expert-parallel pool instance: its name (e.g. `decode-0`) and rank actors in pool
    rank order."""

    name: str
    ranks: list[Any]
    num_groups: int = 1  # the model's expert groups (n_group)
    num_nodes: int = 1


@dataclass
class PoolReport:
    """What one rebalance did to one pool (the admin command's reply, per pool)."""

    pool: str
    ok: bool
    error: str | None = None
    skipped: str | None = None  # why nothing was done (balanced enough, no load yet)
    balancedness_before: float = 0.0  # mean over MoE layers, on the recorded window
    balancedness_after: float = 0.0
    num_experts_moved: int = 0  # slots whose expert changed, over all layers
    num_bytes_moved: int = 0  # expert weights read from disk and copied
    num_rounds: int = 0  # rounds of layers done (`staging_rounds`), each with its own pause
    load_s: float = 0.0  # each phase: the slowest rank, summed over the rounds
    prepare_s: float = 0.0
    execute_s: float = 0.0  # the longest pause
    window_tokens: int = 0  # routed (token, expert) pairs in the window


class RebalanceInProgress(RuntimeError):
    pass


@dataclass
class _PoolState:
    handle: PoolHandle
    window: torch.Tensor | None = None  # [layers, experts] int64 since the last rebalance
    phy2log: torch.Tensor | None = None
    num_rebalances: int = 0
    num_experts_moved: int = 0
    last_pause_s: float = 0.0
    down: str | None = None  # why the last collection failed (a rank dead or restarting)
    slot_bytes: int | None = None  # staging bytes of one moved expert (asked once)


class EPLBService:
    def __init__(
        self,
        pools: list[PoolHandle],
        interval_s: float | None = None,
        min_balancedness: float = 0.95,
        phase_timeout_s: float = 120.0,
        max_staging_bytes: int | None = None,
    ):
        """`max_staging_bytes`: the most expert weights one rank stages for a round of a
        rebalance (None: no limit, one round)."""
        self.pools = {p.name: _PoolState(p) for p in pools}
        self.max_staging_bytes = max_staging_bytes
        self._removed: dict[str, _PoolState] = {}  # pools scaled down, for their counters
        self.interval_s = interval_s
        self.min_balancedness = min_balancedness
        self.phase_timeout_s = phase_timeout_s
        self._busy = False
        self._periodic: asyncio.Task[None] | None = None
        # New each time Ray starts this actor (`orchestrator.eplb_watch` resyncs a new one).
        self._incarnation = uuid.uuid4().hex

    @ray.method(enable_task_events=False)  # polled every few seconds
    async def incarnation(self) -> str:
        return self._incarnation

    async def sync_pools(self, pools: list[PoolHandle]) -> None:
        """Serve exactly `pools` (after a restart: the pools of now, not the constructor's),
        and drop whatever a rebalance driven by an earlier incarnation left loaded, staged or
        armed on their ranks."""
        names = {p.name for p in pools}
        for name in [n for n in self.pools if n not in names]:
            self._removed[name] = self.pools.pop(name)
        for pool in pools:
            if pool.name not in self.pools:
                self.pools[pool.name] = _PoolState(pool)
        await asyncio.gather(*(self._abort(s) for s in self.pools.values()))

    async def add_pool(self, pool: PoolHandle) -> None:
        """Take on a pool instance started while serving (scaled up)."""
        self.pools[pool.name] = _PoolState(pool)

    async def remove_pool(self, name: str) -> None:
        """Forget a pool instance that is going (scaled down); a rebalance running on it
        ends there (reported skipped), the others go on. Its counters stay in `stats`."""
        state = self.pools.pop(name, None)
        if state is not None:
            self._removed[name] = state

    async def start(self) -> None:
        """Start the periodic trigger (when `interval_s` is set)."""
        if self.interval_s and self._periodic is None:
            self._periodic = asyncio.get_running_loop().create_task(self._run_periodic())

    async def _run_periodic(self) -> None:
        assert self.interval_s
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                reports = await self.rebalance(only_if_unbalanced=True)
                for r in reports:
                    if not r["ok"]:
                        logger.warning("periodic rebalance of %s failed: %s", r["pool"], r["error"])
            except RebalanceInProgress:
                continue
            except Exception:
                logger.exception("periodic rebalance failed")

    # ---- load -----------------------------------------------------------------------------

    async def collect(self) -> None:
        """Add every rank's load since its last report to its pool's window. A pool whose
        ranks do not answer (one died or is restarting) is marked `down` until they do; the
        other pools are not held up by it."""
        for state in list(self.pools.values()):  # pools may come and go meanwhile (scaling)
            try:
                # From the ranks each time: a pool whose ranks restarted is back at its
                # initial placement. (First: the loads are taken from the ranks, and would
                # be lost if this failed after them.)
                phy2log = await state.handle.ranks[0].expert_placement.remote()
                loads = await self._gather(state, "expert_load")
            except Exception as e:
                state.down = short_error(e)
                continue
            state.down = None
            for load in loads:
                if load is None:
                    continue
                state.window = load.clone() if state.window is None else state.window + load
            state.phy2log = phy2log

    async def experts(self) -> dict[str, Any]:
        """Per pool: the placement (`phy2log`), the window's loads and balancedness, counters."""
        await self.collect()
        out = {}
        for name, s in self.pools.items():
            num_ranks = len(s.handle.ranks)
            out[name] = {
                "num_ranks": num_ranks,
                "phy2log": s.phy2log.tolist() if s.phy2log is not None else None,
                "load": s.window.tolist() if s.window is not None else None,
                "balancedness": self._balancedness(s.window, s.phy2log, num_ranks),
                "num_rebalances": s.num_rebalances,
                "num_experts_moved": s.num_experts_moved,
                "last_pause_s": s.last_pause_s,
                "down": s.down,
            }
        return out

    @staticmethod
    def _balancedness(window: Any, phy2log: Any, num_ranks: int) -> float | None:
        if window is None or phy2log is None:
            return None
        moe = window.sum(dim=1) > 0
        if not bool(moe.any()):
            return None
        return float(balancedness(window[moe], phy2log[moe], num_ranks).mean())

    # ---- rebalance ------------------------------------------------------------------------

    async def rebalance(
        self,
        pools: list[str] | None = None,
        only_if_unbalanced: bool = False,
        placements: dict[str, list[list[int]]] | None = None,
    ) -> list[dict[str, Any]]:
        """Rebalance `pools` (default: all) one after the other; a report per pool.
        `placements`: move to these `phy2log`s instead of planning (a saved placement).
        RebalanceInProgress if one is running."""
        if self._busy:
            raise RebalanceInProgress("a rebalance is already running")
        self._busy = True
        try:
            await self.collect()
            names = list(dict.fromkeys(pools if pools is not None else self.pools))
            unknown = [n for n in names if n not in self.pools]
            if unknown:
                raise ValueError(f"unknown pools {unknown}; known: {sorted(self.pools)}")
            # Every saved placement is checked before any pool moves: a file that is wrong
            # for one pool moves none.
            targets: dict[str, torch.Tensor] = {}
            if placements is not None:
                if not placements:
                    raise ValueError("placements: no pool in it")
                if pools is None:
                    names = list(placements)
                targets = {
                    name: self._checked_placement(name, placements.get(name, _MISSING))
                    for name in {*names, *placements}
                }
            reports = []
            for name in names:
                state = self.pools.get(name)
                if state is None:  # scaled down meanwhile
                    reports.append(asdict(PoolReport(name, ok=True, skipped="removed")))
                    continue
                report = await self._rebalance_pool(state, only_if_unbalanced, targets.get(name))
                if not report.ok and name not in self.pools:  # scaled down meanwhile
                    report = PoolReport(name, ok=True, skipped="removed")
                reports.append(asdict(report))
            return reports
        finally:
            self._busy = False

    def _checked_placement(self, name: str, given: Any) -> torch.Tensor:
        """Pool `name`'s saved `phy2log` as a tensor; ValueError (starting "placements")
        unless it is that pool's shape of whole numbers naming its logical experts."""
        if name not in self.pools:
            raise ValueError(f"placements: unknown pool {name!r}; known: {sorted(self.pools)}")
        if given is _MISSING:
            raise ValueError(f"placements: no placement for pool {name!r}")
        state = self.pools[name]
        current = state.phy2log
        if state.down is not None or current is None:
            raise RuntimeError(f"pool {name!r} is down ({state.down}); try again once it is back")
        layers, slots = current.shape
        return checked_phy2log(name, given, layers, slots, int(current.max()) + 1)

    async def _rebalance_pool(
        self, s: _PoolState, only_if_unbalanced: bool, given: torch.Tensor | None
    ) -> PoolReport:
        name, ranks = s.handle.name, s.handle.ranks
        if s.down is not None or s.phy2log is None:
            return PoolReport(name, ok=False, error=f"the pool is down: {s.down}")
        report = PoolReport(name, ok=True)
        window = s.window if s.window is not None else torch.zeros(
            s.phy2log.shape[0], int(s.phy2log.max()) + 1, dtype=torch.int64
        )  # fmt: skip
        report.window_tokens = int(window.sum())
        before = self._balancedness(window, s.phy2log, len(ranks))
        report.balancedness_before = before if before is not None else 0.0
        if given is not None:
            new = given  # checked by `_checked_placement`
        else:
            if before is None:
                report.skipped = "no expert load recorded yet"
                return report
            if only_if_unbalanced and before >= self.min_balancedness:
                report.skipped = f"balancedness {before:.3f} >= {self.min_balancedness}"
                # Halved at each such look: the recent load weighs most, so a shift in it
                # shows within an interval or two, not diluted by hours of a balanced past.
                if s.window is not None:
                    s.window = s.window // 2
                return report
            # In a thread: for V3's 58 layers and a large pool it takes seconds, during which
            # the service still answers (its stats for /metrics, the router's health look).
            planned = await asyncio.to_thread(
                rebalance_experts_incremental,
                window, s.phy2log, s.handle.num_groups, s.handle.num_nodes, len(ranks),
            )  # fmt: skip
            new = planned.phy2log
        after = self._balancedness(window, new, len(ranks))
        report.balancedness_after = after if after is not None else 0.0
        moe = window.sum(dim=1) > 0
        if not bool(moe.any()):
            moe = torch.ones_like(moe)
        rounds = staging_rounds(
            s.phy2log, new, len(ranks), await self._moves_per_round(s), name=name
        )
        for i, layers in enumerate(rounds):
            step = s.phy2log.clone()
            step[layers] = new[layers]
            try:
                loaded = await self._gather(s, "eplb_load", step)
                report.load_s += max(r.seconds for r in loaded)
                report.num_bytes_moved += sum(r.num_bytes for r in loaded)
                prepared = await self._gather(s, "eplb_prepare")
                report.prepare_s += max(r.seconds for r in prepared)
                executed = await self._gather(s, "eplb_execute", self.phase_timeout_s, settle=False)
                report.execute_s = max(report.execute_s, *(r.seconds for r in executed))
            except Exception as e:
                report.ok, report.error = False, short_error(e)
                await self._abort(s)
                if not i:
                    logger.warning("rebalance of %s rolled back: %s", name, report.error)
                    return report
                # The rounds done stay: the report and the counters say what moved.
                report.error += f" (after {i} of {len(rounds)} rounds: those layers moved)"
                after = self._balancedness(window, s.phy2log, len(ranks))
                report.balancedness_after = after if after is not None else 0.0
                s.num_rebalances += 1
                s.num_experts_moved += report.num_experts_moved
                s.last_pause_s = report.execute_s
                logger.warning("rebalance of %s stopped: %s", name, report.error)
                return report
            report.num_experts_moved += int(num_moves(s.phy2log[moe], step[moe]))
            s.phy2log = step  # (a later round's failure keeps this one)
            report.num_rounds += 1
            if len(rounds) > 1:
                logger.info(
                    "rebalance of %s: round %d of %d done (layers %d-%d)",
                    name, i + 1, len(rounds), layers[0], layers[-1],
                )  # fmt: skip
        s.window = None  # a new window for the new placement
        s.num_rebalances += 1
        s.num_experts_moved += report.num_experts_moved
        s.last_pause_s = report.execute_s
        logger.info(
            "rebalanced %s: balancedness %.3f -> %.3f, %d experts moved, pause %.1f ms",
            name, report.balancedness_before, report.balancedness_after,
            report.num_experts_moved, report.execute_s * 1000,
        )  # fmt: skip
        return report

    async def _moves_per_round(self, s: _PoolState) -> int | None:
        """How many experts one rank may stage in a round (None: no limit): from
        `max_staging_bytes` and the pool's bytes per expert (asked of its first rank once;
        a rank that does not say means no limit)."""
        if self.max_staging_bytes is None:
            return None
        if s.slot_bytes is None:
            try:
                ref = s.handle.ranks[0].eplb_slot_bytes.remote()
                s.slot_bytes = int(await asyncio.wait_for(ref, self.phase_timeout_s))
            except Exception as e:
                logger.warning("%s: expert size unknown (%s): one round", s.handle.name, e)
                return None
        return max(1, self.max_staging_bytes // s.slot_bytes) if s.slot_bytes > 0 else None

    async def _gather(
        self, s: _PoolState, method: str, *args: Any, settle: bool = True
    ) -> list[Any]:
        """`method` on every rank of the pool; raises the first failure. With `settle`, only
        once every rank's call has ended: an abort sent while another rank's call has not even
        started (a threaded actor may run calls out of order) would leave that rank's phase
        done. Not for execute, where the others wait for the failed rank until the abort
        disarms them."""
        refs = [getattr(r, method).remote(*args) for r in s.handle.ranks]
        if not settle:
            return list(await asyncio.wait_for(asyncio.gather(*refs), self.phase_timeout_s + 10))
        every = asyncio.gather(*refs, return_exceptions=True)
        results = list(await asyncio.wait_for(every, self.phase_timeout_s + 10))
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _abort(self, s: _PoolState) -> None:
        for r in s.handle.ranks:
            try:
                await asyncio.wait_for(r.eplb_abort.remote(), 30)
            except Exception as e:  # a dead rank holds nothing any more
                logger.debug("eplb_abort on a rank of %s failed: %s", s.handle.name, e)

    @ray.method(enable_task_events=False)  # polled by every /metrics call
    async def stats(self) -> dict[str, dict[str, float]]:
        """Counters per pool for /metrics (no new collection); pools scaled down keep theirs
        (`removed`: 1.0, no balancedness)."""
        gone = {
            name: {"removed": 1.0, "rebalances": float(s.num_rebalances),
                   "experts_moved": float(s.num_experts_moved)}
            for name, s in self._removed.items()
        }  # fmt: skip
        return gone | {
            name: {
                # NaN while the window holds no load: no data, not a balancedness of 0
                "balancedness": _or_nan(
                    self._balancedness(s.window, s.phy2log, len(s.handle.ranks))
                ),
                "rebalances": float(s.num_rebalances),
                "experts_moved": float(s.num_experts_moved),
                "last_pause_s": s.last_pause_s,
            }
            for name, s in self.pools.items()
        }


def staging_rounds(
    old: torch.Tensor, new: torch.Tensor, num_ranks: int, max_moves: int | None, name: str = ""
) -> list[list[int]]:
    """The layers whose placement changes from `old` to `new` (`[layers, slots]`), in rounds
    of consecutive changed layers such that no rank stages more than `max_moves` experts in a
    round (None: one round). A layer is never split: one that alone moves more experts on a
    rank than that goes in a round by itself (logged)."""
    per_rank = (old != new).reshape(old.shape[0], num_ranks, -1).sum(dim=2)  # [layers, ranks]
    changed = [layer for layer in range(old.shape[0]) if bool(per_rank[layer].any())]
    if max_moves is None:
        return [changed] if changed else []
    rounds: list[list[int]] = []
    load = torch.zeros(num_ranks, dtype=per_rank.dtype)
    for layer in changed:
        moves = per_rank[layer]
        if int(moves.max()) > max_moves:
            logger.warning(
                "rebalance of %s: layer %d alone moves %d experts on one rank, over the %d a "
                "round may stage (--eplb-max-staging-gib): it goes in a round by itself",
                name, layer, int(moves.max()), max_moves,
            )  # fmt: skip
        if rounds and int((load + moves).max()) <= max_moves:
            rounds[-1].append(layer)
            load += moves
        else:
            rounds.append([layer])
            load = moves.clone()
    return rounds


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def checked_phy2log(
    name: str, given: Any, layers: int, slots: int, num_logical: int
) -> torch.Tensor:
    """A saved `phy2log` of pool `name` as a tensor; ValueError (starting "placements")
    unless it is `layers` rows of `slots` whole numbers naming all `num_logical` experts."""
    if not (
        isinstance(given, list)
        and len(given) == layers
        and all(isinstance(row, list) and len(row) == slots for row in given)
    ):
        raise ValueError(
            f"placements: pool {name!r} needs {layers} layers of {slots} expert ids "
            "(a list of lists)"
        )
    for row in given:
        for value in row:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"placements: pool {name!r}: {value!r} is not an expert id")
            if not 0 <= value < num_logical:
                raise ValueError(
                    f"placements: pool {name!r}: expert {value} is not in [0, {num_logical})"
                )
    for layer, row in enumerate(given):
        if len(set(row)) < num_logical:
            missing = sorted(set(range(num_logical)) - set(row))[:5]
            raise ValueError(
                f"placements: pool {name!r}, layer {layer}: no slot for experts {missing}"
            )
    return torch.tensor(given, dtype=torch.int64)
