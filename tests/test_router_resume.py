"""How the router moves a request whose rank fails under it (`Router.generate`), driven by hand
with fake ranks: the request resumes on another rank from the output it had (the rank is sent
`output_ids`), the text goes on where it stood — a stop string across the move included — a
request moves at most `MAX_MOVES` times, and a refusal where it was to resume ends it with an
error (the front end has sent its first tokens already)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.request_run import MAX_MOVES
from orchestrator.router import Router
from workers.engine.messages import FinishReason, GenerateRequest, SamplingParams, TokenDelta
from workers.engine.rank_reports import RankInfo

pytestmark = pytest.mark.timeout(60)


class _Tok:
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


class _Rank:
    """A rank whose adds are recorded in `added` and answered at once: refused (with
    `refuse`) when they resume a request."""

    def __init__(self, index: int, added: list[tuple[int, GenerateRequest]], refuse: str = ""):
        self.index, self.added, self.refuse = index, added, refuse
        self.add_requests = self._call(self._add)
        self.abort = self._call(lambda rid: None)

    @staticmethod
    def _call(fn: Any) -> Any:
        class Call:
            def remote(self, *args: Any) -> asyncio.Future[Any]:
                future = asyncio.get_running_loop().create_future()
                future.set_result(fn(*args))
                return future

        return Call()

    def _add(self, reqs: list[GenerateRequest]) -> list[str | None]:
        self.added.extend((self.index, r) for r in reqs)
        return [self.refuse if self.refuse and r.output_ids else None for r in reqs]


def _router(num_ranks: int, refuse: str = "") -> tuple[Router, list[tuple[int, GenerateRequest]]]:
    added: list[tuple[int, GenerateRequest]] = []
    ranks = [_Rank(i, added, refuse if i > 0 else "") for i in range(num_ranks)]
    router = Router(ranks, tokenizer=_Tok(), model_name="m")  # type: ignore[arg-type]
    info = RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role="colocated")
    router.ranks.infos = [info] * num_ranks
    return router, added


def _one_pair() -> tuple[Router, list[tuple[int, GenerateRequest]]]:
    """A disaggregated router of one pair (rank 0 decodes, rank 1 computes prompts) whose
    requests wait 30 s for a rank to come back."""
    router, added = _router(2)
    router.restart_wait_s = 30.0
    decode = RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role="decode")
    prefill = RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role="prefill")
    router.ranks.infos = [decode, prefill]
    return router, added


async def _next(gen: Any, added: list[Any], sent: int) -> tuple[asyncio.Future[Any], Any]:
    """Ask `gen` for its next output; once the attempt it starts reached a rank (the adds
    grew past `sent`), that rank and request."""
    pending = asyncio.ensure_future(gen.__anext__())
    for _ in range(100):
        if len(added) > sent:
            break
        await asyncio.sleep(0.005)
    return pending, added[-1]


def test_a_request_resumes_from_its_output_and_its_text_goes_on():
    async def run() -> None:
        router, added = _router(2)
        sampling = SamplingParams(max_new_tokens=6, temperature=0.0)
        gen = router.generate([1, 2, 3], sampling, stop=["<7><8>"], rid="r")
        first, (rank_a, req_a) = await _next(gen, added, 0)
        router.take_frame(rank_a, [TokenDelta(req_a.rid, [5, 7], None, None, 3, 2)])
        out = await first
        assert out.token_ids == [5, 7] and out.text == "<5>"  # "<7>" may start the stop string
        router.fail_requests(rank_a, f"engine rank {rank_a} failed: the actor died")
        second, (rank_b, req_b) = await _next(gen, added, 1)
        assert rank_b != rank_a and req_b.output_ids == [5, 7] and req_b.input_ids == [1, 2, 3]
        assert req_b.rid != req_a.rid and req_b.sampling == sampling
        router.take_frame(rank_b, [TokenDelta(req_b.rid, [8, 9], None, None, 3, 4)])
        out = await second
        assert out.finish_reason == "stop" and out.matched_stop == "<7><8>" and out.text == ""
        assert router.num_resumed == 1 and router.num_retries == 0
        await gen.aclose()
        assert not router.num_in_flight and router.ranks.running == [0, 0]

    asyncio.run(run())


def test_a_request_moves_at_most_max_moves_times():
    async def run() -> None:
        router, added = _router(MAX_MOVES + 2)
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=50, temperature=0.0))
        tokens: list[int] = []
        for move in range(MAX_MOVES + 1):
            pending, (rank, req) = await _next(gen, added, move)
            assert req.output_ids == tokens
            router.take_frame(rank, [TokenDelta(req.rid, [10 + move], None, None, 3, move + 1)])
            tokens += (await pending).token_ids
            router.fail_requests(rank, f"engine rank {rank} failed")
        last = await gen.__anext__()
        assert last.finish_reason == "error"
        assert last.error == (
            f"engine rank {rank} failed (after {MAX_MOVES} moves to other ranks or restarted "
            "ones, the most a request makes)"
        )
        assert last.num_output_tokens == MAX_MOVES + 1
        assert tokens == [10 + move for move in range(MAX_MOVES + 1)]
        assert router.num_resumed == MAX_MOVES and len(added) == MAX_MOVES + 1
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()

    asyncio.run(run())


def test_a_resume_refused_where_it_was_to_go_ends_the_request_with_an_error():
    async def run() -> None:
        router, added = _router(2, refuse="output_ids: not here")
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0))
        first, (rank, req) = await _next(gen, added, 0)
        assert rank == 0
        router.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        assert (await first).token_ids == [4]
        router.fail_requests(rank, "engine rank 0 failed")
        last = await gen.__anext__()
        assert last.finish_reason == "error"
        assert "refused it: output_ids: not here" in (last.error or ""), last
        assert not router.num_in_flight

    asyncio.run(run())


def test_a_request_that_failed_itself_is_not_moved():
    """An error of the request on its rank (not marked resumable: a failed step, a constraint)
    ends it; so does a rank failure with no other rank to go to."""

    async def run() -> None:
        router, added = _router(2)
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0))
        first, (rank, req) = await _next(gen, added, 0)
        router.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        await first
        failed = TokenDelta(req.rid, [], FinishReason.ERROR, "engine step failed: boom", 3, 1)
        router.take_frame(rank, [failed])
        last = await gen.__anext__()
        assert last.finish_reason == "error" and last.error == "engine step failed: boom"
        assert len(added) == 1 and router.num_resumed == 0

        alone, added = _router(1)
        gen = alone.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0))
        first, (rank, req) = await _next(gen, added, 0)
        alone.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        await first
        alone.fail_requests(rank, "engine rank 0 failed")
        last = await gen.__anext__()
        assert last.finish_reason == "error" and last.error == "engine rank 0 failed"
        assert len(added) == 1 and alone.num_resumed == 0

    asyncio.run(run())


def test_an_abort_or_an_end_around_a_rank_failure_is_final():
    """A request that ended — aborted by its client, finished on its rank — before its rank's
    failure came through is not moved: one final output each. (Found by an audit: an abort
    while a rank died was resumed, and the stream got two finish events.)"""

    async def run() -> None:
        router, added = _router(3)
        sampling = SamplingParams(max_new_tokens=8, temperature=0.0)

        # Aborted, then its rank's failure (queued after the abort's own result).
        gen = router.generate([1, 2, 3], sampling, rid="a")
        first, (rank, req) = await _next(gen, added, 0)
        router.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        await first
        assert await router.abort("a")
        router.fail_requests(rank, f"engine rank {rank} failed")
        outs = [out async for out in gen]
        assert [o.finish_reason for o in outs] == ["abort"], outs

        # Finished on its rank, then the rank's failure.
        gen = router.generate([1, 2, 3], sampling, rid="b")
        first, (rank, req) = await _next(gen, added, 1)
        router.take_frame(rank, [TokenDelta(req.rid, [4], FinishReason.LENGTH, None, 3, 8)])
        router.fail_requests(rank, f"engine rank {rank} failed")
        assert (await first).finish_reason == "length"
        assert [out async for out in gen] == []

        # Aborted while the failed attempt's last tokens were being handed on.
        gen = router.generate([1, 2, 3], sampling, rid="c")
        first, (rank, req) = await _next(gen, added, 2)
        router.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        await first
        lost = TokenDelta(req.rid, [5], FinishReason.ERROR, "peer lost", 3, 2, resumable=True)
        router.take_frame(rank, [lost])
        last_tokens = await gen.__anext__()
        assert last_tokens.token_ids == [5] and last_tokens.finish_reason is None
        assert await router.abort("c")
        outs = [out async for out in gen]
        assert [o.finish_reason for o in outs] == ["abort"], outs
        assert len(added) == 3 and router.num_resumed == 0 and not router.num_in_flight

    asyncio.run(run())


def _rank_down(router: Router, rank: int, message: str) -> None:
    """What the router does when it finds `rank` failed (`orchestrator.rank_watch.watch_rank`)."""
    router.ranks.num_downs[rank] += 1
    router.fail_requests(rank, message)
    router.ranks.errors[rank] = message
    router.wake_waiting()


def _rank_back(router: Router, rank: int) -> None:
    router.ranks.errors[rank] = None
    router.wake_waiting()


async def _back_and_sent(
    router: Router, rank: int, added: list[tuple[int, GenerateRequest]], count: int
) -> tuple[int, GenerateRequest]:
    """`rank` comes back; once the adds reach `count` (the waiting request went out again),
    the last one."""
    _rank_back(router, rank)
    for _ in range(100):
        if len(added) >= count:
            break
        await asyncio.sleep(0.005)
    return added[-1]


def test_with_no_other_rank_a_request_waits_for_its_rank_to_come_back_and_resumes():
    async def run() -> None:
        router, added = _router(1)
        router.restart_wait_s = 30.0
        sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
        gen = router.generate([1, 2, 3], sampling, rid="r")
        first, (rank, req) = await _next(gen, added, 0)
        router.take_frame(rank, [TokenDelta(req.rid, [4, 5], None, None, 3, 2)])
        assert (await first).token_ids == [4, 5]
        _rank_down(router, 0, "engine rank 0 failed: the actor died")
        second = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        assert not second.done() and len(added) == 1
        assert router.num_waiting == 1 and router.num_in_flight == 1
        rank, req = await _back_and_sent(router, 0, added, 2)
        assert rank == 0 and req.output_ids == [4, 5] and router.num_waiting == 0
        router.take_frame(rank, [TokenDelta(req.rid, [6], FinishReason.LENGTH, None, 3, 8)])
        out = await second
        assert out.token_ids == [6] and out.finish_reason == "length"
        assert router.num_resumed == 1 and router.num_waited == 1
        await gen.aclose()
        assert not router.num_in_flight

    asyncio.run(run())


def test_a_rank_reporting_its_requests_lost_is_not_taken_again_before_it_went_down():
    """A rank leaving a broken expert-parallel pool reports its requests lost while the router
    still sees it up: the request waits for it to go down and come back, not for its add to
    fail there."""

    async def run() -> None:
        router, added = _router(1)
        router.restart_wait_s = 30.0
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0))
        first, (rank, req) = await _next(gen, added, 0)
        router.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        await first
        lost = TokenDelta(req.rid, [], FinishReason.ERROR, "peer lost", 3, 1, resumable=True)
        router.take_frame(rank, [lost])
        second = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        assert not second.done() and len(added) == 1, "resumed on the rank on its way out"
        _rank_down(router, 0, "engine rank 0 failed: it left its pool")
        await asyncio.sleep(0.05)
        assert len(added) == 1
        rank, req = await _back_and_sent(router, 0, added, 2)
        assert req.output_ids == [4]
        router.take_frame(rank, [TokenDelta(req.rid, [5], FinishReason.LENGTH, None, 3, 8)])
        assert (await second).finish_reason == "length"

    asyncio.run(run())


@pytest.mark.parametrize("how", ["gone", "wait", "timeout", "abort", "close"])
def test_a_wait_for_a_rank_ends(how: str):
    """A request waiting for its rank ends: with an error when the rank is dead for good or
    does not come back in `restart_wait_s`; "timeout" at the request's own deadline; "abort"
    when its client aborts it; with an error when the server stops."""

    async def run() -> None:
        router, added = _router(1)
        router.restart_wait_s = 0.3 if how == "wait" else 30.0
        timeout_s = 0.3 if how == "timeout" else None
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0),
                              rid="r", timeout_s=timeout_s)  # fmt: skip
        first, (rank, req) = await _next(gen, added, 0)
        router.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        await first
        _rank_down(router, 0, "engine rank 0 failed: the actor died")
        last = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        assert not last.done() and router.num_waiting == 1
        if how == "gone":
            router.ranks.gone.add(0)
            router.wake_waiting()
        elif how == "abort":
            assert await router.abort("r")
        elif how == "close":
            await router.close()
        out = await asyncio.wait_for(last, 5)
        expected = {"gone": "error", "wait": "error", "timeout": "timeout", "abort": "abort",
                    "close": "error"}  # fmt: skip
        assert out.finish_reason == expected[how], out
        assert out.num_output_tokens == 1 and out.token_ids == []
        if how == "gone":
            assert "engine rank 0 failed" in (out.error or "") and "come back" in (out.error or "")
        if how == "wait":
            assert "within 0.3 s (--rank-restart-wait)" in (out.error or ""), out
        if how == "close":
            assert "shutting down" in (out.error or ""), out
        assert len(added) == 1 and router.num_waiting == 0 and not router.num_in_flight
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()

    asyncio.run(run())


def test_a_resumed_request_whose_transfer_fails_as_its_rank_dies_again_waits_again():
    """Disaggregated, one pair: the decode rank dies, comes back, and dies again while the
    resumed request's KV goes to it — the prefill side's transfer error comes before the
    router sees the second death. The request waits again and resumes, rather than ending
    with the transfer's error (found by an audit: 4 to 32 of 32 requests failed)."""

    async def run() -> None:
        router, added = _one_pair()
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0))
        first, _ = await _next(gen, added, 0)
        req = next(r for rank, r in added if rank == 0)  # the decode side
        router.take_frame(0, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        assert (await first).token_ids == [4]
        _rank_down(router, 0, "engine rank 0 failed: the actor died")
        pending = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        _, req = await _back_and_sent(router, 0, added, 4)  # both sides of the attempt
        assert req.output_ids == [4]
        failed = TokenDelta(req.rid, [], FinishReason.ERROR, "KV transfer to the decode rank "
                            "failed: NIXL_ERR_REMOTE_DISCONNECT", 3, 1)  # fmt: skip
        router.take_frame(1, [failed])
        await asyncio.sleep(0.2)
        assert not pending.done(), "it ended with the transfer's error"
        _rank_down(router, 0, "engine rank 0 failed: the actor died again")
        await asyncio.sleep(0.1)
        assert router.num_waiting == 1
        _, req = await _back_and_sent(router, 0, added, 6)
        assert req.output_ids == [4]
        router.take_frame(0, [TokenDelta(req.rid, [5], FinishReason.LENGTH, None, 3, 8)])
        out = await pending
        assert out.token_ids == [5] and out.finish_reason == "length", out
        assert router.num_waited == 2
        await gen.aclose()

    asyncio.run(run())


def test_an_abort_that_comes_with_the_rank_s_return_is_kept():
    async def run() -> None:
        router, added = _router(1)
        router.restart_wait_s = 30.0
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0),
                              rid="r")  # fmt: skip
        first, (rank, req) = await _next(gen, added, 0)
        router.take_frame(rank, [TokenDelta(req.rid, [4], None, None, 3, 1)])
        await first
        _rank_down(router, 0, "engine rank 0 failed")
        last = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        assert await router.abort("r")
        _rank_back(router, 0)  # in the same loop pass
        out = await last
        assert out.finish_reason == "abort" and len(added) == 1, out

    asyncio.run(run())


