"""The router's pair-picking policy and the pools' node assignment: pure functions."""

from __future__ import annotations

import pytest

from orchestrator.placement import (
    NODE_ID_LABEL,
    POOL_LABEL,
    NodeInfo,
    PoolSpec,
    assign_nodes,
    pool_selectors,
)
from orchestrator.policy import Affinity, Pick, RankLoad, pick_ranks, pick_receiver
from workers.engine.rank_reports import RankInfo

pytestmark = pytest.mark.timeout(10)


def _info(role: str) -> RankInfo:
    return RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role=role)


class _Tok:
    """A tokenizer for a router whose outputs nobody reads."""

    def decode(self, ids: object, skip_special_tokens: bool = True) -> str:
        return ""


def _p(queued: int, running: int = 0, alive: bool = True) -> RankLoad:
    return RankLoad("prefill", alive, 1000, num_queued_prefill_tokens=queued, num_running=running)


def _d(reserved: int, capacity: int = 1000, running: int = 0, alive: bool = True) -> RankLoad:
    return RankLoad("decode", alive, capacity, num_reserved_tokens=reserved, num_running=running)


def test_prefill_with_fewest_queued_tokens_and_decode_with_most_free_kv():
    loads = [_p(500), _p(100), _p(300), _d(900), _d(200), _d(100, capacity=400)]
    # decode 4 has 800 free tokens, decode 5 only 300 though it holds less.
    assert pick_ranks(loads) == Pick(4, 1)


def test_ties_go_to_fewer_running_then_lower_index():
    loads = [_p(100, running=3), _p(100, running=1), _d(0, running=2), _d(0, running=2)]
    assert pick_ranks(loads) == Pick(2, 1)


def test_dead_and_avoided_ranks_are_skipped():
    loads = [_p(0, alive=False), _p(900), _d(0), _d(500)]
    assert pick_ranks(loads) == Pick(2, 1)
    assert pick_ranks(loads, avoid=frozenset({2})) == Pick(3, 1)
    assert pick_ranks(loads, avoid=frozenset({1})) is None  # no live prefill rank left
    assert pick_ranks([_p(0), _d(0, alive=False)]) is None


def test_prefix_affinity_wins_while_within_its_slack():
    loads = [_p(300), _p(100), _d(0)]
    assert pick_ranks(loads) == Pick(2, 1)
    assert pick_ranks(loads, affinity=Affinity(0, slack_tokens=200)) == Pick(2, 0)
    assert pick_ranks(loads, affinity=Affinity(0, slack_tokens=199)) == Pick(2, 1)
    # Never a dead or avoided rank, nor a rank of the wrong role (a decode rank).
    dead = [_p(0, alive=False), _p(100), _d(0)]
    assert pick_ranks(dead, affinity=Affinity(0, 10**6)) == Pick(2, 1)
    assert pick_ranks(loads, frozenset({0}), Affinity(0, 10**6)) == Pick(2, 1)
    assert pick_ranks(loads, affinity=Affinity(2, 10**6)) == Pick(2, 1)
    # Colocated: within `slack_tokens` of the most free KV.
    colocated = [RankLoad("colocated", True, 1000, num_reserved_tokens=r) for r in (500, 100)]
    assert pick_ranks(colocated, affinity=Affinity(0, 400)) == Pick(0, None)
    assert pick_ranks(colocated, affinity=Affinity(0, 399)) == Pick(1, None)
    # Disaggregated: a decode rank too, within `slack_tokens` of the most free KV.
    two = [_p(0), RankLoad("decode", True, 1000, num_reserved_tokens=300), _d(0)]
    assert pick_ranks(two) == Pick(2, 0)
    assert pick_ranks(two, affinity=Affinity(None, 300, decode_rank=1)) == Pick(1, 0)
    assert pick_ranks(two, affinity=Affinity(None, 299, decode_rank=1)) == Pick(2, 0)
    assert pick_ranks(two, frozenset({1}), Affinity(None, 10**6, decode_rank=1)) == Pick(2, 0)
    assert pick_ranks(two, affinity=Affinity(None, 10**6, decode_rank=0)) == Pick(2, 0)


