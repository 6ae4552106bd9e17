"""The Triton fused MoE (`workers.kernels.fused_moe`) against plain torch.

Without CUDA the kernels run under Triton's interpreter, so the CPU tests use tiny shapes
(hidden/intermediate not multiples of the tiles, skipped routing slots, an expert with no
tokens). The `gpu` tests run realistic DeepSeek-sized shapes and a CUDA-graph capture.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py chose the interpreter where there is no GPU

from workers.kernels import kernels_usable  # noqa: E402
from workers.kernels.fused_moe import fused_moe, fused_moe_reference  # noqa: E402
from workers.kernels.moe_align import align_tokens, max_aligned_rows  # noqa: E402
from workers.model.fp8 import dequantize_block_fp8  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if not kernels_usable(DEVICE):  # triton was imported before TRITON_INTERPRET could be set
    pytest.skip("the Triton kernels cannot run here", allow_module_level=True)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

# Errors are max-abs differences relative to the reference's max-abs. fp32: the same math in
# another order (< 1e-4). bf16/fp16: the kernel rounds the SiLU-and-mul intermediate and each
# expert's output to the input dtype (the reference keeps fp32); the interpreter also
# truncates fp32 -> bf16 instead of rounding to nearest, so allow a few bf16 ulps (< 2e-2).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# Big enough tiles that the interpreter runs few programs, small enough that the shapes
# below need several N and K tiles, the last ones partial.
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def _routing(
    num_tokens: int, num_experts: int, top_k: int, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token drawn from all but the last expert (which gets no tokens),
    with a few slots skipped (-1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, num_experts - 1, generator=g).topk(top_k, dim=1).indices
    ids[1, 0] = -1
    ids[num_tokens // 2, top_k - 1] = -1
    weights = torch.rand(num_tokens, top_k, generator=g)
    return ids.to(device), weights.to(device)


def _weights(
    num_experts: int, hidden: int, inter: int, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, device=device)
    w2 = torch.randn(num_experts, hidden, inter, generator=g, device=device)
    return w13 / hidden**0.5, w2 / inter**0.5


def _quantize(w: torch.Tensor, block_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`w: [E, N, K]` float → fp8 and `[E, ceil(N/bn), ceil(K/bk)]` scales (amax / 448)."""
    num_experts, n, k = w.shape
    bn, bk = block_shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = w.new_zeros(num_experts, nb * bn, kb * bk)
    padded[:, :n, :k] = w
    blocks = padded.view(num_experts, nb, bn, kb, bk)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, :, None, :, None]).to(FP8).view(num_experts, nb * bn, kb * bk)
    return q[:, :n, :k].contiguous(), scale.float()


