"""Page lists of a transfer: validation, and runs of consecutive pages that one descriptor per
layer can cover."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from workers.transfer.messages import KVLayout, TransferTarget


class PageRun(NamedTuple):
    src_page: int
    dst_page: int
    num_pages: int


def page_runs(src_pages: tuple[int, ...], dst_pages: tuple[int, ...]) -> list[PageRun]:
    """Maximal runs where source and destination pages are both consecutive, in order:
    `[3, 5, 6, 7] → [10, 2, 3, 4]` gives `(3, 10, 1), (5, 2, 3)`."""
    runs: list[PageRun] = []
    for s, d in zip(src_pages, dst_pages, strict=True):
        if (
            runs
            and runs[-1].src_page + runs[-1].num_pages == s
            and (runs[-1].dst_page + runs[-1].num_pages == d)
        ):
            runs[-1] = runs[-1]._replace(num_pages=runs[-1].num_pages + 1)
        else:
            runs.append(PageRun(s, d, 1))
    return runs


def check_pages(pages: list[int] | tuple[int, ...], layout: KVLayout, what: str) -> tuple[int, ...]:
    """`pages` as a tuple; ValueError if empty, out of the pool, or repeated."""
    out = tuple(int(p) for p in pages)
    if not out:
        raise ValueError(f"{what}: a transfer needs at least one page")
    bad = [p for p in out if not 0 <= p < layout.num_pages]
    if bad:
        raise ValueError(f"{what}: pages {bad[:8]} are outside the pool of {layout.num_pages}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: a page appears twice")
    return out


def run_descriptors(
    layout: KVLayout,
    base_addr: int,
    device_id: int,
    first_pages: np.ndarray,
    num_pages: np.ndarray,
    layers: tuple[int, ...] | None = None,
) -> np.ndarray:
    """`[len(layers) * num_runs, 3]` uint64 rows `(address, bytes, device_id)`, layer-major: run
    `r` of layer `l` starts at `base_addr + l * layer_bytes + first_pages[r] * page_bytes` and
    spans `num_pages[r]` pages. `layers`: which layers, in order (None: all). Both sides of a
    transfer list their runs in the same order."""
    page_bytes, layer_bytes = layout.page_bytes, layout.layer_bytes
    which = range(layout.num_layers) if layers is None else layers
    rows = np.asarray(which, dtype=np.uint64)[:, None]
    addr = base_addr + rows * layer_bytes + first_pages.astype(np.uint64)[None, :] * page_bytes
    out = np.empty((addr.size, 3), dtype=np.uint64)
    out[:, 0] = addr.reshape(-1)
    out[:, 1] = np.tile(num_pages.astype(np.uint64) * page_bytes, len(which))
    out[:, 2] = device_id
    return out


def refusal(
    layout: KVLayout,
    backend: str,
    name: str,
    transfer_id: str,
    src_pages: tuple[int, ...],
    target: TransferTarget,
) -> str | None:
    """Why the sender `name` (its pool's `layout`, its `backend`) cannot write `src_pages` of
    `transfer_id` to `target`; None when it can."""
    peer = target.agent
    if target.transfer_id != transfer_id:
        return f"the target is for transfer {target.transfer_id!r}, not {transfer_id!r}"
    if peer.backend != backend:
        return f"{peer.name} uses the {peer.backend} transfer backend, this rank {backend}"
    mismatch = layout.mismatch(peer.layout)
    if mismatch:
        return f"{mismatch} (here {name}, there {peer.name})"
    sent = len(src_pages) - target.skip_pages
    if not 0 <= target.skip_pages < len(src_pages) or len(target.dst_pages) != sent:
        held = f" ({target.skip_pages} of them held by the receiver)" if target.skip_pages else ""
        return f"{len(src_pages)} source pages but {len(target.dst_pages)} destination pages{held}"
    return None