def test_router_sends_prompts_that_begin_alike_to_the_same_prefill_rank():
    from orchestrator.ranks import AFFINITY_TOKENS, RankTable, preferred_rank, prefix_key, rank_seed

    def table(order: list[tuple[str, int]]) -> RankTable:
        ranks = RankTable([object()] * len(order))
        ranks.infos = [
            RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role=role, instance=n)
            for role, n in order
        ]  # fmt: skip
        return ranks

    ranks = table([("prefill", 0), ("prefill", 1), ("decode", 0)])
    # Beginnings that prefer each prefill rank (the preference is a hash: found, not chosen).
    systems = [list(range(k, k + AFFINITY_TOKENS)) for k in range(40)]
    prefers = [ranks.pick(input_ids=system + [7]).prefill_rank for system in systems]
    system_a, system_b = systems[prefers.index(0)], systems[prefers.index(1)]
    # The same rank whatever follows the beginning, whichever rank is less loaded.
    ranks.queued_prefill_tokens = [60, 0, 0]
    assert ranks.pick(input_ids=system_a + [8, 9]).prefill_rank == 0
    ranks.queued_prefill_tokens = [0, 60, 0]
    assert ranks.pick(input_ids=system_b + [8, 9]).prefill_rank == 1
    # Beyond one prompt's worth of queued tokens the affinity gives way, and comes back.
    ranks.queued_prefill_tokens = [0, 200, 0]
    assert ranks.pick(input_ids=system_b + [5]).prefill_rank == 0
    ranks.queued_prefill_tokens = [0, 0, 0]
    assert ranks.pick(input_ids=system_b + [6]).prefill_rank == 1
    # A retry that avoids the preferred rank goes to the next one preferred (of three: not
    # the first left, which a pick without affinity would give).
    three = table([("prefill", 0), ("prefill", 1), ("prefill", 2), ("decode", 0)])
    seeds = {i: rank_seed(info) for i, info in enumerate(three.infos[:3])}
    for system in systems:
        key = prefix_key(system + [6])
        assert key is not None
        top = preferred_rank(key, seeds)
        assert three.pick(input_ids=system + [6]).prefill_rank == top
        rest = {i: seed for i, seed in seeds.items() if i != top}
        second = preferred_rank(key, rest)
        if second != min(rest):
            assert three.pick(frozenset({top}), input_ids=system + [6]).prefill_rank == second
            break
    else:
        raise AssertionError("no beginning whose second choice is not the first rank left")
    # Decode ranks too: prompts that begin alike prefer one, whose prefix cache then holds
    # the beginning's KV (not sent again), while its free KV is within a prompt's worth.
    disagg = table([("prefill", 0), ("decode", 0), ("decode", 1)])
    chosen = [disagg.pick(input_ids=system + [7]).rank for system in systems]
    assert set(chosen) == {1, 2}, chosen
    for system, rank in zip(systems[:8], chosen, strict=False):
        disagg.reserved_tokens = [0, 60, 0] if rank == 1 else [0, 0, 60]
        assert disagg.pick(input_ids=system + [8, 9]).rank == rank
        disagg.reserved_tokens = [0, 200, 0] if rank == 1 else [0, 0, 200]
        assert disagg.pick(input_ids=system + [8, 9]).rank == 3 - rank
    # Short prompts carry no affinity: the least loaded.
    ranks.queued_prefill_tokens = [10, 0, 0]
    assert ranks.pick(input_ids=system_a[:-1]).prefill_rank == 1
    # Another router of the deployment, its ranks in another order, prefers the same ranks.
    other = table([("decode", 0), ("prefill", 1), ("prefill", 0)])
    names = {0: 2, 1: 1}  # this table's index -> the other's, of each prefill rank
    for system, rank in zip(systems, prefers, strict=True):
        assert other.pick(input_ids=system + [3]).prefill_rank == names[rank]
    # A third prefill rank takes over only the beginnings it prefers; the rest stay.
    more = table([("prefill", 0), ("prefill", 1), ("decode", 0), ("prefill", 2)])
    now = [more.pick(input_ids=system + [7]).prefill_rank for system in systems]
    assert all(n in (3, p) for n, p in zip(now, prefers, strict=True)), (now, prefers)
    assert 0 < now.count(3) < len(systems), now


def test_colocated_pool_picks_most_free_kv():
    loads = [RankLoad("colocated", True, 1000, num_reserved_tokens=r) for r in (700, 100, 400)]
    assert pick_ranks(loads) == Pick(1, None)
    assert pick_ranks([RankLoad("colocated", False, 1000)]) is None


def _node(i: int, cpus: float = 8, gpus: float = 0, **labels: str) -> NodeInfo:
    res = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return NodeInfo(f"n{i}", f"10.0.0.{i}", res, labels)


