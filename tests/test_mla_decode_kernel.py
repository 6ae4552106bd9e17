"""Paged MLA decode kernel (`workers.kernels.mla_decode`) against plain torch.

Without CUDA the kernels run under Triton's interpreter (slow, so the shapes are tiny); the
`gpu` tests check DeepSeek V2-Lite / V3 shapes and CUDA-graph capture on a real device.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py chose the interpreter where there is no GPU

from workers.kernels import kernels_usable  # noqa: E402
from workers.kernels.mla_decode import (  # noqa: E402
    BLOCK_N,
    default_num_splits,
    mla_decode,
    mla_decode_reference,
)
from workers.model.mla import paged_decode_inputs, paged_decode_torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if not kernels_usable(DEVICE):  # triton was imported before TRITON_INTERPRET could be set
    pytest.skip("the Triton kernels cannot run here", allow_module_level=True)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference magnitude."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def _make_case(
    lens: list[int],
    num_heads: int,
    kv_lora: int,
    rope: int,
    page_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_pages: int = 3,
    poison: bool = True,
    device: torch.device = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """q, a paged cache holding the requests' tokens on shuffled pages, block table, seq_lens,
    scale. With `poison`, every slot no request owns -- the tails of last pages, spare pages, and
    what block-table entries past a request's length point at -- holds NaN, so a kernel that
    reads a token it should not gives NaN."""
    gen = torch.Generator().manual_seed(seed)
    pages_per = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per) + spare_pages
    max_pages = max(pages_per + [1]) + 1  # one unused column for every request
    perm = torch.randperm(num_pages, generator=gen)
    kv_dim = kv_lora + rope
    fill = float("nan") if poison else 0.0
    cache = torch.full((num_pages * page_size, kv_dim), fill)
    poison_page = int(perm[-1])  # a spare page
    block_table = torch.full((len(lens), max_pages), poison_page, dtype=torch.int32)
    next_page = 0
    for b, n in enumerate(lens):
        pages = perm[next_page : next_page + pages_per[b]]
        next_page += pages_per[b]
        block_table[b, : len(pages)] = pages.to(torch.int32)
        slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
        cache[slots] = torch.randn(n, kv_dim, generator=gen)
    q = torch.randn(len(lens), num_heads, kv_dim, generator=gen)
    scale = kv_dim**-0.5
    return (
        q.to(device, dtype),
        cache.to(device, dtype),
        block_table.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        scale,
    )


@pytest.mark.timeout(120)
def test_reference_matches_direct_absorbed_decode():
    """The reference against the padded-slots + mask + bmm form of `MLAttention._decode`."""
    lens, page_size, kv_lora = [5, 17, 1, 33], 4, 32
    q, cache, block_table, seq_lens, scale = _make_case(
        lens, num_heads=3, kv_lora=kv_lora, rope=16, page_size=page_size, poison=False
    )
    max_len = max(lens)
    pos = torch.arange(max_len, device=DEVICE)
    pages = block_table.long().gather(1, (pos // page_size).expand(len(lens), -1))
    slots = pages * page_size + pos % page_size  # [B, L]; padding points at some valid slot
    mask = pos[None, :] < seq_lens[:, None].long()
    slots = slots.masked_fill(~mask, 0)
    latent = cache.index_select(0, slots.flatten()).view(*slots.shape, -1).to(q.dtype)
    scores = torch.bmm(q, latent.transpose(1, 2)) * scale
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    direct = torch.bmm(probs, latent[..., :kv_lora])

    ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    assert ref.shape == (len(lens), 3, kv_lora)
    assert _rel_err(ref, direct) < 1e-5


# (lens, heads, kv_lora, rope, page_size): contexts around and off the BLOCK_N / page edges.
CASES = {
    "pow2_dims": ([33, 1, 70, 32, 16], 4, 32, 16, 4),
    "odd_dims": ([70, 31, 0, 9], 2, 48, 8, 16),
    "two_head_blocks": ([40, 65], 18, 32, 8, 4),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("padded", [True, False])
def test_torch_decode_path_matches_reference(case: str, dtype: torch.dtype, padded: bool):
    """`paged_decode_torch` (the engine's decode attention without Triton), its step inputs
    built inside or passed in (as every layer after a step's first gets them). Slots past a
    context hold stale finite values, as in the engine's cache (zeroed at start). `padded`:
    with a zero-length row (a padding row, zeroed), or with none (the zeroing is skipped)."""
    lens, heads, kv_lora, rope, page_size = CASES[case]
    lens = [*lens, 0] if padded else [n for n in lens if n]
    q, cache, block_table, seq_lens, scale = _make_case(
        lens, heads, kv_lora, rope, page_size, dtype=dtype, poison=False
    )
    cache[cache == 0] = 7.0  # stale values in the padding, not zeros that would hide a leak
    ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    inputs = paged_decode_inputs(block_table, seq_lens, page_size, q.dtype)
    for given in (None, inputs):
        out = paged_decode_torch(
            q, cache, block_table, seq_lens, page_size, kv_lora, scale, inputs=given
        )
        assert out.shape == ref.shape and out.dtype == dtype
        assert (inputs.empty is None) == (not padded)
        if padded:
            assert (out[-1] == 0).all()  # the zero-length row
        assert _rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_splits", [None, 1, 2, 7])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_fp32(case: str, num_splits: int | None):
    lens, heads, kv_lora, rope, page_size = CASES[case]
    q, cache, block_table, seq_lens, scale = _make_case(lens, heads, kv_lora, rope, page_size)
    out = mla_decode(q, cache, block_table, seq_lens, page_size, kv_lora, scale, num_splits)
    ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # fp32 throughout (IEEE dots on a GPU): only summation order differs.
    assert _rel_err(out, ref) < 1e-4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_kernel_matches_reference_bf16(num_splits: int | None):
    lens, heads, kv_lora, rope, page_size = CASES["odd_dims"]
    q, cache, block_table, seq_lens, scale = _make_case(
        lens, heads, kv_lora, rope, page_size, dtype=torch.bfloat16, seed=1
    )
    out = mla_decode(q, cache, block_table, seq_lens, page_size, kv_lora, scale, num_splits)
    ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    assert out.dtype == torch.bfloat16
    # The reference rounds an fp32 result to bf16 (2^-9 relative); the kernel also rounds the
    # softmax weights to bf16 before P @ V on a GPU (2^-9 each, averaging out), so both stay
    # well inside 2e-2.
    assert _rel_err(out, ref) < 2e-2


@pytest.mark.timeout(120)
def test_more_splits_than_tiles_leaves_empty_splits_out():
    """64 splits over contexts of at most 3 tiles: most chunks are empty and must not count."""
    lens, heads, kv_lora, rope, page_size = CASES["pow2_dims"]
    q, cache, block_table, seq_lens, scale = _make_case(lens, heads, kv_lora, rope, page_size)
    ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    out = mla_decode(q, cache, block_table, seq_lens, page_size, kv_lora, scale, num_splits=64)
    assert _rel_err(out, ref) < 1e-4


@pytest.mark.timeout(120)
def test_zero_length_rows_give_zeros():
    lens = [0, 12, 0]
    q, cache, block_table, seq_lens, scale = _make_case(lens, 2, 32, 16, 4)
    out = mla_decode(q, cache, block_table, seq_lens, 4, 32, scale, num_splits=2)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    ref = mla_decode_reference(q, cache, block_table, seq_lens, 4, 32, scale)
    assert _rel_err(out[1], ref[1]) < 1e-4

    q, cache, block_table, seq_lens, scale = _make_case([0, 0], 2, 32, 16, 4)
    out = mla_decode(q, cache, block_table, seq_lens, 4, 32, scale)
    assert (out == 0).all()


@pytest.mark.timeout(120)
def test_noncontiguous_query_view():
    """q as the engine builds it: a slice of a wider tensor (made contiguous inside)."""
    lens, heads, kv_lora, rope, page_size = [20, 7], 3, 32, 16, 4
    q, cache, block_table, seq_lens, scale = _make_case(lens, heads, kv_lora, rope, page_size)
    wide = torch.cat((q, torch.randn_like(q)), dim=-1)[..., : kv_lora + rope]
    out = mla_decode(wide, cache, block_table, seq_lens, page_size, kv_lora, scale)
    ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    assert _rel_err(out, ref) < 1e-4


def test_default_num_splits():
    # V2-Lite (16 heads, one head block per request) on 132 SMs, two waves = 264 programs.
    assert default_num_splits(1, 16, 4096, 132) == 64  # capped by MAX_SPLITS
    assert default_num_splits(32, 16, 4096, 132) == 9
    assert default_num_splits(256, 16, 4096, 132) == 2
    assert default_num_splits(512, 128, 4096, 132) == 1
    assert default_num_splits(1, 16, 40, 132) == -(-40 // BLOCK_N)  # one tile per split
    assert default_num_splits(4, 16, 0, 132) == 1


# ---- GPU ----------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _v2_lite_lens(batch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(700, 1300, (batch,), generator=gen).tolist()


@pytest.mark.gpu
@pytest.mark.timeout(120)
@needs_cuda
@pytest.mark.parametrize(
    ("batch", "heads", "dtype", "tol"),
    [
        (32, 16, torch.bfloat16, 2e-2),  # V2-Lite
        (32, 16, torch.float32, 1e-4),
        (4, 128, torch.bfloat16, 2e-2),  # V3's head count: 8 head blocks, many splits
    ],
)
@pytest.mark.parametrize("num_splits", [None, 1])
def test_gpu_deepseek_shapes(batch, heads, dtype, tol, num_splits):
    lens = _v2_lite_lens(batch, seed=batch + heads)
    lens[0], lens[-1] = 1, 17  # and a couple of short ones
    q, cache, block_table, seq_lens, scale = _make_case(
        lens, heads, 512, 64, 16, dtype=dtype, seed=2, device=torch.device("cuda")
    )
    out = mla_decode(q, cache, block_table, seq_lens, 16, 512, scale, num_splits)
    ref = mla_decode_reference(q, cache, block_table, seq_lens, 16, 512, scale)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < tol


@pytest.mark.gpu
@pytest.mark.timeout(120)
@needs_cuda
def test_gpu_cuda_graph_replay_reads_lengths_on_device():
    """Capture once, then change q, block_table and seq_lens in place (longer and shorter
    contexts, a zero row) and replay: the graph must follow them."""
    device = torch.device("cuda")
    page_size, kv_lora = 16, 512
    lens0 = [300, 17, 1000, 64]
    q, cache, block_table, seq_lens, scale = _make_case(
        lens0,
        16,
        kv_lora,
        64,
        page_size,
        dtype=torch.bfloat16,
        seed=3,
        spare_pages=300,
        poison=False,
        device=device,
    )
    cache.copy_(torch.randn(cache.shape, device=device).to(cache.dtype))  # every slot in use
    # Room for longer contexts: widen the table to 80 pages (1280 tokens) per request.
    num_pages = cache.shape[0] // page_size
    max_pages = 80
    assert num_pages >= len(lens0) * max_pages
    table = torch.zeros(len(lens0), max_pages, dtype=torch.int32, device=device)
    table[:, : block_table.shape[1]] = block_table
    block_table = table

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        mla_decode(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(q, cache, block_table, seq_lens, page_size, kv_lora, scale)

    graph.replay()
    ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
    assert _rel_err(out, ref) < 2e-2

    gen = torch.Generator().manual_seed(4)
    for new_lens in ([1200, 0, 33, 640], [5, 1280, 1, 999]):
        pages = torch.randperm(num_pages, generator=gen)[: len(new_lens) * max_pages]
        block_table.copy_(pages.view(len(new_lens), max_pages).to(torch.int32))
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        graph.replay()
        ref = mla_decode_reference(q, cache, block_table, seq_lens, page_size, kv_lora, scale)
        assert torch.isfinite(out).all()
        assert _rel_err(out, ref) < 2e-2
