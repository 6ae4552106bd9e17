"""Whole blocks of a decode step in C (`workers.kernels.cpu.blocks`, layer.c) against the
model's own torch path: the attention block, the dense and MoE feed-forward blocks, and every
decoder layer of a decode batch in one call; the same bits at any thread count; bad indices
refused, and replaced expert weights followed.
"""

from __future__ import annotations

import pytest
import torch

from tests.cpu_kernel_cases import _paged_case, _rel_err
from workers.kernels import cpu
from workers.model.batch import AttentionMetadata
from workers.model.moe import ExpertLoad
from workers.model.random_init import random_model
from workers.model.tiny import tiny_config

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not cpu.available(), reason="no C compiler: the kernels cannot build"),
]


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
    decode layers (attention, MoE and dense blocks) up to the final norm, the paged attention
    and routed experts. (The LM head is torch's GEMM, whose bits may follow the thread count:
    MKL's AVX-512 kernels split a small batch differently on two threads.)"""
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
    logits = {}
    normed: list[torch.Tensor] = []  # the last hidden states, normed: what the LM head takes
    hook = model.model.norm.register_forward_hook(lambda m, i, out: normed.append(out.clone()))
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert cpu.num_threads() in (1, threads)  # 1: built without OpenMP
            load = ExpertLoad(cfg.num_hidden_layers, cfg.n_routed_experts, torch.device("cpu"))
            model.record_expert_load(load)
            kv = cache.clone()
            logits[threads] = model(ids, meta, kv)
            runs[threads] = (
                normed.pop(), kv, load.take(),
                cpu.mla_decode(q, pages, table, seq_lens, 16, 64, 0.1),
                cpu.moe_experts(x, picks, weights, w13t, w2t),
            )  # fmt: skip
    finally:
        hook.remove()
        torch.set_num_threads(before)
    for threads in (2, 3):
        for ours, ref in zip(runs[threads], runs[1], strict=True):
            assert torch.equal(ours, ref)
        torch.testing.assert_close(logits[threads], logits[1], rtol=1e-5, atol=1e-5)


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