def _pools(prefill: int, decode: int, cpu: float = 1, gpu: float = 0) -> list[PoolSpec]:
    bundle = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return [PoolSpec("prefill", 0, prefill, bundle), PoolSpec("decode", 0, decode, bundle)]


def test_one_node_puts_both_pools_anywhere():
    assert assign_nodes(_pools(1, 1), [_node(0)]) == {}


def test_several_nodes_are_split_between_the_pools():
    nodes = [_node(i, gpus=8) for i in range(4)]
    out = assign_nodes(_pools(16, 16, gpu=1), nodes)
    assert sorted(out) == ["decode", "prefill"]
    assert len(out["prefill"]) == len(out["decode"]) == 2
    assert not set(out["prefill"]) & set(out["decode"])
    # Uneven needs: 3 GPUs of prefill, 12 of decode on 8-GPU nodes.
    out = assign_nodes(_pools(3, 12, gpu=1), [_node(i, gpus=8) for i in range(3)])
    assert len(out["prefill"]) == 1 and len(out["decode"]) == 2


def test_no_split_that_fits_falls_back_to_any_node():
    # Each pool needs 12 CPUs; two 8-CPU nodes cannot be split so that each pool fits.
    assert assign_nodes(_pools(12, 12), [_node(0), _node(1)]) == {}


def test_node_labels_choose_the_pool():
    nodes = [
        _node(0, **{POOL_LABEL: "decode"}),
        _node(1, **{POOL_LABEL: "prefill"}),
        _node(2, **{POOL_LABEL: "decode"}),
        _node(3),
    ]
    assert assign_nodes(_pools(1, 1), nodes) == {"prefill": ["n1"], "decode": ["n0", "n2"]}
    # A pool whose label is on no node uses the unlabelled nodes.
    only_decode = [nodes[0], nodes[3]]
    assert assign_nodes(_pools(1, 1), only_decode) == {"prefill": ["n3"], "decode": ["n0"]}


def _matches(selector: dict[str, str], node: NodeInfo) -> bool:
    """Ray's label selector semantics (`value`, `in(a,b)`, `!in(a,b)`; `!in` also matches a
    node without the key), with the node id as the `ray.io/node-id` label."""
    labels = {**node.labels, NODE_ID_LABEL: node.node_id}
    for key, rule in selector.items():
        have = labels.get(key)
        if rule.startswith(("in(", "!in(")):
            values = set(rule[rule.index("(") + 1 : -1].split(","))
            if (have in values) == rule.startswith("!"):
                return False
        elif have != rule:
            return False
    return True


@pytest.mark.parametrize("labelled", [False, True])
def test_selectors_keep_todays_split_and_admit_a_replacement_node(labelled: bool):
    """The bundles' selectors match exactly the nodes `assign_nodes` chose, and a node that
    joins later (a re-joined host has a new id) can take a pool whose node died."""
    if labelled:
        nodes = [_node(0, **{POOL_LABEL: "prefill"}), _node(1, **{POOL_LABEL: "decode"})]
        newcomers = {
            "prefill": _node(7, **{POOL_LABEL: "prefill"}),
            "decode": _node(8, **{POOL_LABEL: "decode"}),
        }
    else:
        nodes = [_node(i, gpus=8) for i in range(4)]
        newcomers = {"prefill": _node(9, gpus=8), "decode": _node(9, gpus=8)}
    pools = _pools(8, 8, gpu=1) if not labelled else _pools(1, 1)
    allowed = assign_nodes(pools, nodes)
    selectors = pool_selectors(allowed, nodes)
    assert sorted(selectors) == sorted(allowed) == ["decode", "prefill"]
    for role, selector in selectors.items():
        assert [n.node_id for n in nodes if _matches(selector, n)] == allowed[role]
        assert _matches(selector, newcomers[role])
    if labelled:  # a labelled newcomer goes to its own pool only
        assert not _matches(selectors["prefill"], newcomers["decode"])
    if labelled:  # prefill's node only: decode has no node of its own, so it may use any
        assert pool_selectors(assign_nodes(pools, nodes[:1]), nodes[:1]) == {
            "prefill": {POOL_LABEL: "prefill"}
        }
    else:  # one node: no selectors (any node)
        assert pool_selectors(assign_nodes(pools, nodes[:1]), nodes[:1]) == {}