def test_with_every_rank_removed_the_router_is_not_ready_rather_than_failing():
    """The only instance is being replaced (its ranks removed, the new ones not up): a new
    request is refused as not ready (503), not with an internal error (found by an audit)."""
    from orchestrator.routed import RouterNotReady

    router, _ = _router(1)
    router.ranks.remove([0])
    with pytest.raises(RouterNotReady, match="being replaced"):
        router.limits  # noqa: B018 (the property raises)


def test_a_request_in_the_grace_after_a_failed_transfer_is_in_flight_and_can_be_aborted():
    """Disaggregated, one pair: the transfer fails before the first token and the router
    gives the pair a moment to be seen going down (`_went_down`). Meanwhile the request
    still counts as in flight (a graceful drain waits for it), its id is taken, and an abort
    ends it."""

    async def run() -> None:
        router, added = _one_pair()
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.0),
                              rid="r")  # fmt: skip
        pending, _ = await _next(gen, added, 0)
        await asyncio.sleep(0.05)
        req = next(r for rank, r in added if rank == 1)  # the prefill side
        failed = TokenDelta(req.rid, [], FinishReason.ERROR, "KV transfer to the decode rank "
                            "failed: timed out", 3, 0)  # fmt: skip
        router.take_frame(1, [failed])
        await asyncio.sleep(0.2)
        assert not pending.done()
        assert router.num_in_flight == 1
        with pytest.raises(ValueError, match="already running"):
            await router.generate([1], SamplingParams(max_new_tokens=1), rid="r").__anext__()
        assert await router.abort("r")
        out = await asyncio.wait_for(pending, 5)
        assert out.finish_reason == "abort", out
        assert router.num_in_flight == 0

    asyncio.run(run())


