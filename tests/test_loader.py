"""Checkpoint loading: FP8 block dequantization, sharding, and clear errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import make_checkpoint
from workers.model.config import ModelConfig
from workers.model.fp8 import dequantize_block_fp8
from workers.model.loader import load_model

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("shape", "block"), [((200, 300), (128, 128)), ((37, 50), (16, 8))])
def test_dequantize_fp8_matches_blockwise_loop(shape, block):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(*shape, generator=g) * 3).to(torch.float8_e4m3fn)
    rows, cols = -(-shape[0] // block[0]), -(-shape[1] // block[1])
    scale = torch.rand(rows, cols, generator=g) + 0.5
    ref = torch.empty(shape)
    for i in range(rows):
        for j in range(cols):
            r = slice(i * block[0], (i + 1) * block[0])
            c = slice(j * block[1], (j + 1) * block[1])
            ref[r, c] = w[r, c].float() * scale[i, j]
    assert torch.equal(dequantize_block_fp8(w, scale, block), ref)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("v3_noqlora_nonorm", tmp_path_factory.mktemp("loader"))


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _single_file(model_dir):
    files = sorted(model_dir.glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def test_missing_tensor_is_named(ckpt, tmp_path):
    model_dir = _copy(ckpt.path, tmp_path)
    f = _single_file(model_dir)
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.self_attn\.kv_b_proj"):
        load_model(model_dir, progress=False)


def test_unexpected_tensor_is_named_and_mtp_layers_are_skipped(ckpt, tmp_path):
    model_dir = _copy(ckpt.path, tmp_path)
    f = _single_file(model_dir)
    tensors = load_file(f)
    n = ModelConfig.from_dir(model_dir).num_hidden_layers
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(2, 2)  # an MTP layer: skipped
    save_file(tensors, f)
    load_model(model_dir, progress=False)
    tensors["model.bogus.weight"] = torch.zeros(2)
    save_file(tensors, f)
    with pytest.raises(ValueError, match="unexpected tensor model.bogus.weight"):
        load_model(model_dir, progress=False)


def test_sharded_checkpoint_loads_the_same(ckpt, tmp_path):
    model_dir = _copy(ckpt.path, tmp_path)
    f = _single_file(model_dir)
    tensors = load_file(f)
    f.unlink()
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, model_dir / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    with open(model_dir / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    a = load_model(ckpt.path, progress=False).state_dict()
    b = load_model(model_dir, progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        load_model(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(ValueError, match="config.json: lacks vocab_size"):
        load_model(tmp_path, progress=False)


@pytest.mark.parametrize(("name", "kept"), [("v3_fp8_b16", True), ("v3_fp8", False)])
def test_fp8_experts_kept_with_their_block_scales(name, kept, tmp_path_factory):
    """Kept FP8 experts times their scales are exactly the dequantized-at-load weights; a
    checkpoint whose expert size is not a whole number of blocks falls back to dequantizing."""
    from workers.model.moe import RoutedExperts

    path = make_checkpoint(name, tmp_path_factory.mktemp(name)).path
    plain = load_model(path, progress=False)
    fp8 = load_model(path, progress=False, keep_fp8_experts=True)
    pairs = [
        (a, b)
        for a, b in zip(plain.modules(), fp8.modules(), strict=True)
        if isinstance(a, RoutedExperts) and isinstance(b, RoutedExperts)
    ]
    assert pairs
    for ref, ours in pairs:
        assert ours.is_fp8 is kept
        if not kept:
            assert torch.equal(ours.w13, ref.w13) and ours.w13_scale is None
            continue
        assert ours.backend == "triton" and ours.w13_scale is not None
        assert ours.w2_scale is not None
        for slot in range(ours.w13.shape[0]):
            w13 = dequantize_block_fp8(ours.w13[slot], ours.w13_scale[slot], ours.block_shape)
            w2 = dequantize_block_fp8(ours.w2[slot], ours.w2_scale[slot], ours.block_shape)
            assert torch.equal(w13, ref.w13[slot])
            assert torch.equal(w2, ref.w2[slot])


@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny checkpoint to damage, and its tensors."""
    model_dir = _copy(tiny_model_dir, tmp_path)
    return model_dir, load_file(_single_file(model_dir))


