"""What crosses the process boundary in a KV transfer: pool layouts, agent descriptions, targets,
results, and the notifications the sending agent writes to the receiving one.

All are frozen dataclasses (picklable through Ray) carrying the minimal payload.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Literal

import torch


class TransferState(enum.Enum):
    """BOOTSTRAPPING (sender without a target) → WAITING (sender: connecting; receiver: no data
    yet) → TRANSFERRING (pages in flight) → SUCCESS | FAILED. Receivers start in WAITING."""

    BOOTSTRAPPING = "bootstrapping"
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


@dataclass(frozen=True)
class KVLayout:
    """Geometry of one rank's KV pool `kv: [num_layers, num_slots, kv_dim]` (contiguous), where
    slot `p * page_size + i` is token `i` of page `p`; `device` is `str(kv.device)`."""

    num_layers: int
    num_slots: int
    page_size: int
    kv_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    device: str

    @classmethod
    def of(cls, kv: torch.Tensor, page_size: int) -> KVLayout:
        if kv.dim() != 3 or not kv.is_contiguous():
            raise ValueError(
                f"the KV pool must be one contiguous [layers, slots, dim] tensor, got shape "
                f"{tuple(kv.shape)} (contiguous: {kv.is_contiguous()})"
            )
        if page_size <= 0 or kv.shape[1] % page_size:
            raise ValueError(f"{kv.shape[1]} slots do not divide into pages of {page_size}")
        return cls(
            num_layers=kv.shape[0], num_slots=kv.shape[1], page_size=page_size,
            kv_dim=kv.shape[2], dtype=str(kv.dtype).removeprefix("torch."), device=str(kv.device),
        )  # fmt: skip

    @property
    def num_pages(self) -> int:
        return self.num_slots // self.page_size

    @property
    def element_size(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in one layer (one contiguous range)."""
        return self.page_size * self.kv_dim * self.element_size

    @property
    def layer_bytes(self) -> int:
        """Distance in bytes from a slot of layer `l` to the same slot of layer `l + 1`."""
        return self.num_slots * self.kv_dim * self.element_size

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def mismatch(self, other: KVLayout) -> str | None:
        """Why pages cannot be copied one to one between the two pools, or None. The number of
        pages and the device may differ."""
        diffs = [
            f"{f} {getattr(self, f)} vs {getattr(other, f)}"
            for f in ("num_layers", "page_size", "kv_dim", "dtype")
            if getattr(self, f) != getattr(other, f)
        ]
        return "KV layouts differ: " + ", ".join(diffs) if diffs else None


@dataclass(frozen=True)
class AgentInfo:
    """What a peer needs to write into this rank's pool: its name, backend, layout, the pool's
    base address and device id in the owning process, and backend metadata (NIXL: the agent
    metadata, with the pool's registration)."""

    name: str
    backend: str
    layout: KVLayout
    base_addr: int
    device_id: int
    metadata: bytes = b""
    poke: tuple[str, int] | None = None  # UDP address that wakes its engine's thread


@dataclass(frozen=True)
class TransferTarget:
    """Posted by the receiving (decode) rank for one transfer and handed to the sending
    (prefill) rank: write the request's KV into `dst_pages` of `agent`'s pool. The receiver
    holds the request's first `skip_pages` pages already (its prefix cache found them): the
    sender writes its pages from that one on, `dst_pages` one for one."""

    transfer_id: str
    agent: AgentInfo
    dst_pages: tuple[int, ...]
    skip_pages: int = 0


# The first token's log-probability and top `(id, logprob)` pairs
# (`workers.engine.messages.TokenLogprob` is one).
FirstLogprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class TransferResult:
    """A finished transfer on one side, reported exactly once by `KVTransferEngine.poll`.

    `first_token`: on the receiving side the token the completion notification carried (None
    unless ok); on the sending side the token it sent; `first_logprob` likewise, when the
    request asked for logprobs, `num_cached_tokens` (prompt tokens the sender's prefix
    cache held) and `guesses` (the sender's speculative guesses after the first token, for
    the receiver's first step; `--speculative-mtp`). `num_bytes`: KV bytes moved (0 unless ok). `elapsed_s`: from
    `send` / `expect` to the end. `layers_ahead`: on the sending side, how many layers were
    written ahead of the send as the prefill computed them (`write_ahead`; 0 unless ok)."""

    transfer_id: str
    role: Literal["send", "recv"]
    ok: bool
    error: str | None = None
    first_token: int | None = None
    num_bytes: int = 0
    elapsed_s: float = 0.0
    first_logprob: FirstLogprob | None = None
    num_cached_tokens: int = 0
    guesses: tuple[int, ...] = ()
    layers_ahead: int = 0


NotificationKind = Literal["start", "done", "fail", "wait"]


@dataclass(frozen=True)
class Notification:
    """Sender → receiver, keyed by transfer id: `start` (pages are about to flow), `done` (every
    page landed; carries the first sampled token, its logprob when asked, how many prompt
    tokens the sender's prefix cache held, and the sender's guesses after that token), `fail` (the sender gave up; carries why), `wait`
    (the request is still queued or computing on the sending rank: the receive waits on)."""

    kind: NotificationKind
    transfer_id: str
    first_token: int | None = None
    error: str | None = None
    first_logprob: FirstLogprob | None = None
    num_cached_tokens: int = 0
    guesses: tuple[int, ...] = ()

    def encode(self) -> bytes:
        msg: dict[str, object] = {"pdkv": 1, "kind": self.kind, "id": self.transfer_id}
        if self.first_token is not None:
            msg["token"] = self.first_token
        if self.first_logprob is not None:
            msg["lp"] = [self.first_logprob[0], [list(pair) for pair in self.first_logprob[1]]]
        if self.num_cached_tokens:
            msg["cached"] = self.num_cached_tokens
        if self.guesses:
            msg["guesses"] = list(self.guesses)
        if self.error is not None:
            msg["error"] = self.error[:500]
        return json.dumps(msg, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Notification | None:
        """None for anything that is not one of ours (other users of the agent may notify)."""
        try:
            msg = json.loads(data)
            if msg.get("pdkv") != 1 or msg["kind"] not in ("start", "done", "fail", "wait"):
                return None
            token = msg.get("token")
            lp = msg.get("lp")
            first_logprob = None
            if lp is not None:
                first_logprob = (float(lp[0]), tuple((int(i), float(v)) for i, v in lp[1]))
            return cls(
                msg["kind"], str(msg["id"]), None if token is None else int(token),
                msg.get("error"), first_logprob, int(msg.get("cached", 0)),
                tuple(int(t) for t in msg.get("guesses", ())),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