def test_an_abort_while_the_rank_takes_the_request_is_final_if_the_add_then_fails():
    """The client aborts while the rank has not answered the add yet, and the add then fails
    (the rank died): the request ends as aborted, not tried on another rank. (Found by an
    audit: it went on on another rank, and the abort had said found.)"""

    async def run() -> None:
        router, added = _router(2)
        unanswered: list[asyncio.Future[Any]] = []

        class Unanswered:
            def remote(self, reqs: list[GenerateRequest]) -> asyncio.Future[Any]:
                added.extend((0, r) for r in reqs)
                unanswered.append(asyncio.get_running_loop().create_future())
                return unanswered[-1]

        router.ranks.handles[0].add_requests = Unanswered()
        router.ranks.reserved_tokens[1] = 1000  # the first pick is rank 0
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=50, temperature=0.0),
                              rid="r")  # fmt: skip
        pending, (rank, _) = await _next(gen, added, 0)
        assert rank == 0
        abort = asyncio.ensure_future(router.abort("r"))
        await asyncio.sleep(0.01)
        unanswered[0].set_exception(RuntimeError("the actor died"))
        out = await pending
        assert out.finish_reason == "abort" and await abort
        assert [out async for out in gen] == []
        assert len(added) == 1 and router.num_retries == 0 and not router.num_in_flight

    asyncio.run(run())


