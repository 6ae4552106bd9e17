"""The C kernels of `workers.kernels.cpu` against plain-torch references, and their fallback.

Shapes cover the vector paths (multiples of 16 and of the 4 x 64 GEMM tile) and the scalar
tails (odd sizes), padding rows, unowned cache slots holding NaN, and bad indices.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from workers.kernels import cpu
from workers.model.batch import AttentionMetadata
from workers.model.config import ModelConfig
from workers.model.moe import ExpertLoad, Gate
from workers.model.random_init import random_model
from workers.model.tiny import tiny_config

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not cpu.available(), reason="no C compiler: the kernels cannot build"),
]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# --- paged MLA decode ---------------------------------------------------------------------


def _paged_case(lens: list[int], heads: int, kv_lora: int, rope: int, page_size: int, seed: int):
    """q, a cache holding each request's tokens on shuffled pages (every other slot NaN), the
    block table (unused entries point at a NaN page) and lengths."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per) + 2
    perm = torch.randperm(num_pages, generator=g).tolist()
    cache = torch.full((num_pages * page_size, kv_lora + rope), float("nan"))
    table = torch.full((len(lens), max(pages_per + [1]) + 1), perm[-1], dtype=torch.int32)
    for b, n in enumerate(lens):
        for p in range(pages_per[b]):
            page = perm.pop(0)
            table[b, p] = page
            used = min(page_size, n - p * page_size)
            start = page * page_size
            cache[start : start + used] = torch.randn(used, kv_lora + rope, generator=g)
    q = torch.randn(len(lens), heads, kv_lora + rope, generator=g)
    return q, cache, table, torch.tensor(lens, dtype=torch.int32)