def test_a_pool_without_labelled_nodes_selects_the_unlabelled_ones():
    nodes = [_node(0, **{POOL_LABEL: "decode"}), _node(1), _node(2, **{POOL_LABEL: "other"})]
    selectors = pool_selectors(assign_nodes(_pools(1, 1), nodes), nodes)
    assert [n.node_id for n in nodes if _matches(selectors["decode"], n)] == ["n0"]
    assert [n.node_id for n in nodes if _matches(selectors["prefill"], n)] == ["n1"]
    assert _matches(selectors["prefill"], _node(5))  # a new unlabelled node


def test_pool_specs_share_gpus_when_ranks_outnumber_them():
    from orchestrator.config import ServeConfig
    from orchestrator.pool_instance import pool_specs
    from workers.engine.config import EngineConfig

    config = ServeConfig(prefill_dp=1, decode_dp=1, decode_instances=2)
    specs = pool_specs(config, num_gpus=1)
    assert [s.name for s in specs] == ["prefill-0", "decode-0", "decode-1"]
    assert all(s.bundle == {"CPU": 1.0, "GPU": 1 / 3} for s in specs)
    assert all(s.bundle["GPU"] == 1.0 for s in pool_specs(config, num_gpus=8))
    cpu_only = ServeConfig(colocated=True, num_ranks=2, engine=EngineConfig(device="cpu"))
    (spec,) = pool_specs(cpu_only, num_gpus=8)
    assert spec.name == "colocated-0" and spec.num_ranks == 2 and "GPU" not in spec.bundle


def test_shortfall_names_what_the_cluster_lacks():
    from orchestrator.placement import shortfall

    nodes = [_node(0, cpus=2), _node(1, cpus=2, gpus=1)]
    assert shortfall(_pools(1, 1, cpu=2), nodes) is None
    assert shortfall(_pools(2, 2, cpu=1, gpu=0.25), nodes) is None  # a GPU shared by 4 ranks
    assert shortfall(_pools(2, 1, cpu=2), nodes) == "the pools need 6 CPU in all, the cluster has 4"
    three = [*nodes, _node(2, cpus=2)]  # 6 CPUs in all, but no node holds a 3-CPU rank
    assert shortfall(_pools(1, 1, cpu=3), three) == "a rank needs 3 CPU, the largest node has 2"
    assert shortfall(_pools(1, 1, gpu=1), nodes) == "the pools need 2 GPU in all, the cluster has 1"


def test_scoring_requests_count_as_queued_on_the_prefill_rank_that_runs_them():
    """A prompt-logprobs request runs whole on a prefill rank; its prompt tokens count as
    queued there until its first token, so the next one goes to the other prefill rank."""
    import asyncio

    from orchestrator.router import Router
    from workers.engine.messages import SamplingParams

    sent: list[tuple[int, object]] = []

    class Rank:
        def __init__(self, index: int):
            self.index = index
            self.add_requests = self
            self.abort = self

        def remote(self, arg: object) -> asyncio.Future[object]:
            sent.append((self.index, arg))
            future = asyncio.get_running_loop().create_future()
            future.set_result([None] * len(arg) if isinstance(arg, list) else None)
            return future

    async def run() -> None:
        ranks = [Rank(i) for i in range(3)]
        router = Router(ranks, tokenizer=_Tok(), model_name="m")  # type: ignore[arg-type]
        router.ranks.infos = [_info("prefill"), _info("prefill"), _info("decode")]
        scoring = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=True,
                                 prompt_logprobs=True)  # fmt: skip
        gens = [router.generate(list(range(2, 40)), scoring) for _ in range(2)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0.05)
        ranks = [index for index, arg in sent if isinstance(arg, list)]
        assert ranks == [0, 1], sent  # both on prefill ranks, one each; none on the decode rank
        assert all(arg[0].generate_here for _, arg in sent if isinstance(arg, list))
        assert router.ranks.queued_prefill_tokens == [38, 38, 0]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each request's cleanup ran
        await asyncio.sleep(0.01)  # and the aborts it sent
        assert router.ranks.queued_prefill_tokens == [0, 0, 0] and router.ranks.running == [0, 0, 0]

    asyncio.run(run())


