"""Where the pools run: one Ray placement group per pool instance, prefill and decode kept on
different nodes when the cluster has several.

A pool instance is `num_ranks` engine ranks that serve together (with expert parallelism, one
collective group); each rank is one bundle of its instance's placement group, packed onto as few
nodes as possible. Which nodes a pool may use (`assign_nodes`, a pure function):

1. Nodes labelled `pdserve.io/pool=prefill` or `=decode` (`ray start --labels ...`, or a
   `ray up` node type) take that pool only; a pool whose label is on no node uses the unlabelled
   nodes.
2. Otherwise, with two or more nodes, the nodes are split between the pools so that each pool's
   share can hold all of its ranks; a pool never shares a node with the other one then.
3. Otherwise (one node, or no split fits) both pools may use any node.

The bundles carry that choice as label selectors (`pool_selectors`) that a node joining later
also matches — a labelled pool selects its label, a split pool excludes the *other* pools'
nodes rather than naming its own — so when a pool's node dies for good, Ray re-places its
bundles (and restarts its ranks there) on a node that replaces it: one the autoscaler adds, or
the same host re-joined with `ray start` (a new node id).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

POOL_LABEL = "pdserve.io/pool"
NODE_ID_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class PoolSpec:
    """One pool instance: `num_ranks` ranks of `role`, each needing `bundle` (Ray resources)."""

    role: str  # colocated | prefill | decode
    instance: int
    num_ranks: int
    bundle: dict[str, float] = field(hash=False)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.instance}"

    def need(self, resource: str) -> float:
        return self.num_ranks * self.bundle.get(resource, 0.0)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    resources: dict[str, float] = field(hash=False)  # total, e.g. {"CPU": 16, "GPU": 8}
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def assign_nodes(pools: Sequence[PoolSpec], nodes: Sequence[NodeInfo]) -> dict[str, list[str]]:
    """The node ids each role may use (see the module doc); a role missing from the result may
    use any node."""
    roles = sorted({p.role for p in pools})
    labelled = {
        role: [n.node_id for n in nodes if n.labels.get(POOL_LABEL) == role] for role in roles
    }
    if any(labelled.values()):
        unlabelled = [n.node_id for n in nodes if POOL_LABEL not in n.labels]
        return {role: ids or unlabelled for role, ids in labelled.items()}
    if len(roles) < 2 or len(nodes) < 2:
        return {}
    split = _split_nodes(pools, nodes, roles)
    return split if split is not None else {}


def pool_selectors(
    allowed: dict[str, list[str]], nodes: Sequence[NodeInfo]
) -> dict[str, dict[str, str]]:
    """The Ray label selector each role's bundles carry (a role missing may use any node): the
    nodes `allowed` (`assign_nodes` of `nodes`) names today, written so that tomorrow's nodes
    match too (see the module doc)."""
    labelled = sorted({n.labels[POOL_LABEL] for n in nodes if POOL_LABEL in n.labels})
    out: dict[str, dict[str, str]] = {}
    for role in sorted(allowed):
        if not allowed[role]:  # no node for it (a label on no node, no unlabelled node): any
            continue
        if labelled:
            value = role if role in labelled else f"!in({','.join(labelled)})"
            out[role] = {POOL_LABEL: value}
        else:
            others = sorted(i for r, ids in allowed.items() if r != role for i in ids)
            out[role] = {NODE_ID_LABEL: f"!in({','.join(others)})"}
    return out


def _split_nodes(
    pools: Sequence[PoolSpec], nodes: Sequence[NodeInfo], roles: list[str]
) -> dict[str, list[str]] | None:
    """Disjoint node sets per role, each holding its role's total need of every resource; the
    largest nodes first, each to the role with the most unmet need. None if no such split."""
    resources = sorted({r for p in pools for r in p.bundle if p.bundle[r] > 0})
    need = {role: {r: sum(p.need(r) for p in pools if p.role == role) for r in resources}
            for role in roles}  # fmt: skip
    # The scarcest resource decides (GPUs when any rank wants one).
    key = "GPU" if "GPU" in resources else "CPU"
    order = sorted(nodes, key=lambda n: (-n.resources.get(key, 0.0), n.node_id))
    out: dict[str, list[str]] = {role: [] for role in roles}
    have = {role: dict.fromkeys(resources, 0.0) for role in roles}
    for node in order:

        def unmet(role: str) -> float:
            total = need[role][key] or 1.0
            return max(0.0, need[role][key] - have[role][key]) / total

        role = max(roles, key=lambda r: (unmet(r), -len(out[r])))
        out[role].append(node.node_id)
        for r in resources:
            have[role][r] += node.resources.get(r, 0.0)
    if any(have[role][r] < need[role][r] for role in roles for r in resources):
        return None
    return out


def cluster_nodes() -> list[NodeInfo]:
    """The live nodes of the Ray cluster (`ray.init` first)."""
    import ray

    return [
        NodeInfo(
            node_id=n["NodeID"],
            address=n.get("NodeManagerAddress", ""),
            resources=dict(n.get("Resources", {})),
            labels=dict(n.get("Labels", {}) or {}),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


@dataclass
class PoolPlacement:
    """A pool instance's placement group (Ray); `strategy(i)` schedules its rank `i`."""

    spec: PoolSpec
    group: Any  # ray.util.placement_group.PlacementGroup
    selector: dict[str, str] | None  # the label selector its bundles carry (None: any node)

    def strategy(self, rank: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=rank
        )


