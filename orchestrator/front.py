"""`pdserve serve --front NAME`: one more router for deployment NAME, beside the one that
started it.

A router process does the per-token work of every request it serves — HTTP or gRPC,
tokenizing, detokenizing, stop strings, SSE — about 0.06 s of CPU per 1,000 streamed output
tokens (docs/benchmarks.md): one process serves some 15k output tokens/s, a few decode
instances' worth. Front routers share that work: each serves its own clients (behind a load
balancer, or DNS) on the same pool instances. The deployment's **primary** router (`pdserve
serve --deployment NAME`) alone starts, scales, replaces and rebalances the instances; a
front router follows what it does through the deployment's record in the GCS
(`orchestrator.deployment`), re-read every `REFRESH_S`:

- an instance the record gains is taken on the moment its ranks are ready;
- one marked draining (being scaled down) gets no new request, and its requests run on;
- one marked moving (its drain timeout ended) has the requests still there move to other
  instances with their KV (`KVMoves.move_off`), as the primary moves its own;
- one the record loses is forgotten (what still ran there resumes elsewhere, as after a
  rank failure).

Each front router has a tag of its own (random, `new_tag`), which it sends when it connects
to a rank's output stream and puts at the end of its requests' ids on the ranks (`Router.
next_attempt_id`): a rank sends each request's output to the router whose request it is
(`workers.engine.delta_stream`). When a front router's connection to a rank breaks, the rank
aborts that router's requests — the router has given them up, as it would after any rank
failure — so a front router that dies leaves no work behind; the primary's take-over aborts
only the primary's own.

A rank dead for good is replaced by the primary (when the record says it replaces them):
the front router's requests that lost it wait for the new instance (`Router.num_replacing`),
as the primary's do. A rank that goes silent is failed but not killed — the silence may be
the front router's own stall, and the ranks are the primary's to restart. While it serves, a
front router holds a named actor (`deployment.front_lease`), so that `pdserve down` refuses
a deployment it serves.

Each router picks ranks from what it sent them and what the other routers' requests held
there at the last look (`orchestrator.peer_load`, every half second).
Admin commands that change the pools (scale, rebalance) go to the primary; a front router
answers them with 409 naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import deployment as dep
from orchestrator.periodic import Periodic

if TYPE_CHECKING:
    from orchestrator.config import ServeConfig
    from orchestrator.router import Router

logger = logging.getLogger(__name__)

REFRESH_S = 1.0  # how often a front router reads the deployment's record


def new_tag() -> str:
    """A front router's tag: 8 hex digits (`workers.engine.delta_stream.ROUTER_TAG`)."""
    return secrets.token_hex(4)


def primary_only(name: str) -> str:
    """What a front router answers an admin command about the pools or experts."""
    return (
        f"this is a front router of deployment {name} (--front): its primary router "
        f"(`pdserve serve --deployment {name}`) answers commands about its pools and experts"
    )


def load_record(name: str) -> dep.DeploymentRecord:
    """Deployment `name`'s record, checked for this installation; DeploymentError naming what
    to do otherwise."""
    record = dep.load(name)
    if record is None:
        raise dep.DeploymentError(
            f"--front {name}: no deployment {name!r} in this Ray cluster (start it with "
            f"`pdserve serve --address ... --deployment {name}`; `pdserve down --address "
            "auto` lists the deployments)"
        )
    if record.code != dep.code_fingerprint():
        raise dep.DeploymentError(
            f"--front {name}: the deployment's ranks run other pdserve code than this "
            f"installation ({record.code}, this is {dep.code_fingerprint()}): run the front "
            "router from the installation that serves it"
        )
    return record


def model_dir_of(config: ServeConfig, record: dep.DeploymentRecord) -> Path:
    """The checkpoint a front router tokenizes with: `--model` when given (the same model, as
    found on this machine), else where the deployment's record says its model is."""
    recorded = Path(record.settings["model"])
    if config.model is None:
        if not (recorded / "config.json").is_file():
            raise dep.DeploymentError(
                f"--front {record.name}: the deployment serves {recorded}, which this machine "
                "does not have: pass --model (the same checkpoint, or its Hub id)"
            )
        return recorded
    from orchestrator.launcher import resolve_model_dir

    given = resolve_model_dir(config)
    if (recorded / "config.json").is_file() and given.resolve() != recorded.resolve():
        raise dep.DeploymentError(
            f"--front {record.name}: the deployment serves {recorded}, not {given}: leave "
            "--model out, or give the same checkpoint"
        )
    return given


