"""The built-in tiny model: written once, a real checkpoint that transformers loads too; and the
FP8 block quantizer the reference checkpoints use."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from tests.checkpoints import quantize_fp8_blockwise
from workers.model.tiny import ensure_tiny_checkpoint

transformers = pytest.importorskip("transformers")

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.timeout(120)
def test_written_once_atomically(tmp_path, capfd):
    path = ensure_tiny_checkpoint(tmp_path)
    assert "pdserve: writing the built-in tiny model to" in capfd.readouterr().err
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert capfd.readouterr().err == ""
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind


@pytest.mark.timeout(120)
def test_default_cache_dir_is_pdserve_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    assert ensure_tiny_checkpoint().parent == tmp_path


@pytest.mark.timeout(120)
def test_loads_in_transformers_with_every_feature_on(tiny):
    config = transformers.DeepseekV3Config.from_pretrained(tiny)
    assert type(transformers.AutoConfig.from_pretrained(tiny)) is type(config)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_interleave
    assert config.q_lora_rank and config.n_group > config.topk_group > 1
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.first_k_dense_replace == 1 and config.n_shared_experts == 1
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tiny, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "mismatched_keys"))
    # The MTP module (layer 4), as DeepSeek-V3's layer 61: transformers does not serve it.
    assert info["unexpected_keys"] and all(
        k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in info["unexpected_keys"]
    )
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().min() > 0


@pytest.mark.timeout(120)
def test_tokenizer_loads_in_both_libraries_and_round_trips(tiny):
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert (
        len(tok) == raw.get_vocab_size() == transformers.AutoConfig.from_pretrained(tiny).vocab_size
    )
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    text = "héllo wörld , 你好 🚀\n\ttabs  and  spaces"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # exactly one BOS
    assert raw.encode(text).ids == ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert raw.decode(ids) == text


@pytest.mark.timeout(120)
def test_chat_template_is_deepseek_v3_style(tiny):
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == (
        f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello.{EOS}<｜User｜>Bye<｜Assistant｜>"
    )
    plain = tok.apply_chat_template(messages[1:2], add_generation_prompt=False, tokenize=False)
    assert plain == f"{BOS}<｜User｜>Hi"


@pytest.mark.timeout(120)
def test_engine_matches_transformers_on_the_tiny_model(tiny):
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.messages import GenerateRequest, SamplingParams

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(tiny).eval()
    ids = transformers.AutoTokenizer.from_pretrained(tiny)("Once upon a time").input_ids
    engine = Engine(tiny, EngineConfig(kv_capacity_tokens=512), progress=False)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    engine.add(GenerateRequest("a", ids, greedy))
    ours: list[int] = []
    while engine.has_work:
        for d in engine.step():
            ours += d.token_ids
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.eos_token_id,
        )[0, len(ids) :].tolist()
    assert ours == ref


@pytest.mark.timeout(120)
def test_quantize_fp8_blockwise_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * torch.logspace(-3, 1, 300)  # blocks of unequal range
    w[128:, 256:] = 0.0  # an all-zero (partial) block must not divide by zero
    q, scale_inv = quantize_fp8_blockwise(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (2, math.ceil(300 / 128))

    scale = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    deq = q.float() * scale
    assert torch.isfinite(deq).all() and torch.equal(deq[128:, 256:], w[128:, 256:])
    # Round-to-nearest with 3 mantissa bits: half an ulp is 2^-4 of the value for normals;
    # below 2^-6 (subnormals) the ulp is fixed at 2^-9, in units of the block scale.
    bound = w.abs() * 2.0**-4 + scale * 2.0**-10
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()
    # Each block's largest element maps to the top of the e4m3 range, so nothing is wasted.
    block_max = q.float().abs()[:128, :128].max()
    assert block_max == 448.0
