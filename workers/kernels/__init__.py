"""Triton kernels for the CUDA fast path (fused MoE, paged MLA decode).

Triton is optional: `triton_available()` says whether the kernels can run. On a machine without
a GPU they run under Triton's interpreter (`TRITON_INTERPRET=1`, set before `triton` is first
imported), which is how the CPU tests check them against plain torch.

The interpreter's `tl.dot` misreads bf16/fp16 operands, so kernels upcast their dot operands to
float32 when `INTERPRET` is set (pass it as the `UPCAST` constexpr); on a GPU they run the
tensor-core MMA in the input dtype.
"""

from __future__ import annotations

import importlib.util
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_usable(device: torch.device) -> bool:
    """True where the Triton kernels run on tensors on `device`: CUDA with triton, or any
    device under the interpreter."""
    if not triton_available():
        return False
    return INTERPRET or device.type == "cuda"