def shortfall(pools: Sequence[PoolSpec], nodes: Sequence[NodeInfo]) -> str | None:
    """Why `nodes` can never hold `pools` (a rank larger than every node, or more of a resource
    than the nodes have in all), or None when they might."""
    resources = sorted({r for p in pools for r, v in p.bundle.items() if v > 0})
    for r in resources:
        want = sum(p.need(r) for p in pools)
        have = sum(n.resources.get(r, 0.0) for n in nodes)
        if want > have:
            return f"the pools need {want:g} {r} in all, the cluster has {have:g}"
        biggest = max((n.resources.get(r, 0.0) for n in nodes), default=0.0)
        rank = max(p.bundle.get(r, 0.0) for p in pools)
        if rank > biggest:
            return f"a rank needs {rank:g} {r}, the largest node has {biggest:g}"
    return None


def place_pools(
    pools: Sequence[PoolSpec],
    timeout_s: float = 60.0,
    fixed_cluster: bool = False,
    deployment: str | None = None,
) -> tuple[list[PoolPlacement], dict[str, dict[str, str]]]:
    """Reserve a placement group per pool instance; raise RuntimeError naming the pool and the
    cluster's resources when one cannot be placed within `timeout_s` — at once, when
    `fixed_cluster` (a local Ray: no node will join) and the nodes can never hold the pools.
    Also returns each role's label selector (`pool_selectors`), for instances placed later
    (`reserve_groups`)."""
    nodes = cluster_nodes()
    missing = shortfall(pools, nodes)
    if missing and fixed_cluster:
        raise RuntimeError(
            f"cannot place the pools: {missing} (a rank takes --num-threads CPUs; use fewer "
            "ranks or threads, or join a larger cluster with --address)"
        )
    if missing:
        logger.warning("%s: waiting up to %.0f s for nodes to join", missing, timeout_s)
    allowed = assign_nodes(pools, nodes)
    selectors = pool_selectors(allowed, nodes)
    if allowed:
        logger.info(
            "pools on separate nodes: %s",
            ", ".join(f"{role}: {len(ids)} node(s)" for role, ids in sorted(allowed.items())),
        )
    return reserve_groups(pools, selectors, timeout_s, deployment=deployment), selectors


def reserve_groups(
    pools: Sequence[PoolSpec],
    selectors: dict[str, dict[str, str]],
    timeout_s: float,
    cancelled: Callable[[], bool] | None = None,
    deployment: str | None = None,
) -> list[PoolPlacement]:
    """A placement group per pool instance, its bundles carrying their role's selector; all
    placed within `timeout_s`, else none (RuntimeError naming the pools that did not fit and
    the resources free). `cancelled()` turning true stops the wait (RuntimeError). With a
    `deployment` (`orchestrator.deployment`), the groups are detached, named after it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    placements: list[PoolPlacement] = []
    for spec in pools:
        selector = selectors.get(spec.role)
        group = placement_group(
            [dict(spec.bundle) for _ in range(spec.num_ranks)],
            strategy="PACK",
            name=group_name(deployment, spec) if deployment
            else f"pdserve-{spec.name}-{time.monotonic_ns():x}",
            lifetime="detached" if deployment else None,
            bundle_label_selector=[selector] * spec.num_ranks if selector else None,
        )  # fmt: skip
        placements.append(PoolPlacement(spec, group, selector))
    ready = {p.group.ready(): p for p in placements}
    deadline = time.monotonic() + timeout_s
    pending = list(ready)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0 or (cancelled is not None and cancelled()):
            break
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 1.0))
    if pending:
        stuck = [ready[ref].spec for ref in pending]
        for p in placements:
            remove_placement_group(p.group)
        if cancelled is not None and cancelled():
            raise RuntimeError("cancelled: the server is shutting down")
        free, total = ray.available_resources(), ray.cluster_resources()
        have = ", ".join(
            f"{free.get(k, 0.0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if k in total
        )
        raise RuntimeError(
            "the cluster cannot place "
            + "; ".join(f"the {s.name} pool ({s.num_ranks} x {s.bundle})" for s in stuck)
            + f" within {timeout_s:.0f} s; free now: {have or 'nothing'}"
        )
    return placements


def group_name(deployment: str, spec: PoolSpec) -> str:
    """The detached placement group of `deployment`'s instance `spec`."""
    return f"pdserve/{deployment}/{spec.name}"


def remove_placements(placements: Sequence[PoolPlacement]) -> None:
    from ray.util.placement_group import remove_placement_group

    for p in placements:
        try:
            remove_placement_group(p.group)
        except Exception as e:  # the cluster is gone already
            logger.debug("removing placement group %s failed: %s", p.spec.name, e)