@pytest.mark.parametrize("resumable", [False, True])
def test_a_late_word_from_the_prefill_rank_does_not_end_a_request_that_decodes(resumable: bool):
    """Once its decode rank sent the first token, the request no longer depends on its
    prefill rank: a late failure from that rank (a send that timed out after the KV arrived,
    the rank exiting with the request still listed) changes nothing. (Found by an audit: it
    ended the request with an error, or moved it.)"""

    async def run() -> None:
        router, added = _one_pair()  # rank 0 decodes, rank 1 computes prompts
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0.0),
                              rid="r")  # fmt: skip
        pending, (_, req) = await _next(gen, added, 0)
        router.take_frame(0, [TokenDelta(req.rid, [5], None, None, 3, 1)])
        assert (await pending).token_ids == [5]
        late = TokenDelta(req.rid, [], FinishReason.ERROR, "KV transfer timed out", 3, 0,
                          resumable=resumable)  # fmt: skip
        router.take_frame(1, [late])
        router.take_frame(0, [TokenDelta(req.rid, [6, 7], FinishReason.LENGTH, None, 3, 3)])
        outs = [out async for out in gen]
        assert [(o.token_ids, o.finish_reason) for o in outs] == [([6, 7], "length")], outs
        assert len(added) == 2 and router.num_resumed == 0 and not router.num_in_flight

    asyncio.run(run())


