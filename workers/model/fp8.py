"""FP8 block-scaled weights (DeepSeek-V3 checkpoints): one float32 scale per `(b0, b1)` block
of a weight, `weight ≈ fp8 value * its block's scale` (`weight_scale_inv` in checkpoints)."""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn


def dequantize_block_fp8(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """`w: [..., N, K]` float8 and `scale: [..., ceil(N/b0), ceil(K/b1)]` → float32 `w * scale`
    of each element's block (edges need not be whole blocks)."""
    b0, b1 = block
    n, k = w.shape[-2:]
    if tuple(scale.shape[-2:]) != (-(-n // b0), -(-k // b1)):
        raise ValueError(f"scale {tuple(scale.shape)} does not tile {tuple(w.shape)} by {block}")
    full = scale.float().repeat_interleave(b0, dim=-2).repeat_interleave(b1, dim=-1)
    return w.float() * full[..., :n, :k]


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w: [..., N, K]` → (float8_e4m3fn weight, float32 scales `[..., ceil(N/b0), ceil(K/b1)]`),
    one scale per block = its amax / 448, so `dequantize_block_fp8` of the pair ≈ `w`."""
    *lead, rows, cols = w.shape
    b0, b1 = block
    grid = (-(-rows // b0), -(-cols // b1))
    padded = w.new_zeros(*lead, grid[0] * b0, grid[1] * b1, dtype=torch.float32)
    padded[..., :rows, :cols] = w
    blocks = padded.view(*lead, grid[0], b0, grid[1], b1)
    scale = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(*lead, grid[0] * b0, grid[1] * b1)[..., :rows, :cols].contiguous()
    return q, scale