def test_rank_table_accounts_each_kind_of_request_back_to_zero():
    """`RankTable` counts a request's load on its ranks from `admit` to `release`; the first
    decode token moves its prompt off the prefill rank (`prompt_done`), once."""
    from orchestrator.ranks import RankTable
    from orchestrator.routed import RoutedRequest

    ranks = RankTable([object()] * 3)  # 0: prefill, 1: decode, 2: colocated

    def counters() -> tuple[list[int], list[int], list[int]]:
        return ranks.reserved_tokens, ranks.queued_prefill_tokens, ranks.running

    disagg = RoutedRequest("d", rank=1, num_tokens=30, num_prompt_tokens=20, prefill_rank=0)
    ranks.admit(disagg)
    assert counters() == ([0, 30, 0], [20, 0, 0], [1, 1, 0])
    ranks.prompt_done(disagg)
    ranks.prompt_done(disagg)  # a second token changes nothing
    assert counters() == ([0, 30, 0], [0, 0, 0], [0, 1, 0]) and disagg.prefill_rank is None
    ranks.release(disagg)
    assert counters() == ([0, 0, 0], [0, 0, 0], [0, 0, 0])

    # Ended before its first token: release takes the prompt off the prefill rank too.
    early = RoutedRequest("e", rank=1, num_tokens=30, num_prompt_tokens=20, prefill_rank=0)
    ranks.admit(early)
    ranks.release(early)
    assert counters() == ([0, 0, 0], [0, 0, 0], [0, 0, 0])

    # Scored in place on a prefill rank: its prompt is queued there until the first token.
    scored = RoutedRequest("s", rank=0, num_tokens=21, num_prompt_tokens=20, queued_here=True)
    ranks.admit(scored)
    assert counters() == ([21, 0, 0], [20, 0, 0], [1, 0, 0])
    ranks.prompt_done(scored)
    assert counters() == ([21, 0, 0], [0, 0, 0], [1, 0, 0])
    ranks.release(scored)

    colocated = RoutedRequest("c", rank=2, num_tokens=50, num_prompt_tokens=40)
    ranks.admit(colocated)
    assert counters() == ([0, 0, 50], [0, 0, 0], [0, 0, 1])
    ranks.release(colocated)
    assert counters() == ([0, 0, 0], [0, 0, 0], [0, 0, 0])


def test_adds_of_one_event_loop_pass_reach_each_rank_in_one_call():
    """`RankTable.add` batches per rank: the adds made in one event-loop pass go out as one
    `add_requests` call per rank, each future settles with its own refusal, and a failed call
    fails every future of its batch; an add made in a later pass is a new call."""
    import asyncio

    from orchestrator.ranks import RankTable

    calls: list[tuple[int, list[str]]] = []

    class Rank:
        def __init__(self, index: int):
            self.index = index
            self.add_requests = self

        def remote(self, batch: list[str]) -> asyncio.Future[list[str | None]]:
            calls.append((self.index, list(batch)))
            future = asyncio.get_running_loop().create_future()
            if self.index == 2:
                future.set_exception(RuntimeError("rank 2 died"))
            else:  # refuses the requests named "bad"
                future.set_result([("no: " + r) if r.startswith("bad") else None for r in batch])
            return future

    async def run() -> None:
        ranks = RankTable([Rank(i) for i in range(3)])
        names = [(i % 3, f"bad{i}" if i % 5 == 0 else f"ok{i}") for i in range(30)]
        futures = [ranks.add(rank, name) for rank, name in names]  # type: ignore[arg-type]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert ranks.num_add_calls == 3 and sorted(rank for rank, _ in calls) == [0, 1, 2]
        for (rank, name), result in zip(names, results, strict=True):
            if rank == 2:
                assert isinstance(result, RuntimeError) and "rank 2 died" in str(result)
            elif name.startswith("bad"):
                assert isinstance(result, ValueError) and str(result) == "no: " + name
            else:
                assert result is None, (name, result)
        for rank, batch in calls:  # each in arrival order, only its own rank's
            assert batch == [name for r, name in names if r == rank]
        await ranks.add(0, "ok-later")  # type: ignore[arg-type]
        assert ranks.num_add_calls == 4 and calls[-1] == (0, ["ok-later"])

    asyncio.run(run())


