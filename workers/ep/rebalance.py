"""One rank's side of an expert rebalance, in three phases (driven by the EPLB service):

1. `load(phy2log)`: work out which of this rank's slots get another expert, read those experts'
   weights from the checkpoint on disk into host memory (pinned on CUDA). Serving goes on.
2. `prepare()`: copy them host → device into staging buffers (a side stream on CUDA, waited on
   by an event at execute). Serving goes on.
3. `execute()`: at a step boundary, on every rank of the pool at once (the pool's lockstep
   agreement decides when), copy staging → expert slots and swap the placement maps. This is the
   only pause.

`abort()` drops whatever was loaded or staged: the old placement stays. Phases must run in
order; a phase out of order raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from workers.ep.moe import EPContext, EPMoE
from workers.ep.placement import ExpertPlacement
from workers.model.loader import ExpertReader
from workers.model.model import DeepseekForCausalLM

# GPU memory left free when staging experts (for the steps that run meanwhile).
STAGING_SPARE_BYTES = 1 << 30


@dataclass(frozen=True)
class SlotMove:
    layer: int
    slot: int  # local slot index on this rank
    expert: int  # the logical expert it will hold


@dataclass(frozen=True)
class PhaseReport:
    """What a phase did on one rank."""

    rank: int
    phase: str
    num_experts: int  # slots whose expert changes
    num_bytes: int
    seconds: float


@dataclass
class _Plan:
    placement: ExpertPlacement
    moves: list[SlotMove]
    host: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    staged: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    ready: torch.cuda.Event | None = None


class RankRebalancer:
    def __init__(self, model: DeepseekForCausalLM, ep: EPContext, model_dir: str):
        self.model = model
        self.ep = ep
        self.model_dir = model_dir
        self.device = model.lm_head.device
        self._reader: ExpertReader | None = None
        self._plan: _Plan | None = None
        self._stage = "idle"  # idle | loaded | prepared
        self._layers = {
            m.layer_idx: m for m in model.model.modules() if isinstance(m, EPMoE)
        }  # layer index -> its MoE module (the MTP module's is not rebalanced)

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def slot_bytes(self) -> int:
        """Bytes one moved expert takes in staging (its w13 and w2 in the slots' dtype)."""
        if not self._layers:
            return 0
        experts = next(iter(self._layers.values())).experts
        return experts.w13[0].nbytes + experts.w2[0].nbytes

    def moves_for(self, placement: ExpertPlacement) -> list[SlotMove]:
        """This rank's slots whose logical expert differs under `placement` (MoE layers)."""
        moves = []
        for layer, moe in sorted(self._layers.items()):
            new = placement.local_experts(layer, self.ep.rank).tolist()
            for slot, (old_e, new_e) in enumerate(zip(moe.experts.slot_experts, new, strict=True)):
                if old_e != new_e:
                    moves.append(SlotMove(layer, slot, int(new_e)))
        return moves

    def load(self, phy2log: torch.Tensor) -> PhaseReport:
        start = time.perf_counter()
        if self._stage != "idle":
            raise RuntimeError(f"a rebalance is already {self._stage} on this rank")
        current = self.ep.placement
        placement = ExpertPlacement.from_phy2log(phy2log, current.num_ranks, current.num_logical)
        if placement.num_physical != current.num_physical:
            raise ValueError(
                f"the new placement has {placement.num_physical} slots, the pool "
                f"{current.num_physical}"
            )
        plan = _Plan(placement, self.moves_for(placement))
        if self._reader is None:
            self._reader = ExpertReader(self.model_dir)
        pin = self.device.type == "cuda"
        dtype = next(iter(self._layers.values())).experts.w13.dtype if self._layers else None
        num_bytes = 0
        for move in plan.moves:
            w13, w2 = self._reader.read(move.layer, move.expert)
            w13, w2 = w13.to(dtype), w2.to(dtype)
            if pin:
                w13, w2 = w13.pin_memory(), w2.pin_memory()
            plan.host.append((w13, w2))
            num_bytes += w13.nbytes + w2.nbytes
        self._plan, self._stage = plan, "loaded"
        return PhaseReport(self.ep.rank, "load", len(plan.moves), num_bytes,
                           time.perf_counter() - start)  # fmt: skip

    def prepare(self) -> PhaseReport:
        start = time.perf_counter()
        plan = self._require("loaded")
        device = self.device
        if device.type == "cuda":
            need = sum(a.nbytes + b.nbytes for a, b in plan.host)
            free, _ = torch.cuda.mem_get_info(device)
            if need + STAGING_SPARE_BYTES > free:  # refuse, rather than fail serving's memory
                gib = 1 << 30
                raise RuntimeError(
                    f"staging {len(plan.moves)} experts takes {need / gib:.2f} GiB but "
                    f"{free / gib:.2f} GiB of GPU memory is free (keeping "
                    f"{STAGING_SPARE_BYTES / gib:.1f} GiB spare): lower --eplb-max-staging-gib"
                )
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                plan.staged = [
                    (a.to(device, non_blocking=True), b.to(device, non_blocking=True))
                    for a, b in plan.host
                ]
                plan.ready = torch.cuda.Event()
                plan.ready.record(stream)
        else:
            plan.staged = [(a.clone(), b.clone()) for a, b in plan.host]
        num_bytes = sum(a.nbytes + b.nbytes for a, b in plan.staged)
        plan.host = []
        self._stage = "prepared"
        return PhaseReport(self.ep.rank, "prepare", len(plan.moves), num_bytes,
                           time.perf_counter() - start)  # fmt: skip

    def execute(self) -> PhaseReport:
        """Staging → slots and the new maps; call between steps, on every rank of the pool at
        the same step boundary."""
        start = time.perf_counter()
        plan = self._require("prepared")
        if plan.ready is not None:
            torch.cuda.current_stream().wait_event(plan.ready)
        changed: set[int] = set()
        with torch.no_grad():
            for move, (w13, w2) in zip(plan.moves, plan.staged, strict=True):
                experts = self._layers[move.layer].experts
                experts.w13[move.slot].copy_(w13)
                experts.w2[move.slot].copy_(w2)
                changed.add(move.layer)
        for layer, moe in self._layers.items():
            moe.experts.slot_experts = plan.placement.local_experts(layer, self.ep.rank).tolist()
            if layer in changed and moe.fp8_experts is not None:
                moe.use_deep_gemm(moe.fp8_experts.kernels)
        self.ep.placement = plan.placement
        num_bytes = sum(a.nbytes + b.nbytes for a, b in plan.staged)
        self._plan, self._stage = None, "idle"
        return PhaseReport(self.ep.rank, "execute", len(plan.moves), num_bytes,
                           time.perf_counter() - start)  # fmt: skip

    def abort(self) -> None:
        self._plan, self._stage = None, "idle"

    def _require(self, stage: str) -> _Plan:
        if self._stage != stage or self._plan is None:
            raise RuntimeError(f"rebalance phase out of order: the rank is {self._stage}")
        return self._plan
