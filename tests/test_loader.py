"""Checkpoint loading: FP8 block dequantization, sharding, and clear errors."""

from __future__ import annotations

import json
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
    with pytest.raises(ValueError, match="config.json lacks vocab_size"):
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
