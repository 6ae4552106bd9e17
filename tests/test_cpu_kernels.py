"""The C kernels of `workers.kernels.cpu` one by one against plain-torch references (paged
MLA decode, routed experts, RMSNorm, V3 routing), their build, and the fallback to torch.

Shapes cover the vector paths (multiples of 16 and of the 4 x 64 GEMM tile) and the scalar
tails (odd sizes), padding rows, unowned cache slots holding NaN, and bad indices. Whole blocks
of a layer, made of these kernels: `test_cpu_blocks.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.cpu_kernel_cases import _paged_case, _rel_err
from workers.kernels import cpu
from workers.model.config import ModelConfig
from workers.model.moe import Gate

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not cpu.available(), reason="no C compiler: the kernels cannot build"),
]


# --- paged MLA decode ---------------------------------------------------------------------


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