def instance_ranks(record: dep.DeploymentRecord, inst: dep.InstanceRecord) -> list[Any] | None:
    """The rank actors of `inst`, by name; None while one is missing (being started or
    replaced)."""
    import ray

    try:
        return [
            ray.get_actor(dep.rank_name(record.name, inst.name, i), namespace=dep.NAMESPACE)
            for i in range(inst.num_ranks)
        ]
    except ValueError:
        return None


def serving_instances(record: dep.DeploymentRecord) -> list[dep.InstanceRecord]:
    """The instances a front router sends requests to: not draining."""
    return [i for i in record.instances if not i.draining]


def first_ranks(
    name: str, timeout_s: float, progress: Callable[[float], None] | None = None
) -> tuple[dict[str, list[int]], list[Any]]:
    """The ranks of deployment `name`'s serving instances that are ready (by instance name:
    their indices in the list), waiting up to `timeout_s` for one to be (a primary starting
    its pools right now); `progress(elapsed_s)` every ~5 s meanwhile. Those still starting
    are taken on later (`FrontWatch`). DeploymentError when none came."""
    began = last_said = time.monotonic()
    while True:
        record = load_record(name)
        known: dict[str, list[int]] = {}
        ranks: list[Any] = []
        for inst in serving_instances(record):
            handles = instance_ranks(record, inst)
            if handles is not None and _ready_now(handles):
                known[inst.name] = list(range(len(ranks), len(ranks) + len(handles)))
                ranks += handles
        if ranks:
            later = [i.name for i in serving_instances(record) if i.name not in known]
            if later:
                logger.warning("front router: %s still starting; taken on once ready",
                               ", ".join(later))  # fmt: skip
            return known, ranks
        now = time.monotonic()
        if now - began > timeout_s:
            raise dep.DeploymentError(
                f"--front {name}: the deployment has had no pool instance ready for "
                f"{timeout_s:.0f} s"
            )
        if progress is not None and now - last_said >= 5:
            progress(now - began)
            last_said = now
        time.sleep(REFRESH_S)


def _ready_now(handles: list[Any], wait_s: float = 1.0) -> bool:
    """Whether every rank in `handles` answers `ready` within `wait_s` (False too when one
    failed to start)."""
    import ray

    refs = [h.ready.remote() for h in handles]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    if pending:
        return False
    try:
        ray.get(done)
    except Exception:
        return False
    return True