def _mla_reference(q, cache, table, lens, page_size, kv_lora, scale) -> torch.Tensor:
    out = torch.zeros(q.shape[0], q.shape[1], kv_lora)
    for b, n in enumerate(lens.tolist()):
        if n:
            slots = (table[b].long()[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
            kv = cache[slots]
            out[b] = torch.softmax(scale * q[b] @ kv.T, dim=-1) @ kv[:, :kv_lora]
    return out


@pytest.mark.parametrize(
    ("lens", "heads", "kv_lora", "rope", "page_size"),
    [
        ([1, 17, 40, 0, 64], 4, 64, 16, 16),  # the tiny model's shapes, a padding row
        ([5, 33, 100], 16, 512, 64, 64),  # DeepSeek-V2-Lite / V3's latent and rope widths
        ([3, 9, 31], 3, 40, 8, 4),  # widths that are no multiple of 16: the scalar tails
        ([20, 50], 6, 80, 16, 16),  # register tiles of 4 heads x 64 columns, and their tails
        ([200], 1, 16, 0, 7),
    ],
)
def test_mla_decode_matches_reference(lens, heads, kv_lora, rope, page_size):
    q, cache, table, seq_lens = _paged_case(lens, heads, kv_lora, rope, page_size, seed=len(lens))
    scale = (kv_lora + rope) ** -0.5
    out = cpu.mla_decode(q, cache, table, seq_lens, page_size, kv_lora, scale)
    ref = _mla_reference(q, cache, table, seq_lens, page_size, kv_lora, scale)
    assert torch.isfinite(out).all()  # no unowned (NaN) slot was read
    assert _rel_err(out, ref) < 1e-5
    assert (out[seq_lens == 0] == 0).all()


def test_mla_decode_softmax_over_a_wide_score_range():
    """Scores spanning hundreds: exp's range reduction and clamp, the max subtracted first."""
    q, cache, table, seq_lens = _paged_case([48, 70], 2, 32, 16, 16, seed=3)
    q *= 40
    out = cpu.mla_decode(q, cache, table, seq_lens, 16, 32, 1.0)
    ref = _mla_reference(q, cache, table, seq_lens, 16, 32, 1.0)
    assert _rel_err(out, ref) < 1e-5


def test_mla_decode_refuses_a_page_outside_the_cache():
    q, cache, table, seq_lens = _paged_case([20], 2, 16, 0, 8, seed=0)
    table[0, 1] = cache.shape[0] // 8  # one past the last page
    with pytest.raises(ValueError, match="outside the KV cache"):
        cpu.mla_decode(q, cache, table, seq_lens, 8, 16, 0.1)
    with pytest.raises(TypeError, match="float32"):
        cpu.mla_decode(q.double(), cache, table, seq_lens, 8, 16, 0.1)


# --- routed experts ------------------------------------------------------------------------


def _experts_reference(x, w13, w2, ids, weights) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize(
    ("num_tokens", "experts", "hidden", "inter", "top_k"),
    [
        (64, 16, 128, 64, 4),  # the tiny model: full 4 x 64 tiles
        (7, 8, 48, 40, 3),  # tails everywhere, tiles of fewer than 4 rows
        (1, 4, 256, 96, 2),
        (0, 4, 64, 32, 2),
    ],
)
def test_moe_experts_match_reference(num_tokens, experts, hidden, inter, top_k):
    g = torch.Generator().manual_seed(num_tokens)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.1
    x = torch.randn(num_tokens, hidden, generator=g) * 3  # large gates: SiLU's both tails
    # Distinct experts per token; the last expert gets none.
    picks = [torch.randperm(experts - 1, generator=g)[:top_k] for _ in range(num_tokens)]
    ids = torch.stack(picks) if picks else torch.empty(0, top_k, dtype=torch.int64)
    weights = torch.rand(num_tokens, top_k, generator=g)
    w13t, w2t = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    out = cpu.moe_experts(x, ids, weights, w13t, w2t)
    ref = _experts_reference(x, w13, w2, ids, weights)
    assert out.shape == x.shape
    if num_tokens:
        assert _rel_err(out, ref) < 1e-5


def test_moe_experts_refuses_bad_ids_and_layouts():
    x, w13t, w2t = torch.randn(3, 16), torch.randn(4, 16, 8), torch.randn(4, 4, 16)
    ones = torch.ones(3, 1)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        cpu.moe_experts(x, torch.tensor([[0], [4], [1]]), ones, w13t, w2t)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        cpu.moe_experts(x, torch.tensor([[0], [-1], [1]]), ones, w13t, w2t)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.moe_experts(x, torch.zeros(3, 1, dtype=torch.int64), ones, w13t.transpose(1, 2), w2t)


# --- RMSNorm and routing -------------------------------------------------------------------


@pytest.mark.parametrize("dim", [128, 72, 5])
def test_rms_norm_matches_torch_on_strided_rows(dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(9, dim + 24, generator=g)[:, 3 : 3 + dim]  # a split's view: rows strided
    weight = torch.rand(dim, generator=g)
    out = cpu.rms_norm(x, weight, 1e-6)
    assert _rel_err(out, F.rms_norm(x, (dim,), weight, 1e-6)) < 1e-6
    x3 = torch.randn(2, 3, dim, generator=g)
    assert _rel_err(cpu.rms_norm(x3, weight, 1e-6), F.rms_norm(x3, (dim,), weight, 1e-6)) < 1e-6
    with pytest.raises(ValueError, match="does not match"):
        cpu.rms_norm(x, torch.rand(dim + 1), 1e-6)


def _v3_gate(experts: int, groups: int, topk_group: int, top_k: int, norm: bool) -> Gate:
    cfg = ModelConfig.from_hf(
        {
            "model_type": "deepseek_v3", "hidden_size": 32, "n_routed_experts": experts,
            "num_experts_per_tok": top_k, "n_group": groups, "topk_group": topk_group,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": norm,
            "routed_scaling_factor": 2.5, "num_hidden_layers": 1, "num_attention_heads": 1,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
            "vocab_size": 32, "intermediate_size": 16, "moe_intermediate_size": 16,
        }
    )  # fmt: skip
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(experts + groups)
    gate.weight.data = torch.randn(experts, 32, generator=g)
    assert gate.e_score_correction_bias is not None
    gate.e_score_correction_bias.data = torch.randn(experts, generator=g) * 0.3
    return gate


@pytest.mark.parametrize(
    ("experts", "groups", "topk_group", "top_k", "norm"),
    [(16, 4, 2, 4, True), (256, 8, 4, 8, True), (64, 1, 1, 6, False), (12, 4, 1, 3, True)],
)
def test_v3_routing_matches_the_torch_gate(experts, groups, topk_group, top_k, norm):
    gate = _v3_gate(experts, groups, topk_group, top_k, norm)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(7))
    ref = gate(x)
    gate.backend = "cpu"
    ours = gate(x)
    # Same experts per token (torch's order is unspecified), each with the same weight.
    ref_ids, order = ref.topk_ids.sort(dim=-1)
    ours_ids, ours_order = ours.topk_ids.sort(dim=-1)
    assert torch.equal(ours_ids, ref_ids)
    torch.testing.assert_close(
        ours.topk_weights.gather(1, ours_order), ref.topk_weights.gather(1, order)
    )


# --- whole blocks of a layer (layer.c) against the model's own torch path -----------------

# The tiny model (V3: q compression, interleaved YaRN rope, 16 experts in 4 groups), and a
# V2-shaped one without q compression whose widths are no multiple of 16 (the GEMM tails).
ODD_V3 = {
    **tiny_config(300, 0, 1), "hidden_size": 72, "intermediate_size": 40, "moe_intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 3,
    "q_lora_rank": None, "kv_lora_rank": 40, "qk_nope_head_dim": 24, "qk_rope_head_dim": 8,
    "v_head_dim": 20, "n_routed_experts": 12, "num_experts_per_tok": 3, "n_group": 4,
    "topk_group": 2, "n_shared_experts": 2, "rope_interleave": False, "rope_scaling": None,
}  # fmt: skip
BLOCK_CONFIGS = {"tiny": {**tiny_config(300, 0, 1), "num_hidden_layers": 2}, "odd": ODD_V3}


def _decode_meta(lens: list[int], page_size: int, num_slots: int, seed: int):
    """Metadata of a decode batch whose requests hold `lens` tokens (the new one included) on
    shuffled pages, and a cache of finite garbage."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-n // page_size) for n in lens]
    perm = torch.randperm(num_slots // page_size, generator=g).tolist()
    table = torch.zeros(len(lens), max(pages_per), dtype=torch.int32)
    for b in range(len(lens)):
        table[b, : pages_per[b]] = torch.tensor([perm.pop() for _ in range(pages_per[b])])
    pos = torch.tensor(lens, dtype=torch.int64) - 1
    slots = table[torch.arange(len(lens)), pos // page_size].long() * page_size + pos % page_size
    meta = AttentionMetadata(
        positions=pos, out_slots=slots, num_decode=len(lens), block_table=table,
        seq_lens=torch.tensor(lens, dtype=torch.int32), page_size=page_size, prefills=[],
        logits_indices=torch.arange(len(lens)),
    )  # fmt: skip
    return meta, g


@pytest.mark.parametrize("name", sorted(BLOCK_CONFIGS))
def test_attention_block_matches_the_torch_path(name):
    model = random_model(BLOCK_CONFIGS[name], "cpu", torch.float32, seed=3)
    attn = model.model.layers[1].self_attn
    assert attn.cpu_block is not None
    dim = attn.kv_lora_rank + attn.rope_dim
    lens = [1, 17, 40, 64, 3, 9, 100]  # 7 rows: a tile of 4 and a tail of 3
    meta, g = _decode_meta(lens, page_size=16, num_slots=16 * 40, seed=len(name))
    cache = torch.randn(16 * 40, dim, generator=g)
    x = torch.randn(len(lens), model.config.hidden_size, generator=g)
    cos_sin = model.rope.lookup(meta.positions)
    ours_cache = cache.clone()
    ours = attn(x, meta, model.rope, cos_sin, ours_cache)
    block, attn.cpu_block = attn.cpu_block, None
    for backend in ("cpu", "torch"):  # the torch path with either decode attention
        attn.decode_backend = backend
        ref_cache = cache.clone()
        ref = attn(x, meta, model.rope, cos_sin, ref_cache)
        assert _rel_err(ours, ref) < 1e-5
        torch.testing.assert_close(ours_cache, ref_cache, rtol=1e-5, atol=1e-6)
    changed = (ours_cache != cache).any(dim=1).nonzero().flatten()
    assert changed.tolist() == sorted(meta.out_slots.tolist())  # its own rows and no other
    attn.cpu_block = block


def test_attention_block_refuses_bad_indices():
    model = random_model(BLOCK_CONFIGS["tiny"], "cpu", torch.float32, seed=1)
    block = model.model.layers[0].self_attn.cpu_block
    assert block is not None
    meta, g = _decode_meta([5, 20], page_size=16, num_slots=64, seed=0)
    x = torch.randn(2, 128, generator=g)
    cache = torch.zeros(64, 80)
    args = (meta.positions, meta.out_slots, cache, meta.block_table, meta.seq_lens, 16)
    block(x, *args)  # the good case runs
    bad_slot = meta.out_slots.clone()
    bad_slot[1] = 64
    bad_page = meta.block_table.clone()
    bad_page[0, 0] = 4
    bad_pos = meta.positions.clone()
    bad_pos[0] = model.rope.max_positions
    for i, bad in ((1, bad_slot), (3, bad_page), (0, bad_pos)):
        with pytest.raises(ValueError, match="outside its table"):
            block(x, *args[:i], bad, *args[i + 1 :])
    with pytest.raises(ValueError, match="float32"):
        block(x.double(), *args)


@pytest.mark.parametrize("name", sorted(BLOCK_CONFIGS))
def test_feed_forward_blocks_match_the_torch_path(name):
    model = random_model(BLOCK_CONFIGS[name], "cpu", torch.float32, seed=5)
    dense, moe = model.model.layers[0].mlp, model.model.layers[1].mlp
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(9)
    x = torch.randn(11, hidden + 5, generator=g)[:, 3 : 3 + hidden]  # strided rows
    assert dense.cpu_weights is not None and moe.cpu_kernel
    ours_dense = dense(x)
    weights, dense.cpu_weights = dense.cpu_weights, None
    assert _rel_err(ours_dense, dense(x)) < 1e-5
    dense.cpu_weights = weights

    counts = {}
    for path in ("ours", "torch"):
        moe.load = ExpertLoad(2, moe.gate.num_experts, torch.device("cpu"))
        if path == "torch":
            moe.cpu_kernel, moe.gate.backend, moe.experts.backend = False, "torch", "loop"
            assert moe.shared_experts is not None
            moe.shared_experts.cpu_weights = None
            ref = moe(x)
        else:
            ours = moe(x)
        counts[path] = moe.load.counts
    assert _rel_err(ours, ref) < 1e-5
    assert torch.equal(counts["ours"], counts["torch"])
    assert int(counts["ours"][1].sum()) == 11 * moe.gate.top_k


@pytest.mark.parametrize("name", sorted(BLOCK_CONFIGS))
def test_decode_layers_in_one_call_match_the_blocks_one_by_one(name):
    """`DecodeLayers` (the model's decode-only path) makes the blocks' own C calls: logits,
    every cache row and the expert-load counts equal those of the layers run one by one."""
    model = random_model(BLOCK_CONFIGS[name], "cpu", torch.float32, seed=7)
    assert model.cpu_layers is not None
    cfg, attn = model.config, model.model.layers[0].self_attn
    lens = [1, 17, 40, 64, 3, 9, 100]
    meta, g = _decode_meta(lens, page_size=16, num_slots=16 * 40, seed=11)
    cache = torch.randn(
        cfg.num_hidden_layers, 16 * 40, attn.kv_lora_rank + attn.rope_dim, generator=g
    )
    ids = torch.randint(0, cfg.vocab_size, (len(lens),), generator=g)
    runs = {}
    for path in ("one call", "one by one"):
        layers = model.cpu_layers
        if path == "one by one":
            model.cpu_layers = None
        load = ExpertLoad(cfg.num_hidden_layers, cfg.n_routed_experts, torch.device("cpu"))
        model.record_expert_load(load)
        kv = cache.clone()
        runs[path] = (model(ids, meta, kv), kv, load.take())
        model.cpu_layers = layers
    for ours, ref in zip(runs["one call"], runs["one by one"], strict=True):
        assert torch.equal(ours, ref)
    assert int(runs["one call"][2].sum()) == len(lens) * cfg.num_experts_per_tok


@pytest.mark.parametrize("name", sorted(BLOCK_CONFIGS))
def test_results_do_not_depend_on_the_thread_count(name):
    """The kernels follow torch's thread count; every thread count gives the same bits (each
    parallel iteration writes its own rows, the MoE sums a token's experts in one order):
    decode layers (attention, MoE and dense blocks), the paged attention and routed experts."""
    model = random_model(BLOCK_CONFIGS[name], "cpu", torch.float32, seed=3)
    cfg, attn = model.config, model.model.layers[0].self_attn
    lens = [1, 17, 40, 64, 3, 9, 100, 5, 33]  # 9 requests: tiles of 4 and a tail of 1
    meta, g = _decode_meta(lens, page_size=16, num_slots=16 * 40, seed=5)
    cache = torch.randn(
        cfg.num_hidden_layers, 16 * 40, attn.kv_lora_rank + attn.rope_dim, generator=g
    )
    ids = torch.randint(0, cfg.vocab_size, (len(lens),), generator=g)
    q, pages, table, seq_lens = _paged_case([1, 17, 40, 0, 64, 5, 9], 4, 64, 16, 16, seed=2)
    x = torch.randn(13, 48, generator=g)
    w13t, w2t = torch.randn(8, 48, 80, generator=g), torch.randn(8, 40, 48, generator=g)
    picks = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(13)])
    weights = torch.rand(13, 3, generator=g)
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert cpu.num_threads() in (1, threads)  # 1: built without OpenMP
            load = ExpertLoad(cfg.num_hidden_layers, cfg.n_routed_experts, torch.device("cpu"))
            model.record_expert_load(load)
            kv = cache.clone()
            runs[threads] = (
                model(ids, meta, kv), kv, load.take(),
                cpu.mla_decode(q, pages, table, seq_lens, 16, 64, 0.1),
                cpu.moe_experts(x, picks, weights, w13t, w2t),
            )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for ours, ref in zip(runs[threads], runs[1], strict=True):
            assert torch.equal(ours, ref)


def test_decode_layers_follow_replaced_expert_weights_and_refuse_bad_input():
    model = random_model(BLOCK_CONFIGS["tiny"], "cpu", torch.float32, seed=8)
    cfg = model.config
    meta, g = _decode_meta([5, 20], page_size=16, num_slots=64, seed=0)
    cache = torch.randn(cfg.num_hidden_layers, 64, 80, generator=g)
    ids = torch.tensor([3, 4])
    before = model(ids, meta, cache.clone())
    experts = model.model.layers[1].mlp.experts
    experts.w13.data = experts.w13.data.contiguous() * 2  # replaced, not in the kernels' layout
    after = model(ids, meta, cache.clone())  # the one-call path, rebuilt for the new weights
    layers, model.cpu_layers = model.cpu_layers, None
    assert layers is not None and not torch.equal(after, before)
    assert torch.equal(after, model(ids, meta, cache.clone()))
    x = torch.randn(2, cfg.hidden_size, generator=g)
    args = [meta.positions, meta.out_slots, cache, meta.block_table, meta.seq_lens, 16]
    bad_slot = meta.out_slots.clone()
    bad_slot[1] = 64
    with pytest.raises(ValueError, match="outside its table"):
        layers(x, args[0], bad_slot, *args[2:])
    with pytest.raises(ValueError, match="kv_cache must be contiguous float32"):
        layers(x, *args[:2], cache[:1], *args[3:])
    with pytest.raises(ValueError, match="load must be"):
        layers(x, *args, torch.zeros(2, 3, dtype=torch.int64))


# --- build and fallback --------------------------------------------------------------------


def test_failed_build_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="no C compiler"):
        cpu.build(compiler="no-such-cc", out_dir=tmp_path)
    fake = tmp_path / "false-cc"
    fake.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="broken compiler"):
        cpu.build(compiler=str(fake), out_dir=tmp_path)
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind


def test_a_compiler_without_openmp_builds_serial_kernels(tmp_path):
    """The kernels' OpenMP loops are optional: a compiler that refuses -fopenmp still builds
    them, and they then run on one thread whatever they are told."""
    import ctypes
    import shutil

    real = shutil.which(os.environ.get("CC") or "cc")
    assert real is not None
    no_omp = tmp_path / "cc-no-openmp"
    no_omp.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && '
        f"{{ echo 'no OpenMP here' >&2; exit 1; }}; done\nexec {real} \"$@\"\n"
    )
    no_omp.chmod(0o755)
    lib = ctypes.CDLL(str(cpu.build(compiler=str(no_omp), out_dir=tmp_path)))
    lib.pds_set_num_threads.argtypes, lib.pds_set_num_threads.restype = [ctypes.c_int], ctypes.c_int
    assert lib.pds_set_num_threads(4) == 1
    if cpu._openmp_flags(real):
        assert cpu.num_threads() == torch.get_num_threads()  # the real build is parallel


def test_without_the_kernels_the_model_runs_plain_torch():
    """PDSERVE_CPU_KERNELS=0 (or no compiler): every module on its torch path, same tokens."""
    script = (
        "from workers.engine.config import EngineConfig\n"
        "from workers.engine.engine import Engine\n"
        "from workers.engine.messages import GenerateRequest, SamplingParams\n"
        "from workers.model.tiny import ensure_tiny_checkpoint\n"
        "e = Engine(ensure_tiny_checkpoint(), EngineConfig(), progress=False)\n"
        "e.add(GenerateRequest('r', list(range(5, 60)), SamplingParams(max_new_tokens=24,"
        " temperature=0.0, ignore_eos=True)))\n"
        "out = []\n"
        "while e.has_work:\n"
        "    out += [t for d in e.step() for t in d.token_ids]\n"
        "print(e.fast_path())\n"
        "print(out)\n"
    )
    runs = {}
    for flag in ("0", "1"):
        env = {**os.environ, "PDSERVE_CPU_KERNELS": flag}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=100
        )
        assert done.returncode == 0, done.stderr
        runs[flag] = done.stdout.splitlines()[-2:]
    assert runs["0"][0].startswith("decode attention torch, experts grouped_mm")
    assert runs["1"][0].startswith("decode attention cpu, experts cpu, decode layers in one C")
    assert runs["0"][1] == runs["1"][1]
