"""Rotary position embedding for the `qk_rope_head_dim` part of MLA (default, linear, YaRN)."""

from __future__ import annotations

import math

import torch

from workers.model.config import RopeConfig, yarn_mscale


def inv_freq_and_attention_factor(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[dim // 2]` and the factor applied to cos/sin."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0

    # YaRN: interpolate low frequencies, extrapolate high ones, blend linearly in between.
    factor = rope.factor
    orig_max = rope.original_max_position_embeddings or 4096
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(
            factor, rope.mscale_all_dim
        )
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding:
    """Precomputed cos/sin tables `[max_positions, dim // 2]`, scaled by the attention factor."""

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, interleave: bool):
        inv_freq, attention_factor = inv_freq_and_attention_factor(rope, dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.cos = angles.cos() * attention_factor
        self.sin = angles.sin() * attention_factor
        self.interleave = interleave
        self.max_positions = max_positions

    def to(self, device: torch.device, dtype: torch.dtype) -> RotaryEmbedding:
        self.cos = self.cos.to(device=device, dtype=dtype)
        self.sin = self.sin.to(device=device, dtype=dtype)
        return self

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos, sin: [T, dim // 2]` for `positions: [T]`, computed once per forward."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `x: [T, ..., dim]` by the `lookup` of its positions.

        The output is always in "half" layout (first halves of all pairs, then second halves);
        queries and keys share it, so their dot products are unchanged.
        """
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