@dataclass
class FrontWatch(Periodic):
    """Keeps a front router's ranks in step with the deployment's record (see the module
    doc). Runs on the router's event loop."""

    router: Router
    name: str
    # Instance name -> the router's indices of its ranks.
    known: dict[str, list[int]] = field(default_factory=dict)
    interval_s: float = REFRESH_S
    gone_logged: bool = False
    # Instances found and not ready yet: each waits for its ranks' `ready` in a task of its
    # own and is taken on the moment they answer — when the primary replaces an instance it
    # drains the old one as soon as the new one is ready, and a poll would leave a gap.
    pending: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # Instances with a rank dead for good that the primary replaces (the record says it
    # does), by role: requests that lost a rank wait for the new instance, as the primary's
    # own do (`Router.num_replacing`), until one of the role is taken on.
    replacing: dict[str, set[str]] = field(default_factory=dict)
    replaces: bool = True
    # Instances marked moving whose requests this router moves off (`KVMoves.move_off`).
    moving: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    migrate: bool = True  # its requests move with their KV (not `--disable-kv-migration`)
    lease: Any = None  # `deployment.front_lease`, held while it serves
    task_name = "front-watch"

    def __post_init__(self) -> None:
        self.failure = f"front router: reading deployment {self.name} failed"

    def start(self) -> None:
        self.router.on_rank_gone = self._rank_gone
        super().start()

    def _rank_gone(self, index: int) -> None:
        """A rank is dead for good: its instance is about to be replaced by the primary."""
        name = next((n for n, indices in self.known.items() if index in indices), None)
        if name is None or not self.replaces:
            return
        self.replacing.setdefault(_role(name), set()).add(name)
        self._count_replacing()

    def _count_replacing(self) -> None:
        self.router.num_replacing = sum(len(names) for names in self.replacing.values())
        self.router.wake_waiting()

    async def stop(self) -> None:
        await super().stop()
        tasks = [*self.pending.values(), *self.moving.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.lease is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(self.lease)
            self.lease = None

    async def look(self) -> None:  # (the GCS unreachable for a moment: the next look)
        await self.sync()

    async def sync(self) -> None:
        """One look at the record: take on new instances (once ready), close draining ones,
        move requests off those marked moving, forget removed ones."""
        record = await asyncio.to_thread(dep.load, self.name)
        if record is None:
            if not self.gone_logged:
                logger.error("front router: deployment %s is gone (removed by `pdserve down`, "
                             "or its router stopped); nothing left to serve", self.name)  # fmt: skip
                self.gone_logged = True
            instances: list[dep.InstanceRecord] = []
        else:
            self.gone_logged = False
            instances = record.instances
            self.replaces = record.replaces
        if (record is None or not self.replaces) and self.replacing:
            self.replacing.clear()  # nothing will replace them
            self._count_replacing()
        present = {i.name: i for i in instances}
        for name in [n for n in self.pending if n not in present or present[n].draining]:
            self.pending.pop(name).cancel()
        for name in [n for n in self.known if n not in present]:
            if name in self.moving:
                self.moving.pop(name).cancel()
            indices = self.known.pop(name)
            logger.info("front router: %s left the deployment", name)
            await self.router.remove_ranks(indices, f"pool instance {name} was removed")
        for name, inst in present.items():
            if name in self.known:
                if inst.draining and not set(self.known[name]) <= self.router.ranks.closed:
                    logger.info("front router: %s drains; no new request goes there", name)
                    self.router.close_ranks(self.known[name])
                if inst.moving and self.migrate and name not in self.moving and record is not None:
                    timeout_s = float(record.settings.get("transfer_timeout_s", 30.0))
                    self.moving[name] = asyncio.get_running_loop().create_task(
                        self._move_off(name, timeout_s), name=f"front-move-off-{name}"
                    )
                continue
            if inst.draining or record is None or name in self.pending:
                continue
            handles = await asyncio.to_thread(instance_ranks, record, inst)
            if handles is not None:  # else its actors are still to be made: next look
                self.pending[name] = asyncio.get_running_loop().create_task(
                    self._take_on(name, handles), name=f"front-take-on-{name}"
                )
        if record is not None and self.replacing:
            # A dead instance that left the record and is not being replaced was scaled
            # down: nothing waits for it — unless an instance of its role is being taken on
            # (the replacement, done: `_take_on` ends the wait once its ranks are added).
            waited = set(present) | set(record.replacing)
            taking_on = {_role(n) for n in self.pending}
            for role in list(self.replacing):
                if role not in taking_on:
                    self.replacing[role] &= waited
                    if not self.replacing[role]:
                        del self.replacing[role]
            self._count_replacing()

    async def _move_off(self, name: str, timeout_s: float) -> None:
        """Move this router's requests off instance `name` (scaled down, its drain timeout
        over) with their KV, as the primary moves its own (`scaling.take_down`)."""
        from orchestrator.scaling import MIGRATION_SLACK_S

        indices, moves = self.known.get(name), self.router.moves
        if not indices:
            return
        before = moves.moved_off(indices)
        try:
            await moves.move_off(indices, timeout_s + MIGRATION_SLACK_S)
        except Exception as e:  # not expected: what is left resumes once the instance goes
            logger.warning("front router: moving requests off %s failed: %s", name, e,
                           exc_info=True)  # fmt: skip
            return
        after = moves.moved_off(indices)
        if after != before:
            logger.info(
                "front router: %d request(s) of %s moved to other instances with their KV"
                "%s", after[0] - before[0], name,
                f" ({after[1] - before[1]} failed to and resumed from their output)"
                if after[1] > before[1] else "",
            )  # fmt: skip

    async def _take_on(self, name: str, handles: list[Any]) -> None:
        """Take instance `name` on once its ranks are ready."""
        try:
            await asyncio.gather(*(h.ready.remote() for h in handles))
            self.known[name] = await self.router.add_ranks(handles)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # it failed to start (the primary replaces it): next look
            logger.warning("front router: %s did not come up: %s", name, e)
            return
        finally:
            if self.pending.get(name) is asyncio.current_task():
                del self.pending[name]
        logger.info("front router: took on %s (ranks %s)", name, self.known[name])
        self.replacing.pop(_role(name), None)  # its role is back
        self._count_replacing()


def _role(instance: str) -> str:
    """The role of a pool instance, from its name (`InstanceRecord.name`: ROLE-N)."""
    return instance.rsplit("-", 1)[0]
