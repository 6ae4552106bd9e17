"""A rank's output reaching the router: its stream read frame by frame (`read_output`), each
frame's items handed to the requests they belong to (`dispatch`).

The stream is the rank's own TCP connection (`workers.engine.delta_stream`); a frame holds the
`TokenDelta`s of its requests since the last one (at most one per request) and the
`TransferReady` events of a decode rank, whose targets go on to the requests' prefill ranks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from orchestrator.ranks import RankTable
from orchestrator.request_sides import abort_sides
from orchestrator.routed import RoutedRequest
from workers.engine.delta_stream import StreamAddress, read_frame
from workers.engine.messages import AddsTaken, TokenDelta, TransferReady

Item = TokenDelta | TransferReady | AddsTaken


class RankSilent(TimeoutError):
    """A rank's stream sent nothing, not even a heartbeat, for the silence limit: the process
    is alive but stuck (stopped, or wedged in a collective)."""


async def read_output(
    ranks: RankTable, index: int, silence_s: float, on_frame: Callable[[list[Item]], None]
) -> None:
    """Receive the output of rank `index`, one `on_frame` call per frame, until its stream
    breaks, does not connect or stays silent for `silence_s` (raised: the rank is gone).
    While connected, the router's commands to the rank go on the same connection
    (`RankTable.send_command`)."""
    try:
        # (Bounded: requests may be on the rank already, waiting for this stream.)
        async with asyncio.timeout(silence_s):
            address: StreamAddress = await ranks.handles[index].stream_address.remote()
            reader, writer = await asyncio.open_connection(address.host, address.port)
    except TimeoutError:
        raise RankSilent(f"its output stream did not connect in {silence_s:g} s") from None
    error: BaseException = ConnectionError("its output stream ended")
    try:
        tag = f" {ranks.tag}" if ranks.tag else ""
        writer.write(f"{address.token}{tag}\n".encode())
        ranks.attach_stream(index, writer)
        while True:
            # The rank sends at least a heartbeat every HEARTBEAT_S.
            async with asyncio.timeout(silence_s):
                items = await read_frame(reader)
            on_frame(items)
    except TimeoutError:
        error = RankSilent(f"no output or heartbeat for {silence_s:g} s")
        raise error from None
    except asyncio.IncompleteReadError:
        raise error from None
    finally:
        ranks.detach_stream(index, error)
        writer.close()


def dispatch(
    ranks: RankTable, requests: Mapping[str, RoutedRequest], index: int, items: list[Item]
) -> int:
    """Hand one frame of rank `index`'s output to the requests it belongs to (items of
    requests that ended are dropped); the number of deltas handed over."""
    num_deltas = 0
    targets: dict[int, list[tuple[str, Any]]] = {}  # prefill rank -> (rid, target)
    for item in items:
        if isinstance(item, AddsTaken):
            ranks.adds_taken(index, item)
            continue
        req = requests.get(item.rid)
        if req is None:
            if isinstance(item, TokenDelta) and item.moved_to:
                # Handed off with its KV as its attempt ended (the client left, a timeout):
                # no attempt takes that KV, which the rank would hold until the transfer's
                # timeout.
                ranks.send_command(index, ("abort", item.moved_to))
            continue
        if isinstance(item, TransferReady):
            if req.prefill_rank is not None and not req.targets_closed:
                targets.setdefault(req.prefill_rank, []).append((item.rid, item.target))
                req.target_sent = True
            continue
        if index != req.rank and index != req.prefill_rank:
            continue  # its former prefill rank's, late: it decodes on without that rank
        if item.resumable and req.lost is None:
            req.lost = (index, item.error or f"engine rank {index} failed")
            if item.moved_to and index == req.rank:  # handed off: its KV waits there
                req.moved_to = item.moved_to
        if index == req.prefill_rank and item.finish_reason is not None:
            # The prefill side failed: the decode side waits for KV that won't come.
            for abort in abort_sides(ranks, req, only=req.rank):
                ranks.spawn(abort)
        elif index == req.rank and (item.token_ids or item.kv_arrived):
            if req.moved_from is not None and req.prefill_rank is not None:  # its KV arrived
                ranks.moved_off[req.moved_from] += 1
            # Decoding: it no longer depends on (or loads) the prefill rank.
            ranks.prompt_done(req)
            if not item.token_ids and item.finish_reason is None:
                continue  # nothing for its consumer
            req.num_output_tokens += len(item.token_ids)
        num_deltas += 1
        req.queue.put_nowait(item)
    # One call per prefill rank for all the targets this frame brought.
    for prefill_rank, pairs in targets.items():
        ranks.send_command(prefill_rank, ("targets", pairs))
    return num_deltas