def _uneven(w: torch.Tensor, block: int, seed: int) -> torch.Tensor:
    """Scale `w`'s (block x block) tiles by factors in [0.1, 10], so that the block scales
    differ a lot and a wrong scale index shows."""
    g = torch.Generator().manual_seed(seed)
    num_experts, n, k = w.shape
    f = 10 ** (2 * torch.rand(num_experts, -(-n // block), -(-k // block), generator=g) - 1)
    f = f.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :k]
    return w * f.to(w.device)


# --------------------------------------------------------------------------------------------
# align_tokens


def _align_python(ids: list[list[int]], num_experts: int, block_m: int):
    flat = [e for row in ids for e in row]
    n = len(flat)
    rows: list[int] = []
    experts: list[int] = []
    for e in range(num_experts):
        group = [i for i, x in enumerate(flat) if x == e]
        pad = -len(group) % block_m
        rows += group + [n] * pad
        experts += [e] * ((len(group) + pad) // block_m)
    used = len(rows)
    max_rows = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    rows += [n] * (max_rows - used)
    experts += [-1] * (max_rows // block_m - len(experts))
    return rows, experts, used


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("case", ["routed", "one_token", "all_skipped"])
def test_align_tokens_matches_python(dtype, block_m, case):
    num_experts = 5
    if case == "routed":
        ids, _ = _routing(11, num_experts, 3, seed=block_m)
    elif case == "one_token":
        ids = torch.tensor([[3, 0]])
    else:
        ids = torch.full((4, 2), -1)
    ids = ids.to(dtype)
    n = ids.numel()
    got = align_tokens(ids, num_experts, block_m)
    max_rows = max_aligned_rows(n, num_experts, block_m)
    assert got.sorted_ids.shape == (max_rows,) and got.sorted_ids.dtype == torch.int32
    assert got.block_expert.shape == (max_rows // block_m,)
    assert got.block_expert.dtype == torch.int32
    assert got.num_rows_padded.shape == (1,) and got.num_rows_padded.dtype == torch.int32

    rows, experts, used = _align_python(ids.tolist(), num_experts, block_m)
    assert got.sorted_ids.tolist() == rows
    assert got.block_expert.tolist() == experts
    assert int(got.num_rows_padded) == used

    # The invariants, checked on the output directly.
    flat = ids.reshape(-1).tolist()
    sorted_ids = got.sorted_ids.tolist()
    real = [i for i in sorted_ids if i != n]
    assert sorted(real) == [i for i, e in enumerate(flat) if e >= 0]  # each valid id once
    assert used % block_m == 0
    for b, e in enumerate(got.block_expert.tolist()):
        block = sorted_ids[b * block_m : (b + 1) * block_m]
        if b * block_m >= used:
            assert e == -1 and block == [n] * block_m
        else:
            assert e >= 0 and any(i != n for i in block)
            assert all(flat[i] == e for i in block if i != n)  # one expert per block


# --------------------------------------------------------------------------------------------
# The reference, against a per-token loop


def _per_token_loop(x, w13, w2, ids, weights, scales=None, block_shape=(128, 128)):
    """One token and one routing slot at a time, dequantizing by explicit block indices."""
    if scales is not None:
        w13, w2 = (
            q.float()
            * s[:, torch.arange(q.shape[1]) // block_shape[0]][
                :, :, torch.arange(q.shape[2]) // block_shape[1]
            ]
            for q, s in zip((w13, w2), scales, strict=True)
        )
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            xt = x[t].float()
            gate = w13[e, :inter].float() @ xt
            up = w13[e, inter:].float() @ xt
            h = gate / (1 + torch.exp(-gate)) * up
            out[t] += float(weights[t, k]) * (w2[e].float() @ h)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fp8", [False, True])
def test_reference_matches_per_token_loop(fp8):
    num_tokens, hidden, inter, num_experts, top_k = 9, 48, 40, 5, 2
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(0))
    w13, w2 = _weights(num_experts, hidden, inter, seed=1)
    ids, weights = _routing(num_tokens, num_experts, top_k, seed=2)
    kw: dict[str, Any] = {}
    scales = None
    block_shape = (128, 128)
    if fp8:
        block_shape = (16, 32)
        w13 = _uneven(w13, 16, seed=3)
        q13, s13 = _quantize(w13, block_shape)
        assert s13.shape == (num_experts, 5, 2)
        assert _rel(dequantize_block_fp8(q13, s13, block_shape), w13) < 0.07  # fp8: 3 bits
        (w13, s13), (w2, s2) = (q13, s13), _quantize(w2, block_shape)
        kw = {"w13_scale": s13, "w2_scale": s2, "block_shape": block_shape}
        scales = (s13, s2)
    ref = fused_moe_reference(x, w13, w2, ids, weights, **kw)
    loop = _per_token_loop(x, w13, w2, ids, weights, scales, block_shape)
    assert _rel(ref, loop) < 1e-5


# --------------------------------------------------------------------------------------------
# The kernels, against the reference


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["default", "small_tiles"])
def test_fused_moe_matches_reference(dtype, config):
    num_tokens, hidden, inter, num_experts, top_k = 13, 48, 40, 6, 3
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(3)).to(dtype)
    w13, w2 = (w.to(dtype) for w in _weights(num_experts, hidden, inter, seed=4))
    ids, weights = _routing(num_tokens, num_experts, top_k, seed=5)
    out = fused_moe(x, w13, w2, ids, weights, config=config)
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    assert out.shape == x.shape and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.timeout(120)
def test_fused_moe_decode_and_skipped_tokens():
    """One token (decode-sized), and tokens whose every slot is skipped come out zero."""
    hidden, inter, num_experts = 64, 32, 8
    w13, w2 = _weights(num_experts, hidden, inter, seed=6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, hidden, generator=g)
    ids = torch.tensor([[5, 2], [-1, -1], [0, 7]], dtype=torch.int32)
    weights = torch.rand(3, 2, generator=g)
    out = fused_moe(x, w13, w2, ids, weights)
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    assert _rel(out, ref) < TOL[torch.float32]
    assert torch.equal(out[1], torch.zeros(hidden))
    one = fused_moe(x[:1], w13, w2, ids[:1], weights[:1])
    assert _rel(one, ref[:1]) < TOL[torch.float32]
    assert torch.equal(fused_moe(x, w13, w2, ids.fill_(-1), weights), torch.zeros_like(x))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "block_shape, config",
    [((16, 16), None), ((16, 32), SMALL_TILES), ((128, 128), None)],
    ids=["16x16", "16x32_small_tiles", "128x128"],
)
def test_fused_moe_fp8_weights_match_dequantized_reference(dtype, block_shape, config):
    """w8a16: fp8 weights with block scales (the up rows start mid-block: I = 40 is no
    multiple of 16) against the reference on the dequantized weights."""
    num_tokens, hidden, inter, num_experts, top_k = 13, 48, 40, 6, 3
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(8)).to(dtype)
    w13, w2 = _weights(num_experts, hidden, inter, seed=9)
    w13, w2 = _uneven(w13, 16, seed=10), _uneven(w2, 16, seed=11)
    (q13, s13), (q2, s2) = _quantize(w13, block_shape), _quantize(w2, block_shape)
    ids, weights = _routing(num_tokens, num_experts, top_k, seed=12)
    kw = {"w13_scale": s13, "w2_scale": s2, "block_shape": block_shape}
    out = fused_moe(x, q13, q2, ids, weights, config=config, **kw)
    ref = fused_moe_reference(x, q13, q2, ids, weights, **kw)
    assert out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]
    # The quantization error itself is far larger than the kernel's: the scales are used.
    assert _rel(ref, fused_moe_reference(x, w13.to(dtype), w2.to(dtype), ids, weights)) < 0.1


