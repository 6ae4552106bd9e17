"""Small building blocks shared by attention and MoE: RMSNorm, linear, the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import cpu as cpu_kernels
from workers.kernels.cpu import blocks as cpu_blocks


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

    def store_transposed(self) -> None:
        """Keep the weight in memory as its transpose (see `transposed_storage`)."""
        self.weight.data = transposed_storage(self.weight.data)


def transposed_storage(w: torch.Tensor) -> torch.Tensor:
    """`w` (2-D) with the same shape and values, as a view of a contiguous `w.T`: what the CPU
    kernels read (`w.t()` is then contiguous, `[in, out]`). torch's GEMMs take either layout
    at the same speed, so the torch paths are unchanged."""
    return w if w.t().is_contiguous() else w.t().contiguous().t()


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


def fuse_linears(
    *linears: Linear, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) stacking `linears`' outputs; each linear's own weight becomes a
    view into it, so the memory is not doubled and the checkpoint names keep working.
    `transposed`: the fused weight is kept as `transposed_storage`."""
    weight = torch.cat([lin.weight.data for lin in linears])
    if transposed:
        weight = transposed_storage(weight)
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
        # (w13t, w2t) once `use_cpu_kernel` ran: the C kernel's transposed weights.
        self.cpu_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def fuse(self, transposed: bool = False) -> None:
        """Run gate and up as one GEMM from now on (call after the weights are in place)."""
        self._gate_up = fuse_linears(self.gate_proj, self.up_proj, transposed=transposed)

    def use_cpu_kernel(self) -> None:
        """Run as `workers.kernels.cpu.blocks.mlp` (float32 CPU weights without biases), after
        `fuse(transposed=True)`: the weights are kept transposed, the module's parameters stay
        views of them."""
        if self.down_proj.bias is not None or self.gate_proj.bias is not None:
            return
        assert self._gate_up is not None and self._gate_up[0].t().is_contiguous(), (
            "fuse(transposed=True) first"
        )
        self.down_proj.store_transposed()
        self.cpu_weights = (self._gate_up[0].t(), self.down_proj.weight.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_weights is not None and x.dtype == torch.float32:
            return cpu_blocks.mlp(x, *self.cpu_weights)
        if self._gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *self._gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