def test_a_client_gone_while_the_adds_are_in_flight_still_aborts_both_sides():
    """The client leaves while the request's adds have not answered yet: the wait for them is
    cancelled, but not the adds' futures, so the aborts still go out once each add reached its
    rank. (Cancelling those futures lost both aborts: the prefill and decode sides then held
    their pages until the transfer timed out, 30 s later.)"""
    import asyncio

    from orchestrator.router import Router
    from workers.engine.messages import SamplingParams

    aborted: list[tuple[int, str]] = []
    pending: list[asyncio.Future[object]] = []

    class Call:
        def __init__(self, fn):
            self.remote = fn

    class Rank:
        def __init__(self, index: int):
            self.add_requests = Call(self.add)
            self.abort = Call(lambda rid, sender_idle=False: self.record(index, rid))

        def add(self, reqs: list[object]) -> asyncio.Future[object]:
            future = asyncio.get_running_loop().create_future()
            pending.append(future)  # answered later, by the test
            future.reqs = reqs  # type: ignore[attr-defined]
            return future

        def record(self, index: int, rid: str) -> asyncio.Future[object]:
            aborted.append((index, rid))
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future

    async def run() -> None:
        router = Router([Rank(0), Rank(1)], tokenizer=_Tok(), model_name="m")  # type: ignore[arg-type]
        router.ranks.infos = [_info("prefill"), _info("decode")]
        sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
        gen = router.generate(list(range(2, 12)), sampling, rid="r1")
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.01)
        assert len(pending) == 2 and not aborted  # both adds sent, neither answered
        task.cancel()  # the client leaves
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert not aborted  # an abort may not overtake its add
        for future in pending:
            future.set_result([None] * len(future.reqs))  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        # (The ranks know the request by an id of this attempt's own.)
        assert sorted((rank, rid.split("#")[0]) for rank, rid in aborted) == [(0, "r1"), (1, "r1")]

    asyncio.run(run())


def test_a_retry_avoids_the_failed_ranks_whole_expert_parallel_pool():
    """When a prefill rank of a two-rank pool fails a request, its peer is about to leave the
    pool too: the retry goes to another pool instance when there is one (and to the peer
    only when there is not)."""
    import dataclasses

    from orchestrator.ranks import RankTable

    ranks = RankTable([object()] * 5)
    ranks.infos = [
        dataclasses.replace(_info("prefill"), instance=0, pool_rank=0, pool_size=2),
        dataclasses.replace(_info("prefill"), instance=0, pool_rank=1, pool_size=2),
        dataclasses.replace(_info("prefill"), instance=1),
        _info("decode"),
        None,  # not ready yet
    ]
    assert ranks.with_pool_peers(frozenset({0})) == {0, 1}
    assert ranks.with_pool_peers(frozenset({2})) == {2}
    assert ranks.with_pool_peers(frozenset()) == frozenset()
    assert ranks.pick(avoid=ranks.with_pool_peers(frozenset({1}))).prefill_rank == 2


def test_a_pool_with_a_rank_down_takes_no_request_until_it_is_whole():
    """The live peer of a dead rank is about to leave its broken pool: no request goes to it
    (the other instance takes them); with nowhere else to go, nothing can be picked."""
    import dataclasses

    from orchestrator.ranks import RankTable

    ranks = RankTable([object()] * 4)
    ranks.infos = [
        dataclasses.replace(_info("decode"), instance=0, pool_rank=0, pool_size=2),
        dataclasses.replace(_info("decode"), instance=0, pool_rank=1, pool_size=2),
        dataclasses.replace(_info("decode"), instance=1),
        _info("prefill"),
    ]
    ranks.running = [0, 0, 9, 0]  # the other instance is the busier one
    assert ranks.pick(avoid=frozenset()).rank in (0, 1)
    ranks.errors[0] = "engine rank 0 failed"
    assert [load.alive for load in ranks.loads()] == [False, False, True, True]
    assert ranks.pick(avoid=frozenset()).rank == 2
    assert not ranks.can_pick(frozenset({2}))
    ranks.errors[0] = None  # restarted: the pool is whole again
    assert ranks.pick(avoid=frozenset()).rank in (0, 1)


def test_a_migrating_request_goes_to_the_live_rank_of_its_role_with_the_most_free_kv():
    loads = [
        RankLoad("prefill", True, 1000),
        RankLoad("decode", True, 1000, num_reserved_tokens=600),
        RankLoad("decode", True, 1000, num_reserved_tokens=100),  # leaving: avoided
        RankLoad("decode", False, 4000),  # down
        RankLoad("decode", True, 1000, num_reserved_tokens=300),
        RankLoad("colocated", True, 9000),  # takes no KV from a decode rank
    ]
    assert pick_receiver(loads, frozenset({2})) == 4
    assert pick_receiver(loads) == 2
    assert pick_receiver(loads, frozenset({1, 2, 4})) is None
    # No prefill rank is needed: the KV comes from the decode rank it leaves.
    assert pick_receiver([RankLoad("prefill", False, 1), *loads[1:2]]) == 1
    assert pick_receiver(loads, role="colocated") == 5  # one of the source's role