def test_a_move_that_comes_after_its_request_ended_frees_the_kv_it_holds():
    """The rank hands the request off with its KV (asked to move it) just as its client
    leaves: no attempt takes that KV, so the router tells the rank to let it go at once, not
    after the transfer's timeout. (Found by an audit.)"""

    async def run() -> None:
        router, added = _router(2)
        aborted: list[tuple[int, str]] = []
        for i, rank in enumerate(router.ranks.handles):
            rank.abort = _Rank._call(lambda rid, i=i: aborted.append((i, rid)))
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=50, temperature=0.0),
                              rid="r")  # fmt: skip
        pending, (rank, req) = await _next(gen, added, 0)
        router.take_frame(rank, [TokenDelta(req.rid, [5], None, None, 3, 1)])
        assert (await pending).token_ids == [5]
        await gen.aclose()  # the client leaves
        await asyncio.sleep(0.01)
        assert aborted == [(rank, req.rid)]  # (the rank had handed it off already)
        moved = TokenDelta(req.rid, [], FinishReason.ERROR, "moved", 3, 1, resumable=True,
                           moved_to="r#2")  # fmt: skip
        router.take_frame(rank, [moved])
        await asyncio.sleep(0.01)
        assert aborted == [(rank, req.rid), (rank, "r#2")]
        assert len(added) == 1 and not router.num_in_flight

    asyncio.run(run())


def test_a_request_the_shutdown_ends_is_not_tried_again():
    """The router stops (`end_all`) with a disaggregated request before its first token —
    which a failure would send to another pair: it ends with the shutdown's error instead of
    going to ranks whose output no one reads any more. (Found by an audit.)"""

    async def run() -> None:
        router, added = _router(4)
        decode = RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role="decode")
        prefill = RankInfo("m", "deepseek_v3", 1024, 4096, (1,), 4096, 16, 256, role="prefill")
        router.ranks.infos = [decode, prefill, decode, prefill]
        gen = router.generate([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.0),
                              rid="r")  # fmt: skip
        pending, _ = await _next(gen, added, 0)
        await asyncio.sleep(0.01)
        router.end_all("the server is shutting down")
        out = await pending
        assert out.finish_reason == "error" and out.error == "the server is shutting down"
        assert [out async for out in gen] == []
        assert len(added) == 2 and router.num_retries == 0 and not router.num_in_flight

    asyncio.run(run())
