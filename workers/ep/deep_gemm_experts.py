"""FP8 grouped expert GEMMs through DeepGEMM (Hopper), import-guarded.

DeepGEMM multiplies FP8 (e4m3) activations with 1x128 per-token-group scales by FP8 weights with
128x128 block scales, accumulating in fp32 and writing bf16:

- contiguous layout (normal dispatch, prefill): rows of all experts in one `[M, K]` tensor, each
  expert's rows padded to the kernel's M alignment, `m_indices: [M]` int32 naming each row's
  expert (-1 for padding);
- masked layout (low-latency dispatch, decode): `[E, max_m, K]` with `masked_m: [E]` valid rows.

`DeepGemmExperts` keeps a layer's local expert weights in FP8 (quantized once, from the loaded
weights) and runs SiLU-and-mul between the two GEMMs. The layout preparation is plain torch and
is tested on the CPU with a plain-torch stand-in for the kernels (`kernels=`); the kernels
themselves run only where `deep_gemm` imports on a Hopper GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from workers.ep.dispatch import DispatchResult

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def import_deep_gemm() -> Any | None:
    try:
        import deep_gemm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return deep_gemm


def deep_gemm_available(device: torch.device | None = None) -> bool:
    if import_deep_gemm() is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w: [E, N, K]` → FP8 `[E, N, K]` and fp32 scales `[E, ceil(N/128), ceil(K/128)]` such
    that `w ≈ fp8 * scale` per 128x128 block."""
    num_experts, n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = w.new_zeros(num_experts, nb * BLOCK, kb * BLOCK, dtype=torch.float32)
    padded[:, :n, :k] = w.float()
    blocks = padded.view(num_experts, nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12)  # [E, nb, kb]
    scale = amax / FP8_MAX
    q = (blocks / scale[:, :, None, :, None]).to(FP8).view(num_experts, nb * BLOCK, kb * BLOCK)
    return q[:, :n, :k].contiguous(), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x: [..., K]` → FP8 `[..., K]` and fp32 scales `[..., ceil(K/128)]` (1x128 groups)."""
    k = x.shape[-1]
    kb = -(-k // BLOCK)
    padded = F.pad(x.float(), (0, kb * BLOCK - k)).view(*x.shape[:-1], kb, BLOCK)
    scale = padded.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (padded / scale[..., None]).to(FP8).view(*x.shape[:-1], kb * BLOCK)[..., :k]
    return q.contiguous(), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    k = q.shape[-1]
    expanded = scale.repeat_interleave(BLOCK, dim=-1)[..., :k]
    return q.float() * expanded


def dequantize_weight_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape[-2:]
    s = scale.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :n, :k]
    return q.float() * s


@dataclass
class Kernels:
    """The two DeepGEMM entry points (names differ across DeepGEMM versions)."""

    contiguous: Any  # (lhs, rhs, out, m_indices) -> None
    masked: Any  # (lhs, rhs, out, masked_m, expected_m) -> None
    m_alignment: int

    @classmethod
    def from_deep_gemm(cls, dg: Any) -> Kernels:
        contiguous = (
            getattr(dg, "m_grouped_fp8_gemm_nt_contiguous", None)
            or dg.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
        )
        masked = (
            getattr(dg, "m_grouped_fp8_gemm_nt_masked", None)
            or dg.m_grouped_gemm_fp8_fp8_bf16_nt_masked
        )
        align = getattr(dg, "get_m_alignment_for_contiguous_layout", lambda: BLOCK)()
        return cls(contiguous, masked, int(align))


def reference_kernels(m_alignment: int = BLOCK) -> Kernels:
    """Plain-torch stand-ins with DeepGEMM's semantics (dequantize, multiply in fp32), for
    testing the layouts where DeepGEMM cannot run."""

    def contiguous(lhs: Any, rhs: Any, out: torch.Tensor, m_indices: torch.Tensor) -> None:
        x = dequantize_rows(*lhs)
        w = dequantize_weight_blocks(*rhs)
        for e in range(w.shape[0]):
            rows = m_indices == e
            out[rows] = (x[rows] @ w[e].T).to(out.dtype)

    def masked(lhs: Any, rhs: Any, out: torch.Tensor, masked_m: torch.Tensor, _: int) -> None:
        x = dequantize_rows(*lhs)
        w = dequantize_weight_blocks(*rhs)
        for e in range(w.shape[0]):
            m = int(masked_m[e])
            out[e, :m] = (x[e, :m] @ w[e].T).to(out.dtype)

    return Kernels(contiguous, masked, m_alignment)


class DeepGemmExperts:
    """One layer's local experts in FP8: `w13: [S, 2I, H]`, `w2: [S, H, I]` (quantized from the
    given weights). `__call__(result)` gives the expert outputs in the dispatch layout (bf16)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, kernels: Kernels | None = None):
        if kernels is None:
            dg = import_deep_gemm()
            if dg is None:
                raise RuntimeError("deep_gemm is not installed")
            kernels = Kernels.from_deep_gemm(dg)
        self.kernels = kernels
        self.w13 = quantize_weight_blocks(w13)
        self.w2 = quantize_weight_blocks(w2)
        self.hidden_size = w2.shape[1]
        self.intermediate_size = w2.shape[2]

    def __call__(self, result: DispatchResult) -> torch.Tensor:
        if result.layout == "masked":
            return self._masked(result.x, result.num_tokens_per_expert)
        return self._contiguous(result.x, result.num_tokens_per_expert)

    def _contiguous(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by slot → each slot's rows padded to the M alignment, GEMM, SiLU-mul,
        GEMM, padding dropped."""
        align = self.kernels.m_alignment
        padded_counts = (counts + align - 1) // align * align
        total = int(padded_counts.sum())
        start = torch.cumsum(padded_counts, 0) - padded_counts
        slot_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
        first_of_slot = torch.cumsum(counts, 0) - counts
        row_in_slot = torch.arange(x.shape[0], device=x.device) - first_of_slot[slot_of_row]
        dest = start[slot_of_row] + row_in_slot  # [rows]: position in the padded layout
        m_indices = torch.full((total,), -1, dtype=torch.int32, device=x.device)
        m_indices[dest] = slot_of_row.to(torch.int32)
        xp = x.new_zeros(total, x.shape[1])
        xp[dest] = x
        gate_up = torch.empty(total, 2 * self.intermediate_size, dtype=torch.bfloat16,
                              device=x.device)  # fmt: skip
        self.kernels.contiguous(quantize_rows(xp), self.w13, gate_up, m_indices)
        gate, up = gate_up.float().chunk(2, dim=-1)
        h = F.silu(gate) * up
        out = torch.empty(total, self.hidden_size, dtype=torch.bfloat16, device=x.device)
        self.kernels.contiguous(quantize_rows(h), self.w2, out, m_indices)
        return out[dest].to(x.dtype)

    def _masked(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        num_slots, max_m, _ = x.shape
        masked_m = counts.to(torch.int32)
        expected_m = max(1, int(counts.float().mean().ceil()))
        gate_up = torch.empty(num_slots, max_m, 2 * self.intermediate_size,
                              dtype=torch.bfloat16, device=x.device)  # fmt: skip
        self.kernels.masked(quantize_rows(x), self.w13, gate_up, masked_m, expected_m)
        gate, up = gate_up.float().chunk(2, dim=-1)
        h = F.silu(gate) * up
        out = torch.empty(num_slots, max_m, self.hidden_size, dtype=torch.bfloat16,
                          device=x.device)  # fmt: skip
        self.kernels.masked(quantize_rows(h), self.w2, out, masked_m, expected_m)
        return out.to(x.dtype)