@pytest.mark.timeout(120)
def test_fused_moe_rejects_k_tiles_straddling_scale_blocks():
    w13, w2 = _weights(2, 48, 40, seed=13)
    (q13, s13), (q2, s2) = _quantize(w13, (16, 16)), _quantize(w2, (16, 16))
    ids, weights = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1)
    with pytest.raises(ValueError, match="BLOCK_K"):
        fused_moe(
            torch.randn(2, 48), q13, q2, ids, weights, w13_scale=s13, w2_scale=s2,
            block_shape=(16, 16), config={"BLOCK_K": 32},
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# CUDA


GPU_SHAPE = {"hidden": 2048, "inter": 1408, "num_experts": 64, "top_k": 6}  # DeepSeek-V2-Lite


def _gpu_weights(fp8: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    w13, w2 = _weights(
        GPU_SHAPE["num_experts"], GPU_SHAPE["hidden"], GPU_SHAPE["inter"], 0, device="cuda"
    )
    if not fp8:
        return w13.bfloat16(), w2.bfloat16(), {}
    (q13, s13), (q2, s2) = _quantize(w13, (128, 128)), _quantize(w2, (128, 128))
    return q13, q2, {"w13_scale": s13, "w2_scale": s2}


def _gpu_inputs(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, GPU_SHAPE["hidden"], generator=g, device="cuda").bfloat16()
    ids, weights = _routing(
        num_tokens, GPU_SHAPE["num_experts"], GPU_SHAPE["top_k"], seed, device="cuda"
    )
    return x, ids, weights


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fused_moe_cuda_deepseek_shapes(fp8):
    w13, w2, kw = _gpu_weights(fp8)
    x, ids, weights = _gpu_inputs(256, seed=1)
    out = fused_moe(x, w13, w2, ids, weights, **kw)
    ref = fused_moe_reference(x, w13, w2, ids, weights, **kw)
    assert _rel(out, ref) < TOL[torch.bfloat16]
    decode = fused_moe(x[:4], w13, w2, ids[:4], weights[:4], **kw)  # BLOCK_M 16
    assert _rel(decode, ref[:4]) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fused_moe_cuda_graph_replays_new_routing(fp8):
    """No host sync: an eager call under sync-debug mode "error", then a captured graph
    replayed on new inputs (a new routing) copied into its static buffers."""
    w13, w2, kw = _gpu_weights(fp8)
    sx, sids, sweights = _gpu_inputs(64, seed=1)  # the graph's static inputs
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        fused_moe(sx, w13, w2, sids, sweights, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(sx, w13, w2, sids, sweights, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(sx, w13, w2, sids, sweights, **kw)

    for seed in (2, 3):
        new_x, new_ids, new_weights = _gpu_inputs(64, seed=seed)
        new_ids[seed::7] = -1
        for buf, new in zip((sx, sids, sweights), (new_x, new_ids, new_weights), strict=True):
            buf.copy_(new)
        graph.replay()
        ref = fused_moe_reference(new_x, w13, w2, new_ids, new_weights, **kw)
        assert _rel(static_out, ref) < TOL[torch.bfloat16]
