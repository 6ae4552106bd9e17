"""Small building blocks shared by attention and MoE: RMSNorm, linear, the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import cpu as cpu_kernels


def empty_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """`y = x @ weight.T (+ bias)`; the weight keeps the checkpoint's `[out, in]` layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = empty_param(out_features, in_features)
        self.bias = empty_param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = empty_param(dim)
        self.eps = eps
        self.backend = "torch"  # or "cpu": workers.kernels.cpu (float32 CPU tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu":
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def fuse_linears(*linears: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) stacking `linears`' outputs; each linear's own weight becomes a
    view into it, so the memory is not doubled and the checkpoint names keep working."""
    weight = torch.cat([lin.weight.data for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    bias = (
        torch.cat([lin.bias.data for lin in linears if lin.bias is not None])
        if all(has_bias)
        else None
    )
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse linears where only some have a bias")
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start : start + rows]
        if lin.bias is not None and bias is not None:
            lin.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias


class MLP(nn.Module):
    """Dense SwiGLU feed-forward (dense layers and shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)
        self._gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """Run gate and up as one GEMM from now on (call after the weights are in place)."""
        self._gate_up = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *self._gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