@pytest.mark.parametrize(
    ("key", "dtype"),
    [
        ("model.embed_tokens.weight", torch.int32),
        ("model.layers.0.input_layernorm.weight", torch.bool),
        ("model.layers.1.mlp.experts.3.up_proj.weight", torch.int8),
    ],
)
def test_a_tensor_of_a_non_floating_dtype_is_refused(tiny_copy, key, dtype):
    model_dir, tensors = tiny_copy
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, _single_file(model_dir))
    with pytest.raises(ValueError, match=rf"^{re.escape(key)} is {dtype}: .* floating point"):
        load_model(model_dir, progress=False)


def test_an_fp8_scale_of_a_non_floating_dtype_is_refused(tmp_path_factory):
    path = make_checkpoint("v3_fp8", tmp_path_factory.mktemp("v3_fp8")).path
    load_model(path, progress=False)  # FP8 weights with float scales load
    model_dir = _copy(path, tmp_path_factory.mktemp("damaged"))
    key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    f = next(f for f in model_dir.glob("*.safetensors") if key in load_file(f))
    tensors = load_file(f)
    assert tensors[key.removesuffix("_scale_inv")].dtype == torch.float8_e4m3fn
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, f)
    with pytest.raises(ValueError, match=rf"^{re.escape(key)} is torch.int32"):
        load_model(model_dir, progress=False)


def test_an_expert_beyond_n_routed_experts_is_refused(tiny_copy):
    model_dir, tensors = tiny_copy
    n = ModelConfig.from_dir(model_dir).n_routed_experts
    assert n == 16
    key = f"model.layers.2.mlp.experts.{n}.gate_proj.weight"
    tensors[key] = tensors["model.layers.2.mlp.experts.0.gate_proj.weight"].clone()
    save_file(tensors, _single_file(model_dir))
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}: expert 16 is beyond the 16 routed"):
        load_model(model_dir, progress=False)


def test_skipped_tensors_stay_skipped(tiny_copy):
    """An MTP layer past num_hidden_layers (DeepSeek-V3's `model.layers.61.*`, experts and
    all), and the experts an EP rank does not hold, are skipped without complaint."""
    from workers.ep.moe import EPContext
    from workers.ep.placement import ExpertPlacement

    model_dir, tensors = tiny_copy
    cfg = ModelConfig.from_dir(model_dir)
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    expert = tensors["model.layers.1.mlp.experts.0.gate_proj.weight"]
    tensors[f"{mtp}.mlp.experts.0.gate_proj.weight"] = expert.clone()
    tensors[f"{mtp}.mlp.experts.{cfg.n_routed_experts}.gate_proj.weight"] = expert.clone()
    tensors[f"{mtp}.eh_proj.weight"] = torch.zeros(2, 2)
    tensors[f"{mtp}.enorm.weight"] = torch.zeros(2, dtype=torch.int32)  # never read
    save_file(tensors, _single_file(model_dir))
    whole = load_model(model_dir, progress=False)
    placement = ExpertPlacement.default(cfg.num_hidden_layers, 16, 0, num_ranks=2)
    ep = EPContext(rank=1, world_size=2, placement=placement, dispatcher=None)  # type: ignore[arg-type]
    half = load_model(model_dir, progress=False, ep=ep)
    experts = next(m for n, m in half.named_modules() if n.endswith("layers.1.mlp.experts"))
    assert experts.slot_experts == list(range(8, 16))
    ref = dict(whole.named_parameters())["model.layers.1.mlp.experts.w13"]
    assert torch.equal(experts.w13, ref[8:16])
